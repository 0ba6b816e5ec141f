"""``nn.MultiheadAttention``: heads and the widths on each side are searched independently; the export
stays an ``nn.MultiheadAttention`` when its inner width equals its input width and becomes a
``PrunedMultiheadAttention`` (same parameters, forward for ``num_heads * head_dim != embed_dim``)
otherwise; either way it equals the hard-masked supernet, with every option of the module's forward."""

import os

import pytest
import torch
import torch.nn as nn

import dmscale
from dmscale.layers import PrunedMultiheadAttention

from prunetools import load_trusting, prune_and_export


class Net(nn.Module):
    def __init__(self, d=16, heads=4, weights=False, kv=None, **kw) -> None:
        super().__init__()
        self.inp = nn.Linear(5, d)
        self.kv = nn.Linear(5, kv) if kv else None
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True, kdim=kv, vdim=kv, **kw)
        self.out = nn.Linear(d, 3)
        self.weights = weights

    def forward(self, x, key_padding_mask=None, attn_mask=None):
        h = self.inp(x)
        kv = self.kv(x) if self.kv is not None else h
        y, _ = self.attn(h, kv, kv, key_padding_mask=key_padding_mask, attn_mask=attn_mask,
                         need_weights=self.weights)
        return self.out(torch.relu(y))


CASES = [
    ({}, {}),
    ({"weights": True}, {}),
    ({"kv": 12}, {}),
    ({"bias": False}, {}),
    ({"add_bias_kv": True, "add_zero_attn": True}, {}),
    ({}, {"key_padding_mask": torch.tensor([[False] * 6, [False] * 4 + [True] * 2])}),
    ({"weights": True}, {"attn_mask": torch.triu(torch.full((6, 6), float("-inf")), 1)}),
]


@pytest.mark.parametrize("kw,call", CASES, ids=[str(i) for i in range(len(CASES))])
def test_heads_and_widths_are_searched_and_exported(kw, call):
    torch.manual_seed(0)
    model = Net(**kw)
    x = torch.randn(2, 6, 5)
    dms, small = prune_and_export(model, (x,), ratio=0.55, example_kwargs=call)
    kinds = {g.name: g.kind for g in dms.groups}
    assert kinds.get("attn.out_proj[heads]") == "heads" and kinds.get("inp") == "width"
    assert kinds.get("attn.out_proj") == "width"  # the output width, on its own
    a = small.attn
    assert a.num_heads < 4 and a.embed_dim == a.num_heads * a.head_dim and small.inp.out_features < 16
    q_width = a.in_proj_weight.shape[1] if a.in_proj_weight is not None else a.q_proj_weight.shape[1]
    assert q_width == small.inp.out_features
    assert isinstance(a, PrunedMultiheadAttention) == (a.embed_dim != q_width)
    assert small.out.in_features == a.out_proj.out_features < 16


def test_equal_widths_keep_torchs_class():
    torch.manual_seed(0)
    model = Net(d=8, heads=2)
    dms = dmscale.DMS(model, (torch.randn(2, 6, 5),), dmscale.Target(flops=0.9), total_steps=5)
    with torch.no_grad():  # keep every head; the output projection keeps its width
        for g in dms.groups:
            dms.space.ratio(g).fill_(1.0)
    small = dms.export()
    assert type(small.attn) is nn.MultiheadAttention


def test_pruned_attention_saves_and_loads(tmp_path):
    torch.manual_seed(0)
    x = torch.randn(2, 6, 5)
    _, small = prune_and_export(Net(), (x,), ratio=0.55)
    assert isinstance(small.attn, PrunedMultiheadAttention)
    path = os.path.join(tmp_path, "m")
    dmscale.save(small, path)
    loaded = load_trusting(path, __name__)
    assert type(loaded.attn) is PrunedMultiheadAttention
    with torch.no_grad():
        assert torch.equal(loaded(x), small(x))


def test_masked_eval_does_not_take_the_fused_path():
    """Under no_grad in eval, torch would run the encoder layer's fused kernel (reading the weights
    directly, skipping the masks' hooks); a masked forward switches it off and restores it."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, batch_first=True)
    model = nn.Sequential(nn.Linear(5, 16), nn.TransformerEncoder(layer, 2, enable_nested_tensor=False))
    x = torch.randn(2, 6, 5)
    dms, small = prune_and_export(model, (x,), ratio=0.5)
    assert torch.backends.mha.get_fastpath_enabled()
    with torch.no_grad(), dms.hard():
        a = model(x)
    torch.testing.assert_close(small(x), a, atol=1e-5, rtol=1e-5)
