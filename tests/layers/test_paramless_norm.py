"""Norms without affine parameters (``nn.LayerNorm(d, elementwise_affine=False)``, OLMo-1's LayerNorm calling
``F.layer_norm(x, shape, None, None)``, ``nn.RMSNorm(d, elementwise_affine=False)``) are searched: statistics over
the kept channels only, output masked (0 / 1 in hard mode: there is no parameter to fold mask values into); the
export is a smaller non-affine norm. A bare ``F.layer_norm`` call inside another module stays fixed and named."""

import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from dmscale.layers.norms import NormForm
from prunetools import prune_and_export, search_to_budget


class OlmoLayerNorm(nn.Module):
    def __init__(self, n):
        super().__init__()
        self.normalized_shape = (n,)

    def forward(self, x):
        return F.layer_norm(x.float(), self.normalized_shape, None, None, eps=1e-5).to(x.dtype)


NORMS = {"layernorm": lambda d: nn.LayerNorm(d, elementwise_affine=False), "olmo": OlmoLayerNorm,
         "rmsnorm": lambda d: nn.RMSNorm(d, elementwise_affine=False)}


class Block(nn.Module):
    def __init__(self, d, norm):
        super().__init__()
        self.n1, self.n2 = norm(d), norm(d)
        self.att = nn.MultiheadAttention(d, 2, batch_first=True)
        self.up, self.down = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x):
        h = self.n1(x)
        x = x + self.att(h, h, h, need_weights=False)[0]
        return x + self.down(F.gelu(self.up(self.n2(x))))


class Tiny(nn.Module):
    def __init__(self, norm, d=16, vocab=40):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList([Block(d, norm) for _ in range(2)])
        self.nf = norm(d)
        self.head = nn.Linear(d, vocab)

    def forward(self, ids):
        x = self.emb(ids)
        for b in self.blocks:
            x = b(x)
        return self.head(self.nf(x))


@pytest.mark.parametrize("kind", list(NORMS))
def test_stream_width_is_a_group_and_export_is_exact(kind):
    torch.manual_seed(0)
    model = Tiny(NORMS[kind])
    ids = torch.randint(0, 40, (2, 7))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing "could be searched but is fixed"
        dms, small = prune_and_export(model, ids, ratio=0.6)  # assert_close with the hard-masked supernet inside
    assert dms.trace.lost == []
    assert {"nf", "blocks.0.n1", "blocks.1.n2"} <= set(dms.trace.layers)
    stream = dms.trace.layers["nf"].norm_space.find()
    assert any(g.space is not None and g.space.find() is stream for g in dms.groups)
    kept = small.emb.weight.shape[1]
    assert kept < 16 and small.nf.normalized_shape == (kept,)
    assert all(p.numel() == 0 for p in small.nf.parameters()) and not list(small.nf.parameters())


def test_search_lands_on_flops_budget():
    torch.manual_seed(1)
    model = Tiny(NORMS["layernorm"])
    ids = torch.randint(0, 40, (4, 9))
    search_to_budget(model, ids, lambda y: F.cross_entropy(y.flatten(0, 1), ids.flatten()), steps=6)


@pytest.mark.parametrize("center", [True, False])
def test_masked_norm_without_parameters_gradcheck(center):
    form = NormForm(center, 0.0, -1, 1e-5, None, None)
    keep = torch.tensor([True, False, True, True, False, True])
    x = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    m = torch.rand(6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, m: form.apply(nn.Identity(), x, keep) * m, (x, m))
    # the kept channels are the smaller norm of the kept channels
    y = form.apply(nn.Identity(), x.detach(), keep)
    ref = F.layer_norm(x.detach()[:, keep], (4,), eps=1e-5) if center else F.rms_norm(x.detach()[:, keep], (4,), eps=1e-5)
    torch.testing.assert_close(y[:, keep], ref)


class BareCall(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 8), nn.Linear(8, 2)

    def forward(self, x):
        return self.b(F.layer_norm(self.a(x), (8,)))


def test_bare_functional_call_stays_fixed_and_named():
    from dmscale.trace.tracer import trace

    tr = trace(BareCall(), (torch.randn(3, 4),))
    assert any("layer_norm over 1 dim outside a recognised norm layer" in r for d in tr.lost for r in d.reasons)
