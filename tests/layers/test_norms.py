"""Norm layers are recognised by what they compute (``dmscale.layers.norms``), not by their class name:
LayerNorm and RMSNorm variants, Gemma's ``y * (1 + w)``, T5-style float32 statistics, channels-first
LayerNorm subclasses that override ``forward`` (ConvNeXt). Each is masked with statistics over the kept
channels only and exported exactly; a layer dmscale models wrongly is caught when ``DMS`` is built."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import dmscale
from dmscale.layers import LayerSpec, identify_norm, unregister_layer
from dmscale.masking import MaskingError
from dmscale.trace.spaces import union


class LlamaRMSNorm(nn.Module):
    def __init__(self, n: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(n))
        self.variance_epsilon = eps

    def forward(self, h):
        dtype = h.dtype
        h = h.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * h.to(dtype)


class GemmaRMSNorm(nn.Module):
    """``y * (1 + w)`` with a zero-initialised weight."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))

    def forward(self, x):
        out = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
        return (out * (1.0 + self.weight.float())).type_as(x)


class T5LayerNorm(nn.Module):
    """No mean subtraction, variance in float32 (its class name does not say RMSNorm)."""

    def __init__(self, n: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(n))
        self.variance_epsilon = eps

    def forward(self, h):
        variance = h.to(torch.float32).pow(2).mean(-1, keepdim=True)
        h = h * torch.rsqrt(variance + self.variance_epsilon)
        if self.weight.dtype in (torch.float16, torch.bfloat16):
            h = h.to(self.weight.dtype)
        return self.weight * h


class ConvNeXtLayerNorm(nn.LayerNorm):
    """ConvNeXt's LayerNorm: channels_last or channels_first (N, C, H, W) by an attribute."""

    def __init__(self, n: int, eps: float = 1e-6, data_format: str = "channels_first") -> None:
        super().__init__(n, eps=eps)
        self.data_format = data_format

    def forward(self, x):
        if self.data_format == "channels_last":
            return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        u = x.mean(1, keepdim=True)
        s = (x - u).pow(2).mean(1, keepdim=True)
        x = (x - u) / torch.sqrt(s + self.eps)
        return self.weight[:, None, None] * x + self.bias[:, None, None]


class LayerScale(nn.Module):
    def __init__(self, n: int) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.full((n,), 0.1))

    def forward(self, x):
        return x * self.gamma


def _randomise(mod: nn.Module) -> nn.Module:
    with torch.no_grad():
        for p in mod.parameters():
            p.normal_(0.2, 0.5)
    return mod


FORMS = [
    (lambda: nn.LayerNorm(8), (3, 5, 8), (True, 0.0, -1)),
    (lambda: nn.LayerNorm(8, bias=False), (3, 8), (True, 0.0, -1)),
    (lambda: nn.RMSNorm(8, eps=1e-5), (3, 5, 8), (False, 0.0, -1)),
    (lambda: LlamaRMSNorm(8), (3, 5, 8), (False, 0.0, -1)),
    (lambda: GemmaRMSNorm(8), (3, 5, 8), (False, 1.0, -1)),
    (lambda: T5LayerNorm(8), (3, 5, 8), (False, 0.0, -1)),
    (lambda: ConvNeXtLayerNorm(8), (2, 8, 3, 3), (True, 0.0, 1)),
    (lambda: ConvNeXtLayerNorm(8, data_format="channels_last"), (2, 3, 3, 8), (True, 0.0, -1)),
]


@pytest.mark.parametrize("make,shape,form", FORMS)
def test_identify_norm(make, shape, form):
    mod = _randomise(make())
    before = [p.detach().clone() for p in mod.parameters()]
    x = torch.randn(shape)
    rng = torch.get_rng_state()
    got = identify_norm(mod, (x,), {})
    assert got is not None and (got.center, got.offset, got.dim) == form
    assert all(torch.equal(a, b) for a, b in zip(before, mod.parameters()))  # probe restores the parameters
    assert torch.equal(rng, torch.get_rng_state())  # and does not use the global RNG
    torch.testing.assert_close(got.apply(mod, x), mod(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mod,x", [
    (LayerScale(8), torch.randn(3, 8)),
    (nn.InstanceNorm1d(8, affine=True), torch.randn(2, 8, 5)),  # statistics over time, not channels
    (nn.LayerNorm((3, 8)), torch.randn(2, 3, 8)),
])
def test_other_modules_are_not_norms(mod, x):
    assert identify_norm(_randomise(mod), (x,), {}) is None


@pytest.mark.parametrize("make,shape,form", FORMS)
def test_masked_form_equals_the_smaller_layer_and_fold_respects_the_offset(make, shape, form):
    mod = _randomise(make())
    x = torch.randn(shape)
    nf = identify_norm(mod, (x,), {})
    keep = torch.tensor([1, 0, 1, 1, 0, 1, 1, 0], dtype=torch.bool)
    d = nf.dim % x.dim()
    small_x = x.index_select(d, keep.nonzero().flatten())
    small = make()
    with torch.no_grad():
        for (n, p), q in zip(small.named_parameters(), mod.parameters()):
            setattr(small, n, nn.Parameter(q[keep].clone()))
    if isinstance(small, (nn.LayerNorm, nn.RMSNorm)):
        small.normalized_shape = (int(keep.sum()),)
    got = nf.apply(mod, x, keep).index_select(d, keep.nonzero().flatten())
    torch.testing.assert_close(got, small(small_x), atol=1e-5, rtol=1e-5)
    # export folds output-mask values m into the parameters: the layer then computes m * output
    m = torch.rand(8) + 0.2
    shape_m = [1] * x.dim()
    shape_m[d] = 8
    ref = mod(x) * m.view(shape_m)
    with torch.no_grad():
        nf.fold(mod, m)
    torch.testing.assert_close(mod(x), ref, atol=1e-5, rtol=1e-5)


class Block(nn.Module):
    def __init__(self, d: int, norm: nn.Module) -> None:
        super().__init__()
        self.norm = norm
        self.fc1 = nn.Linear(d, 2 * d)
        self.fc2 = nn.Linear(2 * d, d)

    def forward(self, x):
        return x + self.fc2(F.gelu(self.fc1(self.norm(x))))


class Net(nn.Module):
    def __init__(self, make) -> None:
        super().__init__()
        self.inp = nn.Linear(6, 16)
        self.blocks = nn.ModuleList([Block(16, make(16)) for _ in range(2)])
        self.final = make(16)
        self.out = nn.Linear(16, 3)

    def forward(self, x):
        x = self.inp(x)
        for b in self.blocks:
            x = b(x)
        return self.out(self.final(x))


@pytest.mark.parametrize("make", [nn.LayerNorm, nn.RMSNorm, LlamaRMSNorm, GemmaRMSNorm, T5LayerNorm],
                         ids=lambda f: f.__name__)
def test_searched_residual_width_through_every_norm_form_exports_exactly(make):
    torch.manual_seed(0)
    model = _randomise(Net(make))
    x = torch.randn(4, 5, 6)
    dms = dmscale.DMS(model, (x,), dmscale.Target(flops=0.5), total_steps=10)
    assert [g.name for g in dms.groups if g.kind == "width"][0] == "inp"  # the residual width is searched
    assert {dms.trace.layers[n].kind for n in ("blocks.0.norm", "final")} <= {"layernorm", "rmsnorm"}
    with torch.no_grad():
        for g in dms.groups:
            dms.space.ratio(g).fill_(0.6)
            dms.space.importance(g).copy_(torch.rand(g.size))
    small = dms.export()
    model.eval()
    with torch.no_grad(), dms.hard():
        ref = model(x)
    torch.testing.assert_close(small(x), ref, atol=1e-5, rtol=1e-5)
    assert small.final.weight.shape == (10,)


class UnmaskedRMSNorm(nn.Module):
    """An RMSNorm whose registered spec claims a wrong formula (plain mean-centred LayerNorm)."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(n))

    def forward(self, x):
        return self.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)


def _wrong_norm(mod, x, keep):
    return F.layer_norm(x, x.shape[-1:], mod.weight)


def _unit(tr, mod, name, x, out, flops):
    union(tr.get(mod.weight)[0], tr.get(x)[-1])
    tr.set(out, list(tr.get(x)))


def test_a_layer_modelled_wrongly_is_caught_at_construction():
    spec = LayerSpec("my_norm", out_dims={"weight": 0}, trace_unit=_unit, masked_norm=_wrong_norm)
    dmscale.register_layer(UnmaskedRMSNorm, spec)
    try:
        model = nn.Sequential(nn.Linear(4, 8), UnmaskedRMSNorm(8), nn.Linear(8, 2))
        with pytest.raises(MaskingError, match=r"first module whose output changed is '1' \(UnmaskedRMSNorm"):
            dmscale.DMS(model, (torch.randn(3, 4),), dmscale.Target(flops=0.6), total_steps=5)
        assert not model[1]._forward_hooks  # the masks were taken out again
    finally:
        unregister_layer(UnmaskedRMSNorm)


def test_norm_of_another_width_in_the_probe_input_is_not_a_norm():
    class Odd(nn.Module):  # a 1-D parameter of the channel size, but sums channels into every output
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.ones(8))

        def forward(self, x):
            return x * self.weight + x.sum(-1, keepdim=True)

    assert identify_norm(Odd(), (torch.randn(2, 8),), {}) is None
