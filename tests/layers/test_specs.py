"""Built-in LayerSpecs: lookup, size attributes, attribute updates after slicing, masked norms, validation."""

import pytest
import torch
import torch.nn as nn

from dmscale.layers import LayerSpec, layer_kind, spec_for
from dmscale.layers import is_rmsnorm
from dmscale.trace.tracer import trace


class LlamaLikeRMSNorm(nn.Module):
    def __init__(self, n: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.rand(n) + 0.5)
        self.variance_epsilon = eps
        self.hidden_size = n

    def forward(self, x):
        v = x.pow(2).mean(-1, keepdim=True)
        return self.weight * (x * torch.rsqrt(v + self.variance_epsilon))


def _hf_conv1d(nx: int, nf: int) -> nn.Module:
    from transformers.pytorch_utils import Conv1D

    return Conv1D(nf, nx)


BUILTIN = [
    (nn.Linear(4, 6), "linear", {"in_features": 4, "out_features": 6}),
    (nn.Conv1d(4, 6, 3), "conv", {"in_channels": 4, "out_channels": 6}),
    (nn.Conv2d(4, 6, 3, groups=2), "conv", {"in_channels": 4, "out_channels": 6}),
    (nn.Conv3d(4, 4, 3, groups=4), "conv", {"in_channels": 4, "out_channels": 4}),
    (nn.BatchNorm1d(5), "batchnorm", {"num_features": 5}),
    (nn.BatchNorm2d(5, affine=False), "batchnorm", {"num_features": 5}),
    (nn.LayerNorm(7), "layernorm", {"normalized_shape": (7,)}),
    (nn.LayerNorm((3, 7)), "layernorm", {"normalized_shape": (3, 7)}),
    (nn.GroupNorm(2, 8), "groupnorm", {"num_channels": 8}),
    (nn.RMSNorm(6), "rmsnorm", {"normalized_shape": (6,)}),
    (nn.Embedding(10, 4), "embedding", {"num_embeddings": 10, "embedding_dim": 4}),
]


@pytest.mark.parametrize("mod,kind,sizes", BUILTIN, ids=lambda v: type(v).__name__ if isinstance(v, nn.Module) else "")
def test_builtin_spec_kind_and_sizes_agree_with_the_module(mod, kind, sizes):
    spec = spec_for(mod)
    assert spec.kind == kind == layer_kind(mod)
    assert spec.sizes(mod) == sizes
    for attr, value in sizes.items():
        got = getattr(mod, attr)
        assert (tuple(got) if isinstance(got, (tuple, list)) else got) == value


def test_hf_conv1d_and_multihead_attention():
    conv = _hf_conv1d(4, 6)
    assert spec_for(conv).kind == "hf_conv1d" and spec_for(conv).sizes(conv) == {"nx": 4, "nf": 6}
    assert spec_for(conv).out_dims == {"weight": 1, "bias": 0}
    mha = nn.MultiheadAttention(8, 2)
    spec = spec_for(mha)
    assert spec.kind == "mha" and not spec.maskable and spec.trace_unit is None and spec.params == ()
    assert layer_kind(mha) is None and spec.sizes(mha) == {"embed_dim": 8, "kdim": 8, "vdim": 8, "head_dim": 4}
    mha_kv = nn.MultiheadAttention(8, 2, kdim=5, vdim=3)
    assert spec_for(mha_kv).sizes(mha_kv) == {"embed_dim": 8, "kdim": 5, "vdim": 3, "head_dim": 4}


def test_lookup_by_subclass_not_by_name():
    # a norm class is recognised by what it computes when traced (tests/layers/test_norms.py), not by its name
    assert is_rmsnorm(LlamaLikeRMSNorm(3)) and spec_for(LlamaLikeRMSNorm(3)) is None

    class MyConv(nn.Conv2d):
        pass

    assert spec_for(MyConv(2, 3, 1)).kind == "conv"
    assert spec_for(nn.ReLU()) is None and layer_kind(nn.ReLU()) is None
    assert spec_for(nn.ConvTranspose2d(2, 3, 1)).kind == "conv_transpose"


def _slice_out(mod: nn.Module, keep: int) -> None:
    spec = spec_for(mod)
    for name, d in spec.out_dims.items():
        p = getattr(mod, name, None)
        if isinstance(p, torch.Tensor):
            setattr(mod, name, nn.Parameter(p.detach().narrow(d, 0, keep).clone()))
    for name in ("running_mean", "running_var"):
        b = getattr(mod, name, None)
        if isinstance(b, torch.Tensor):
            setattr(mod, name, b[:keep].clone())
    spec.update(mod)


@pytest.mark.parametrize("make,x,keep,out_dim", [
    (lambda: nn.Linear(4, 6), torch.randn(2, 4), 3, -1),
    (lambda: nn.Conv2d(4, 6, 3, padding=1), torch.randn(2, 4, 5, 5), 2, 1),
    (lambda: nn.BatchNorm2d(6), torch.randn(2, 4, 3, 3), 4, 1),
    (lambda: nn.GroupNorm(6, 6), torch.randn(2, 4, 3), 4, 1),
    (lambda: nn.RMSNorm(6), torch.randn(2, 4), 4, -1),
    (lambda: nn.LayerNorm(6), torch.randn(2, 4), 4, -1),
    (lambda: nn.Embedding(10, 6), torch.tensor([[1, 2]]), 4, -1),
])
def test_update_after_slicing_the_output_channels(make, x, keep, out_dim):
    """Export slices the out_dims parameters, then spec.update makes the attributes agree: the layer runs."""
    mod = make().eval()
    _slice_out(mod, keep)
    for attr, value in spec_for(mod).sizes(mod).items():
        got = getattr(mod, attr)
        assert (tuple(got) if isinstance(got, (tuple, list)) else got) == value
    assert mod(x).shape[out_dim] == keep


def test_depthwise_conv_stays_depthwise_after_slicing():
    mod = nn.Conv2d(6, 6, 3, groups=6, padding=1)
    _slice_out(mod, 4)
    assert (mod.in_channels, mod.out_channels, mod.groups) == (4, 4, 4)
    assert mod(torch.randn(1, 4, 5, 5)).shape == (1, 4, 5, 5)


def test_layer_records_carry_their_spec():
    model = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 8), LlamaLikeRMSNorm(8), nn.Linear(8, 2))
    res = trace(model, (torch.randn(3, 4),))
    assert {n: r.kind for n, r in res.layers.items()} == {"0": "linear", "1": "layernorm", "2": "linear",
                                                          "3": "rmsnorm", "4": "linear"}
    assert all(r.spec is spec_for(model[int(n)]) for n, r in res.layers.items() if n in ("0", "2", "4"))
    # norms carry the spec of the form they compute (statistics over kept channels), sizes from the class's spec
    assert res.layers["1"].spec.masked_norm is not None and res.layers["1"].spec.size_attrs is spec_for(model[1]).size_attrs
    assert res.layers["1"].norm_space is not None and res.layers["3"].norm_space is not None
    # norms are traced as units: the weight is tied to the residual width it normalises
    assert res.params["3.weight"].dims[0].find() is res.params["2.weight"].dims[0].find()


def test_layernorm_subclass_with_its_own_forward_is_recognised_by_what_it_computes():
    class ChannelsFirstLN(nn.LayerNorm):
        def forward(self, x):
            return super().forward(x.transpose(1, -1)).transpose(1, -1)

    model = nn.Sequential(nn.Conv1d(3, 8, 1), ChannelsFirstLN(8), nn.Conv1d(8, 2, 1))
    res = trace(model, (torch.randn(2, 3, 5),))
    assert res.layers["1"].kind == "layernorm" and list(res.layers["1"].out_dims) == [-2]
    assert not res.params["1.weight"].dims[0].find().fixed
    assert res.params["1.weight"].dims[0].find() is res.params["0.weight"].dims[0].find()


def test_layernorm_subclass_computing_something_else_is_left_unpruned():
    class ScaledLN(nn.LayerNorm):
        def forward(self, x):  # not a norm of x over its channels: dmscale does not model it
            return super().forward(x) * x.abs().amax(-1, keepdim=True)

    model = nn.Sequential(nn.Linear(3, 8), ScaledLN(8), nn.Linear(8, 2))
    res = trace(model, (torch.randn(2, 3),))
    assert "1" not in res.layers
    assert res.params["1.weight"].dims[0].find().fixed
    assert any(d.name in ("0", "1") for d in res.lost)


@pytest.mark.parametrize("kwargs,match", [
    ({"kind": ""}, "kind must be a non-empty string"),
    ({"kind": "x", "out_dims": {"weight": "0"}}, "out_dims must map"),
    ({"kind": "x", "out_dims": {"weight": True}}, "out_dims must map"),
    ({"kind": "x", "fold_into_weights": True}, "fold_into_weights needs out_dims"),
    ({"kind": "x", "masked_norm": lambda m, x, k: x}, "masked_norm needs out_dims \\(or norm_dim"),
    ({"kind": "x", "norm_dim": -1}, "norm_dim \\(-1 or 1\\) goes with masked_norm"),
    ({"kind": "x", "masked_norm": lambda m, x, k: x, "norm_dim": 2}, "norm_dim \\(-1 or 1\\)"),
    ({"kind": "x", "out_dims": {"kernel": 0}, "params": ("weight",)}, "not listed in params"),
    ({"kind": "x", "params": "weight"}, "tuple of parameter names"),
])
def test_layer_spec_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LayerSpec(**kwargs)


def test_layer_spec_callables_are_checked_and_params_default():
    with pytest.raises(TypeError, match="size_attrs must be callable"):
        LayerSpec("x", size_attrs=3)
    spec = LayerSpec("x", out_dims={"kernel": 1})
    assert spec.params == ("kernel", "weight", "bias") and spec.out_param == "kernel" and spec.maskable
    assert LayerSpec("y").sizes(nn.ReLU()) == {}


def test_multihead_attention_is_traced_through_its_op():
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inp = nn.Linear(4, 8)
            self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
            self.mid = nn.Linear(8, 16)
            self.out = nn.Linear(16, 3)

        def forward(self, x):
            h = self.inp(x)
            return self.out(torch.relu(self.mid(self.attn(h, h, h, need_weights=False)[0])))

    res = trace(Net(), (torch.randn(2, 5, 4),))
    for name, d in (("attn.in_proj_weight", 0), ("attn.in_proj_weight", 1), ("inp.weight", 0),
                    ("attn.out_proj.weight", 0), ("attn.out_proj.weight", 1)):
        assert not any(leaf.fixed for leaf in res.params[name].dims[d].leaves())
    assert not res.params["mid.weight"].dims[0].find().fixed
    ops = [o for o in res.ops if o.module == "attn"]
    assert {o.name for o in ops} == {"mha"} and sum(o.flops for o in ops) > 0
    assert "attn" not in res.layers and not res.unsupported and not res.lost
