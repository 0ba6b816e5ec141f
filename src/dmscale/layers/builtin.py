"""Built-in LayerSpecs: torch's Linear, Conv1d/2d/3d, BatchNorm, LayerNorm, GroupNorm, RMSNorm,
Embedding, Hugging Face's GPT-2 ``Conv1D`` (MultiheadAttention: :mod:`.mha`, RNNs: :mod:`.rnn`). Norm layers of any class are
recognised by what they compute (:mod:`dmscale.layers.norms`), not by these specs.

Also the reusable pieces a user's spec can take: :func:`linear_unit` (trace a layer that computes
``x @ W (+ b)`` as one unit, whatever ops it uses inside) and :func:`opaque_unit` (trace it as one
unit and leave everything it touches unpruned).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from ..trace.registry import first_tensor, tensors
from ..trace.spaces import fix, union
from .predicates import is_hf_conv1d, is_rmsnorm
from .spec import LayerSpec, _register_builtin, register_matcher

__all__ = ["linear_unit", "opaque_unit", "is_rmsnorm", "is_hf_conv1d", "LINEAR", "CONV", "CONV_TRANSPOSE", "BATCHNORM", "LAYERNORM",
           "GROUPNORM", "RMSNORM", "EMBEDDING", "HF_CONV1D"]


# --------------------------------------------------------------------------- trace units
def linear_unit(weight: str = "weight", in_dim: int = 1, out_dim: int = 0, bias: str | None = "bias",
                op: str = "linear"):
    """A ``trace_unit`` for a layer computing ``y[..., o] = sum_i x[..., i] W[i ↔ in_dim, o ↔ out_dim] (+ b[o])``.

    Couples x[-1] with ``weight[in_dim]`` and ``bias[0]`` with ``weight[out_dim]``; the output is
    x[:-1] + [weight[out_dim]]; its FLOPs (measured inside the layer) scale with both channel dims.
    """

    def trace_unit(tr, mod: nn.Module, name: str, x: torch.Tensor | None, output: Any, flops: float) -> None:
        w = getattr(mod, weight)
        y = first_tensor(output)
        xd, wd = tr.get(x), tr.get(w)
        union(xd[-1], wd[in_dim])
        b = getattr(mod, bias, None) if bias is not None else None
        if isinstance(b, torch.Tensor):
            union(tr.get(b)[0], wd[out_dim])
        od = list(xd[:-1]) + [wd[out_dim]]
        tr.set(y, od)
        tr.record_op(op, flops, od + [wd[in_dim]])

    return trace_unit


def opaque_unit(tr, mod: nn.Module, name: str, x: torch.Tensor | None, output: Any, flops: float) -> None:
    """A ``trace_unit`` that fixes every dim of the layer's input, outputs and parameters (not searched);
    its FLOPs are counted at full size."""
    ins = [x] if isinstance(x, torch.Tensor) else []
    for t in ins + tensors(output):
        for s in tr.get(t):
            fix(s, f"{type(mod).__name__} '{name}' is not searched")
    for p in mod.parameters():
        for s in tr.get(p):
            fix(s, f"{type(mod).__name__} '{name}' is not searched")
    tr.record_op(type(mod).__name__, flops, [])


# --------------------------------------------------------------------------- size attributes
def _weight(mod: nn.Module) -> torch.Tensor | None:
    w = getattr(mod, "weight", None)
    return w if isinstance(w, torch.Tensor) else None


def _linear_sizes(mod: nn.Module) -> dict[str, Any]:
    w = mod.weight
    return {"out_features": w.shape[0], "in_features": w.shape[1]}


def _conv_sizes(mod: nn.Module) -> dict[str, Any]:
    w = mod.weight
    return {"out_channels": w.shape[0], "in_channels": w.shape[1] * mod.groups}


def _conv_update(mod: nn.Module) -> None:
    out_c, in_per_group = mod.weight.shape[0], mod.weight.shape[1]
    if mod.groups > 1 and in_per_group == 1 and mod.groups == mod.in_channels == mod.out_channels:
        mod.groups = out_c  # depthwise stays depthwise
        mod.in_channels = out_c
    else:
        mod.in_channels = in_per_group * mod.groups
    mod.out_channels = out_c


def _conv_transpose_sizes(mod: nn.Module) -> dict[str, Any]:
    w = mod.weight  # (in, out / groups, *kernel)
    return {"in_channels": w.shape[0], "out_channels": w.shape[1] * mod.groups}


def _batchnorm_sizes(mod: nn.Module) -> dict[str, Any]:
    t = _weight(mod)
    if t is None:
        t = getattr(mod, "running_mean", None)
    return {"num_features": t.shape[0]} if isinstance(t, torch.Tensor) else {}


def _layernorm_sizes(mod: nn.Module) -> dict[str, Any]:
    w = _weight(mod)
    return {"normalized_shape": tuple(w.shape)} if w is not None else {}


def _groupnorm_sizes(mod: nn.Module) -> dict[str, Any]:
    w = _weight(mod)
    return {"num_channels": w.shape[0]} if w is not None else {}


def _groupnorm_update(mod: nn.Module) -> None:
    c = mod.weight.shape[0]
    if mod.num_groups == mod.num_channels:
        mod.num_groups = c  # one group per channel stays so
    mod.num_channels = c


def _rmsnorm_sizes(mod: nn.Module) -> dict[str, Any]:
    w = _weight(mod)
    if w is None:
        return {}
    if isinstance(mod, getattr(nn, "RMSNorm", ())):
        return {"normalized_shape": tuple(w.shape)}
    if isinstance(getattr(mod, "hidden_size", None), int):
        return {"hidden_size": w.shape[0]}
    return {}


def _embedding_sizes(mod: nn.Module) -> dict[str, Any]:
    w = mod.weight
    return {"num_embeddings": w.shape[0], "embedding_dim": w.shape[1]}


def _hf_conv1d_sizes(mod: nn.Module) -> dict[str, Any]:
    w = mod.weight  # (in, out)
    return {"nf": w.shape[1], "nx": w.shape[0]}


# --------------------------------------------------------------------------- the specs
LINEAR = LayerSpec("linear", out_dims={"weight": 0, "bias": 0}, size_attrs=_linear_sizes)
CONV = LayerSpec("conv", out_dims={"weight": 0, "bias": 0}, fold_into_weights=True, size_attrs=_conv_sizes,
                 update_attrs=_conv_update)
CONV_TRANSPOSE = LayerSpec("conv_transpose", out_dims={"weight": 1, "bias": 0}, fold_into_weights=True,
                          size_attrs=_conv_transpose_sizes)
BATCHNORM = LayerSpec("batchnorm", out_dims={"weight": 0, "bias": 0},
                      params=("weight", "bias", "running_mean", "running_var", "num_batches_tracked"),
                      fold_into_weights=True, size_attrs=_batchnorm_sizes)
# norms: recognised by what they compute when traced (layers/norms.py builds the spec that masks them);
# these give the size attributes of torch's own classes
LAYERNORM = LayerSpec("layernorm", out_dims={"weight": 0, "bias": 0}, size_attrs=_layernorm_sizes)
GROUPNORM = LayerSpec("groupnorm", out_dims={"weight": 0, "bias": 0}, size_attrs=_groupnorm_sizes,
                      update_attrs=_groupnorm_update)
RMSNORM = LayerSpec("rmsnorm", out_dims={"weight": 0}, size_attrs=_rmsnorm_sizes)
EMBEDDING = LayerSpec("embedding", out_dims={"weight": 1}, size_attrs=_embedding_sizes)
HF_CONV1D = LayerSpec("hf_conv1d", out_dims={"weight": 1, "bias": 0},
                      trace_unit=linear_unit(in_dim=0, out_dim=1, op="hf_conv1d"), size_attrs=_hf_conv1d_sizes)

register_matcher(is_hf_conv1d, HF_CONV1D)
_register_builtin((nn.Linear,), LINEAR)
_register_builtin((nn.Conv1d, nn.Conv2d, nn.Conv3d), CONV)
_register_builtin((nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d), CONV_TRANSPOSE)
_register_builtin((nn.modules.batchnorm._BatchNorm,), BATCHNORM)
_register_builtin((nn.LayerNorm,), LAYERNORM)
if hasattr(nn, "RMSNorm"):
    _register_builtin((nn.RMSNorm,), RMSNORM)
_register_builtin((nn.GroupNorm,), GROUPNORM)
_register_builtin((nn.Embedding, nn.EmbeddingBag), EMBEDDING)
