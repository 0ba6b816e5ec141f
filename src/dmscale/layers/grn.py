"""Global Response Normalization (ConvNeXt-V2's GRN), channels last::

    g = ||x||_2 over the spatial dims        (one value per sample and channel)
    y = w * (x * g / (mean_c(g) + 1e-6)) + b + x

The mean runs over the channels, so with pruned channels it runs over the kept ones (what the
exported layer computes). The ``+ x`` skip already carries the mask of the layer that produced
``x``, so the layer applies its output mask to ``w * (...) + b`` only: ``m * (w * ... + b) + x``,
which is exactly the export with ``m`` folded into ``w`` and ``b``. A module is taken for a GRN
when its class name says so and its forward computes the formula above on the example input;
otherwise its channels stay fixed, with the reason named.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from ..trace.registry import first_tensor
from ..trace.spaces import fix, union
from .spec import LayerSpec, register_matcher

__all__ = ["is_grn", "grn", "GRN_SPEC"]

EPS = 1e-6


def is_grn(m: nn.Module) -> bool:
    """A GRN-named module with ``weight`` and ``bias`` of shape (1, 1, 1, C) (Hugging Face's ConvNextV2GRN)."""
    name = type(m).__name__
    if "GRN" not in name and "GlobalResponseNorm" not in name:
        return False
    w, b = getattr(m, "weight", None), getattr(m, "bias", None)
    return (isinstance(w, nn.Parameter) and isinstance(b, nn.Parameter) and w.shape == b.shape and w.dim() == 4
            and tuple(w.shape[:3]) == (1, 1, 1))


def grn(module: nn.Module, x: torch.Tensor, keep: torch.Tensor | None = None,
        mask: torch.Tensor | None = None) -> torch.Tensor:
    """GRN with the channel mean over ``keep`` (all channels: None) and output mask ``mask`` (see the module
    docstring)."""
    g = torch.linalg.vector_norm(x, ord=2, dim=(1, 2), keepdim=True)
    if keep is None:
        mean = g.mean(dim=-1, keepdim=True)
    else:
        k = keep.to(g.dtype)
        mean = (g * k).sum(dim=-1, keepdim=True) / k.sum().clamp_min(1.0)
    y = module.weight * (x * (g / (mean + EPS))) + module.bias
    if mask is not None:
        y = y * mask
    return y + x


def _trace_unit(tr, mod: nn.Module, name: str, x: torch.Tensor | None, output: Any, flops: float) -> None:
    y = first_tensor(output)
    if x is None or y is None or x.dim() != 4 or tuple(y.shape) != tuple(x.shape) or x.shape[-1] != mod.weight.shape[-1]:
        for p in (mod.weight, mod.bias):
            fix(tr.get(p)[3], f"{type(mod).__name__} '{name}' is called on an input dmscale does not model as a GRN")
        if y is not None:
            tr.set(y, tr.fresh(y, f"GRN '{name}'", fixed=True))
        return
    xd = list(tr.get(x))
    flops_before, tr.leaf_depth = tr.counter.total, tr.leaf_depth + 1  # the check's ops are not part of the trace
    try:
        with torch.no_grad():
            same = torch.allclose(grn(mod, x.detach()), y.detach(), rtol=1e-4, atol=1e-5)
    finally:
        tr.leaf_depth, tr.counter.total = tr.leaf_depth - 1, flops_before
    if not same:
        fix(xd[-1], f"{type(mod).__name__} '{name}' does not compute the GRN formula dmscale models")
    for p in (mod.weight, mod.bias):
        union(tr.get(p)[3], xd[-1])
    tr.set(y, xd)
    tr.record_op("grn", flops, [])


GRN_SPEC = LayerSpec("grn", out_dims={"weight": 3, "bias": 3}, trace_unit=_trace_unit, masked_norm=grn,
                     norm_applies_mask=True)
register_matcher(is_grn, GRN_SPEC)
