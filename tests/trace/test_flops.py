"""FLOP formulas for fused ops (``dmscale.trace.flops``): a model has the same count whichever path
torch takes (the fused LSTM / GRU kernels, the eval fast path of MultiheadAttention and
TransformerEncoderLayer, CPU flash attention), equal to what the unfused ops count."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import dmscale
from dmscale.trace.tracer import trace


def _fastpath(enabled: bool) -> None:
    torch.backends.mha.set_fastpath_enabled(enabled)


def test_encoder_and_mha_fast_paths_count_what_the_slow_paths_count():
    enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, batch_first=True), 2,
                                enable_nested_tensor=False)
    mha = nn.MultiheadAttention(16, 4, batch_first=True)
    x = torch.randn(2, 5, 16)
    fast = dmscale.count(enc, (x,))["flops"], dmscale.count(mha, (x, x, x))["flops"]
    was = torch.backends.mha.get_fastpath_enabled()
    _fastpath(False)
    try:
        slow = dmscale.count(enc, (x,))["flops"], dmscale.count(mha, (x, x, x))["flops"]
    finally:
        _fastpath(was)
    linears = 2 * 2 * 5 * (16 * 48 + 16 * 16 + 16 * 32 + 32 * 16)  # per layer: qkv, out, ffn
    attention = 4 * 2 * 5 * 5 * 16
    assert fast == slow
    assert fast[0] == 2 * (linears + attention)


@pytest.mark.parametrize("make", [lambda: nn.LSTM(6, 8, num_layers=2, batch_first=True),
                                  lambda: nn.GRU(6, 8, bidirectional=True),
                                  lambda: nn.RNN(6, 8),
                                  lambda: nn.LSTM(6, 8, proj_size=3)])
def test_rnn_flops(make):
    rnn = make()
    x = torch.randn(3, 4, 6)
    weights = sum(p.numel() for n, p in rnn.named_parameters() if p.dim() == 2)
    assert dmscale.count(rnn, (x,))["flops"] == 2 * 12 * weights
    assert trace(rnn, (x,)).total_flops == 2 * 12 * weights


def test_cpu_sdpa_is_counted():
    q = torch.randn(2, 3, 5, 4)

    class Attn(nn.Module):
        def forward(self, q):
            return F.scaled_dot_product_attention(q, q, q)

    assert dmscale.count(Attn(), (q,))["flops"] == 4 * 2 * 3 * 5 * 5 * 4
