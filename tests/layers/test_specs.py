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
    (LlamaLikeRMSNorm(6), "rmsnorm", {"hidden_size": 6}),
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
    assert spec.kind == "mha" and not spec.maskable and spec.trace_unit is not None
    assert layer_kind(mha) is None and spec.sizes(mha) == {"embed_dim": 8}
    mha_kv = nn.MultiheadAttention(8, 2, kdim=5, vdim=3)
    assert spec_for(mha_kv).sizes(mha_kv) == {"embed_dim": 8}


def test_lookup_by_name_and_by_subclass():
    assert is_rmsnorm(LlamaLikeRMSNorm(3)) and spec_for(LlamaLikeRMSNorm(3)).kind == "rmsnorm"

    class MyConv(nn.Conv2d):
        pass

    assert spec_for(MyConv(2, 3, 1)).kind == "conv"
    assert spec_for(nn.ReLU()) is None and layer_kind(nn.ReLU()) is None
    assert spec_for(nn.ConvTranspose2d(2, 3, 1)) is None  # not modelled yet: traced through its ops


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


def test_masked_norms_with_every_channel_kept_equal_the_layer():
    x = torch.randn(3, 5, 8)
    keep = torch.ones(8, dtype=torch.bool)
    for mod in (nn.LayerNorm(8), nn.RMSNorm(8, eps=1e-5), LlamaLikeRMSNorm(8)):
        with torch.no_grad():
            mod.weight.uniform_(0.5, 1.5)
        spec = spec_for(mod)
        torch.testing.assert_close(spec.masked_norm(mod, x, keep), mod(x), atol=1e-5, rtol=1e-5)


def test_masked_layernorm_equals_the_smaller_layer_on_kept_channels():
    mod = nn.LayerNorm(8)
    with torch.no_grad():
        mod.weight.uniform_(0.5, 1.5)
        mod.bias.normal_()
    keep = torch.tensor([1, 0, 1, 1, 0, 1, 1, 0], dtype=torch.bool)
    x = torch.randn(4, 8)
    small = nn.LayerNorm(int(keep.sum()))
    with torch.no_grad():
        small.weight.copy_(mod.weight[keep])
        small.bias.copy_(mod.bias[keep])
    got = spec_for(mod).masked_norm(mod, x, keep)[:, keep]
    torch.testing.assert_close(got, small(x[:, keep]))


def test_layer_records_carry_their_spec():
    model = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 8), LlamaLikeRMSNorm(8), nn.Linear(8, 2))
    res = trace(model, (torch.randn(3, 4),))
    assert {n: r.kind for n, r in res.layers.items()} == {"0": "linear", "1": "layernorm", "2": "linear",
                                                          "3": "rmsnorm", "4": "linear"}
    assert all(r.spec is spec_for(model[int(n)]) for n, r in res.layers.items())
    assert res.layers["1"].norm_space is not None and res.layers["3"].norm_space is not None
    # RMSNorm is traced as a unit: its weight is tied to the residual width it normalises
    assert res.params["3.weight"].dims[0].find() is res.params["2.weight"].dims[0].find()


def test_layernorm_subclass_with_its_own_forward_is_left_unpruned():
    class ChannelsFirstLN(nn.LayerNorm):
        def forward(self, x):
            return super().forward(x.transpose(1, -1)).transpose(1, -1)

    model = nn.Sequential(nn.Conv1d(3, 8, 1), ChannelsFirstLN(8), nn.Conv1d(8, 2, 1))
    res = trace(model, (torch.randn(2, 3, 5),))
    assert "1" not in res.layers
    assert res.params["1.weight"].dims[0].find().fixed


@pytest.mark.parametrize("kwargs,match", [
    ({"kind": ""}, "kind must be a non-empty string"),
    ({"kind": "x", "out_dims": {"weight": "0"}}, "out_dims must map"),
    ({"kind": "x", "out_dims": {"weight": True}}, "out_dims must map"),
    ({"kind": "x", "fold_into_weights": True}, "need out_dims"),
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


def test_multihead_attention_is_traced_as_an_unsearched_unit():
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
    for name in ("attn.in_proj_weight", "inp.weight"):
        assert all(s.find().fixed for s in res.params[name].dims[:1])
    assert any("MultiheadAttention 'attn' is not searched" in r
               for r in res.params["attn.in_proj_weight"].dims[0].find().fix_reasons)
    assert not res.params["mid.weight"].dims[0].find().fixed  # after the unit, search goes on
    (op,) = [o for o in res.ops if o.module == "attn"]
    assert op.name == "MultiheadAttention" and op.flops > 0 and op.dims == []
    assert "attn" not in res.layers and not res.unsupported
