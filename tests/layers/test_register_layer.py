"""A user's own layer class, registered with ``dmscale.register_layer``, is searched and exported."""

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import dmscale
from dmscale.layers import LayerSpec, linear_unit, spec_for, unregister_layer
from dmscale.trace.tracer import trace
from zoo import EinsumDense

SPEC = LayerSpec(
    "einsum_dense",
    out_dims={"kernel": 1, "b": 0},
    trace_unit=linear_unit(weight="kernel", in_dim=0, out_dim=1, bias="b", op="einsum_dense"),
    size_attrs=lambda m: {"n_in": m.kernel.shape[0], "n_out": m.kernel.shape[1]},
)


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(EinsumDense(12, 32), nn.GELU(), EinsumDense(32, 24), nn.GELU(), EinsumDense(24, 5))


@pytest.fixture
def registered():
    dmscale.register_layer(EinsumDense, SPEC)
    yield
    unregister_layer(EinsumDense)


def test_unregistered_layer_is_searched_through_einsum_but_its_sizes_are_unknown_to_export():
    res = trace(_model(), (torch.randn(4, 12),))
    assert not res.unsupported and not res.params["0.kernel"].dims[1].find().fixed
    dms = dmscale.DMS(_model(), (torch.randn(4, 12),), dmscale.Target(flops=0.5), total_steps=10)
    with torch.no_grad():
        for g in dms.groups:
            dms.space.ratio(g).fill_(0.5)
    with pytest.raises(dmscale.ExportError, match="failed to run"):  # n_in / n_out stay stale
        dms.export()


def test_registered_layer_is_searched_and_exported(registered):
    assert spec_for(EinsumDense(2, 3)) is SPEC
    model = _model()
    torch.manual_seed(1)
    x = torch.randn(64, 12)
    y = torch.randn(64, 5)
    dms = dmscale.DMS(model, (x[:8],), dmscale.Target(flops=0.5), total_steps=30)
    assert [(g.kind, g.size) for g in dms.groups] == [("width", 32), ("width", 24)]
    assert not dms.trace.unsupported
    assert dms.trace.layers["0"].kind == "einsum_dense" and not dms.trace.params["0.kernel"].raw
    opt = torch.optim.Adam([{"params": dms.weight_parameters(), "lr": 1e-3},
                            {"params": dms.structure_parameters(), "lr": 0.2}])
    for _ in range(30):
        loss = dms.loss(F.mse_loss(model(x), y))
        opt.zero_grad()
        loss.backward()
        opt.step()
        dms.step()
    small = dms.export()  # checks the export against the hard-masked supernet
    widths = [small[0].n_out, small[2].n_out]
    assert sum(widths) < 32 + 24 and float(dms.resource(soft=False)["flops_frac"]) <= 0.52
    for i in (0, 2, 4):
        layer = small[i]
        assert (layer.n_in, layer.n_out) == tuple(layer.kernel.shape) and layer.b.shape == (layer.n_out,)
    assert small[2].n_in == small[0].n_out and small[4].n_in == small[2].n_out
    model.eval()
    with torch.no_grad(), dms.hard():
        ref = model(x)
    torch.testing.assert_close(small(x), ref, atol=1e-5, rtol=1e-4)
    full, got = dmscale.count(_model(), (x[:8],)), dmscale.count(small, (x[:8],))
    assert got["flops"] < full["flops"]
    assert got["flops"] == pytest.approx(float(dms.resource(soft=False)["flops"]), rel=0.02)


def test_register_layer_errors():
    with pytest.raises(TypeError, match="not a torch.nn.Module subclass"):
        dmscale.register_layer(int, SPEC)
    with pytest.raises(TypeError, match="expected a dmscale.layers.LayerSpec"):
        dmscale.register_layer(EinsumDense, {"kind": "x"})
    with pytest.raises(ValueError, match="Linear already has a LayerSpec"):
        dmscale.register_layer(nn.Linear, SPEC)
    with pytest.raises(KeyError, match="was not registered"):
        unregister_layer(EinsumDense)


def test_registration_overrides_builtin_and_applies_to_subclasses(registered):
    class Sub(EinsumDense):
        pass

    assert spec_for(Sub(2, 3)) is SPEC
    other = LayerSpec("my_linear", out_dims={"weight": 0, "bias": 0})

    class MyLinear(nn.Linear):
        pass

    dmscale.register_layer(MyLinear, other)
    try:
        assert spec_for(MyLinear(2, 3)) is other and spec_for(nn.Linear(2, 3)).kind == "linear"
        with pytest.raises(ValueError, match="already has a LayerSpec"):
            dmscale.register_layer(MyLinear, other)
        dmscale.register_layer(MyLinear, SPEC, replace=True)
        assert spec_for(MyLinear(2, 3)) is SPEC
    finally:
        unregister_layer(MyLinear)
    assert spec_for(MyLinear(2, 3)).kind == "linear"


class ViewDense(nn.Module):
    """A linear layer traced through its ops whose forward uses its size attributes."""

    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__()
        self.n_in, self.n_out = n_in, n_out
        self.weight = nn.Parameter(torch.randn(n_out, n_in) / math.sqrt(n_in))
        self.bias = nn.Parameter(torch.zeros(n_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x.reshape(-1, self.n_in), self.weight, self.bias)
        return y.view(*x.shape[:-1], self.n_out)


VIEW_SPEC = LayerSpec("view_dense", out_dims={"weight": 0, "bias": 0},
                      size_attrs=lambda m: {"n_out": m.weight.shape[0], "n_in": m.weight.shape[1]})


def _pruned_export(model: nn.Module, x: torch.Tensor) -> nn.Module:
    dms = dmscale.DMS(model, (x,), dmscale.Target(flops=0.6), total_steps=10)
    with torch.no_grad():
        for g in dms.groups:
            dms.space.ratio(g).fill_(0.5)
    return dms.export()


def test_spec_of_a_layer_traced_through_its_ops_updates_its_sizes_on_export():
    x = torch.randn(4, 6)

    def model():
        torch.manual_seed(0)
        return nn.Sequential(ViewDense(6, 16), nn.ReLU(), ViewDense(16, 3))

    with pytest.raises(dmscale.ExportError, match="failed to run"):  # n_out / n_in stay stale
        _pruned_export(model(), x)
    dmscale.register_layer(ViewDense, VIEW_SPEC)
    try:
        small = _pruned_export(model(), x)
    finally:
        unregister_layer(ViewDense)
    assert small[0].n_out == small[2].n_in == small[0].weight.shape[0] < 16
