"""Layers whose weight is weight-normalised: ``W = g * v / ||v||`` (``torch.nn.utils.parametrizations.weight_norm``,
and the legacy hook form ``torch.nn.utils.weight_norm``).

The norm ``||v||`` is taken over every dim of ``v`` except ``dim`` (``dim=0``, the default: one norm per
output channel of a Linear / Conv; ``dim=None``: one norm over the whole tensor). The trace sees the op
``_weight_norm(v, g, dim)``: its result has the dims of ``v`` and ``g`` is tied to ``v``'s dim ``dim``
(rule in :mod:`dmscale.trace.rules.norm`), so the layer is traced, masked and searched like the layer
without weight norm.

What the masked supernet computes: the layer with its weight ``W`` as it is (the norm over *all* of
``v``'s elements), its input channels masked upstream and its output channels masked at its output,
as for any layer. The export slices ``v`` and ``g`` and rescales ``g`` so that the smaller layer,
still weight-normalised, computes exactly the kept part of ``m * W`` (``m``: the surviving output-mask
values): with ``c = g / ||v||`` per normalised slice, ``g' = c[kept] * ||v'||``, so ``g' v' / ||v'||
= c[kept] v' = W[kept]`` whichever of ``v``'s dims were sliced.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.nn.utils import parametrize

__all__ = ["WeightNormed", "weight_norm_of", "weight_norms", "begin_export", "fold_weight_norm", "finish_export",
           "detach_legacy_weights"]


@dataclass(frozen=True)
class WeightNormed:
    """Where the ``g`` / ``v`` of a weight-normalised attribute ``attr`` of a module live."""

    attr: str  # the layer's attribute the weight norm computes ("weight")
    holder: str  # the module holding g and v, relative to the layer ("parametrizations.weight" or "")
    g: str  # attribute names on the holder
    v: str
    dim: int  # the dim of v that keeps one norm per slice (-1: one norm over the whole tensor)
    legacy: bool  # the torch.nn.utils.weight_norm hook form (the module keeps W as a plain attribute)

    def tensors(self, mod: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        """The stored (g, v) of the module."""
        holder = mod.get_submodule(self.holder) if self.holder else mod
        return getattr(holder, self.g), getattr(holder, self.v)

    def qualified(self, layer: str) -> tuple[str, str]:
        """The qualified names of (g, v) in the model, for a layer at ``layer``."""
        prefix = ".".join(p for p in (layer, self.holder) if p)
        return tuple(f"{prefix}.{n}" if prefix else n for n in (self.g, self.v))  # type: ignore[return-value]

    def norm_dim(self, v: torch.Tensor) -> int | None:
        """The dim of ``v`` that has one norm per slice (None: one norm over the whole tensor)."""
        return None if self.dim == -1 else self.dim % v.dim()


def weight_norm_of(mod: nn.Module, attr: str) -> WeightNormed | None:
    """How ``mod.attr`` is weight-normalised, or None when it is not (or not by torch's weight norm alone)."""
    from torch.nn.utils.parametrizations import _WeightNorm
    from torch.nn.utils.weight_norm import WeightNorm

    if parametrize.is_parametrized(mod, attr):
        plist = mod.parametrizations[attr]
        if len(plist) == 1 and type(plist[0]) is _WeightNorm and hasattr(plist, "original1"):
            return WeightNormed(attr, f"parametrizations.{attr}", "original0", "original1", int(plist[0].dim), False)
        return None
    for hook in mod._forward_pre_hooks.values():
        if isinstance(hook, WeightNorm) and hook.name == attr:
            return WeightNormed(attr, "", f"{attr}_g", f"{attr}_v", int(hook.dim), True)
    return None


def weight_norms(mod: nn.Module) -> dict[str, WeightNormed]:
    """Every weight-normalised attribute of a module (parametrized or legacy hook form)."""
    names = list(getattr(mod, "parametrizations", {}) or {})
    from torch.nn.utils.weight_norm import WeightNorm

    names += [h.name for h in mod._forward_pre_hooks.values() if isinstance(h, WeightNorm)]
    found = {a: weight_norm_of(mod, a) for a in dict.fromkeys(names)}
    return {a: w for a, w in found.items() if w is not None}


def _norm(wn: WeightNormed, v: torch.Tensor) -> torch.Tensor:
    return torch.norm_except_dim(v, 2, wn.dim)


@torch.no_grad()
def begin_export(mod: nn.Module, wn: WeightNormed) -> None:
    """Before export slices ``g`` and ``v``: store ``c = g / ||v||`` (the factor of each normalised slice) in ``g``."""
    g, v = wn.tensors(mod)
    g.copy_(g / _norm(wn, v).to(g.dtype))


@torch.no_grad()
def fold_weight_norm(mod: nn.Module, wn: WeightNormed, dim: int, m: torch.Tensor) -> None:
    """Fold output-mask values ``m`` along ``dim`` of W (between :func:`begin_export` and :func:`finish_export`):
    into the per-slice factor when the norm is per slice of that dim, else into ``v``."""
    g, v = wn.tensors(mod)
    d = dim % v.dim()
    target = g if wn.norm_dim(v) == d and g.dim() == v.dim() else v
    shape = [1] * target.dim()
    shape[d] = m.numel()
    target.mul_(m.to(target.dtype).view(shape))


@torch.no_grad()
def finish_export(mod: nn.Module, wn: WeightNormed) -> None:
    """After slicing: ``g = c * ||v||``, so the layer computes the kept part of ``c * v`` (the supernet's W)."""
    g, v = wn.tensors(mod)
    g.mul_(_norm(wn, v).to(g.dtype))
    if wn.legacy:  # the hook form keeps W as a plain attribute until the next forward: recompute it now
        setattr(mod, wn.attr, torch._weight_norm(v, g, wn.dim))


def detach_legacy_weights(model: nn.Module) -> None:
    """Detach the W that the legacy hook form keeps as a plain attribute (recomputed by the next forward anyway):
    after a forward with gradients it is not a leaf, and ``copy.deepcopy`` (export) refuses such a tensor."""
    for mod in model.modules():
        for attr, wn in weight_norms(mod).items():
            w = getattr(mod, attr, None) if wn.legacy else None
            if isinstance(w, torch.Tensor) and not w.is_leaf:
                setattr(mod, attr, w.detach())
