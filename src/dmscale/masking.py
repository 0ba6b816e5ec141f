"""Insert masks into an unchanged user model (forward hooks + parametrizations) and remove them again."""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator

import torch
import torch.nn as nn
from torch.nn.utils import parametrize

from .space import Group, SearchSpace
from .layers.spec import LayerSpec, spec_for
from .trace.tracer import LayerRecord, Space, TraceResult

__all__ = ["Masker", "MODES"]

MODES = ("soft", "hard", "off")


def _along(mask: torch.Tensor, dim: int, ndim: int) -> torch.Tensor:
    """Reshape a 1-D mask to broadcast along ``dim`` of an ``ndim`` tensor."""
    d = dim if dim >= 0 else ndim + dim
    shape = [1] * ndim
    shape[d] = mask.numel()
    return mask.view(shape)


class _Ref:
    """A reference that copy/deepcopy share instead of copying (the masker is not model state)."""

    def __init__(self, obj: Any) -> None:
        self.obj = obj

    def __copy__(self) -> "_Ref":
        return self

    def __deepcopy__(self, memo: dict) -> "_Ref":
        return self


class _RawMask(nn.Module):
    """Parametrization multiplying a raw parameter (e.g. a position embedding) by its masks."""

    def __init__(self, masker: "Masker", dims: list[tuple[int, Space]]) -> None:
        super().__init__()
        self._masker = _Ref(masker)
        self.dims = _Ref(dims)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        m = self._masker.obj
        for d, s in self.dims.obj:
            mk = m.mask_for(s)
            if mk is not None:
                x = x * _dtensor_like(_along(mk.to(x.dtype), d, x.dim()), x)
        return x


# ---------------------------------------------------------------- sharded (DTensor) parameters
# FSDP2 shards a parametrization's ``original``: inside a forward the parametrization sees the
# all-gathered plain weight; read outside one it sees the DTensor shard, and the mask is made a
# replicated DTensor on the same mesh. Parameters that are DTensors when the masks are installed
# are not folded (their layer gets an activation mask); raw ones are refused (see dmscale.distributed).
def _dtensor_like(mask: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    from .distributed import as_dtensor_like, is_dtensor

    return as_dtensor_like(mask, x) if is_dtensor(x) else mask


def _any_dtensor(mod: nn.Module, attrs: list[str]) -> bool:
    from .distributed import is_dtensor

    return any(is_dtensor(getattr(mod, a, None)) for a in attrs)


def _sharded(model: nn.Module) -> bool:
    from .distributed import is_sharded

    return is_sharded(model)


class Masker:
    """Computes every group's mask once per forward and applies it where the trace says."""

    def __init__(self, model: nn.Module, tr: TraceResult, space: SearchSpace, groups: list[Group]) -> None:
        self.model = model
        self.tr = tr
        self.space = space
        self.groups = groups
        self.mode = "soft"
        self.leaf_group: dict[int, Group] = {id(g.space.find()): g for g in groups if g.space is not None}
        self.block_gate: dict[str, tuple[Group, int]] = {}
        for g in groups:
            for i, b in enumerate(g.blocks):
                self.block_gate[b.name] = (g, i)
        self.current: dict[str, torch.Tensor] = {}
        self.current_keep: dict[str, torch.Tensor] = {}
        self._composite: dict[int, torch.Tensor | None] = {}
        self._keep_cache: dict[int, torch.Tensor | None] = {}
        self.on_mask: Callable[[Group, torch.Tensor], None] | None = None  # importance hook installer
        self.handles: list[Any] = []
        self.raw: list[tuple[nn.Module, str]] = []
        self.installed = False
        self._hooked: list[Space] = []  # spaces whose masks layers and parametrizations use
        self.fold = True  # masks of layers whose spec says so go through their weights (see _fold_into_weights)

    # ------------------------------------------------------------------ masks
    def prunable(self, s: Space) -> bool:
        """True when some leaf of this space belongs to a group."""
        return any(id(leaf) in self.leaf_group for leaf in s.leaves())

    def begin_forward(self) -> None:
        """Recompute all group masks for this forward pass (ratios change every step)."""
        self._composite.clear()
        self._keep_cache.clear()
        self.current.clear()
        self.current_keep.clear()
        if self.mode == "off":
            return
        for g in self.groups:
            soft = self.space.soft_mask(g)
            keep = self.space.keep(g, soft)
            self.current_keep[g.key] = keep
            if self.mode == "hard":
                m = keep.to(soft.dtype) if g.kind == "depth" else soft.detach() * keep.to(soft.dtype)
            else:
                m = soft
                if self.on_mask is not None and torch.is_grad_enabled() and m.requires_grad:
                    self.on_mask(g, m)
            self.current[g.key] = m
        # compose every layer's mask here, outside any checkpointed block: non-reentrant activation
        # checkpointing recomputes a block and requires it to save the same tensors as its forward,
        # so inside blocks masks are only looked up (a first-use composition would save more)
        for s in self._hooked:
            self.mask_for(s)

    def _ensure(self) -> None:
        if not self.current and self.mode != "off":
            self.begin_forward()

    def mask_for(self, s: Space) -> torch.Tensor | None:
        """Mask vector of a (possibly composite) space, or None when nothing in it is searched."""
        if self.mode == "off":
            return None
        self._ensure()
        return self._compose(s, self.current, self._composite, torch.mul)

    def keep_for(self, s: Space) -> torch.Tensor | None:
        """Boolean keep vector of a space (hard masks), or None when nothing in it is searched."""
        return self._compose(s, self.current_keep, self._keep_cache, torch.logical_and)

    def _compose(self, s: Space, per_group: dict[str, torch.Tensor], cache: dict[int, torch.Tensor | None],
                 outer: Any) -> torch.Tensor | None:
        """Build a space's vector from its groups' vectors: concatenation, or row-major outer product."""
        root = s.find()
        if id(root) in cache:
            return cache[id(root)]
        out: torch.Tensor | None
        if root.kind == "atomic":
            g = self.leaf_group.get(id(root))
            out = per_group[g.key] if g is not None else None
        else:
            parts = [self._compose(c, per_group, cache, outer) for c in root.children]
            if all(p is None for p in parts):
                out = None
            else:
                ref = next(p for p in parts if p is not None)
                parts = [p if p is not None else torch.ones(c.find().size, dtype=ref.dtype, device=ref.device)
                         for p, c in zip(parts, root.children)]
                if root.kind == "concat":
                    out = torch.cat(parts)
                else:
                    out = parts[0]
                    for p in parts[1:]:
                        out = outer(out[:, None], p[None, :]).reshape(-1)
        cache[id(root)] = out
        return out

    # ------------------------------------------------------------------ hooks
    def install(self) -> None:
        """Attach the hooks and parametrizations (idempotent)."""
        if self.installed:
            return
        modules = dict(self.model.named_modules())
        for rec in self.tr.params.values():  # before anything is attached: all or nothing
            if rec.raw and not rec.is_buffer and _any_dtensor(modules[rec.module], [rec.attr]):
                raise ValueError(f"parameter '{rec.name}' is already sharded (a DTensor): its mask cannot be folded "
                                 "into it; build DMS before fully_shard (see dmscale.distributed)")
        self.handles.append(self.model.register_forward_pre_hook(lambda mod, args: self.begin_forward()))
        for name, rec in self.tr.layers.items():
            dims = [(d, s) for d, s in rec.out_dims.items() if self.prunable(s)]
            norm = rec.norm_space if rec.norm_space is not None and self.prunable(rec.norm_space) else None
            if not dims and norm is None:
                continue
            mod = modules[name]
            spec = _spec(rec, mod)
            self._hooked.extend(s for _, s in dims)
            if self.fold and self._fold_into_weights(mod, rec, spec, dims, norm):
                continue
            self.handles.append(mod.register_forward_hook(self._layer_hook(rec, spec, dims, norm)))
        for bname, (g, i) in self.block_gate.items():
            blk = g.blocks[i]
            self.handles.append(modules[bname].register_forward_hook(self._block_hook(g, i, blk.input_spec),
                                                                     with_kwargs=True))
        for rec in self.tr.params.values():
            if not rec.raw or rec.is_buffer:
                continue
            dims = [(d, s) for d, s in enumerate(rec.dims) if self.prunable(s)]
            if not dims:
                continue
            mod = modules[rec.module]
            self._hooked.extend(s for _, s in dims)
            parametrize.register_parametrization(mod, rec.attr, _RawMask(self, dims), unsafe=True)
            self.raw.append((mod, rec.attr))
        self.installed = True

    def _fold_into_weights(self, mod: nn.Module, rec: LayerRecord, spec: LayerSpec, dims: list[tuple[int, Space]],
                           norm: Space | None) -> bool:
        """Mask a layer whose spec has ``fold_into_weights`` (conv, BatchNorm) through its output-side
        parameters instead of its activation.

        ``m * (W x + b) = (m W) x + m b`` and ``m * BN(x) = BN_{m gamma, m beta}(x)`` exactly, and a
        weight is far smaller than a conv activation (batch x H x W per channel), so this removes
        most of the masking cost on CNNs. Linear layers keep the activation hook (a language
        model's weights outweigh its activations).
        """
        if not spec.fold_into_weights or rec.tied or norm is not None or len(dims) != 1:
            return False
        space = dims[0][1]
        targets = [a for a in spec.out_dims if isinstance(getattr(mod, a, None), nn.Parameter)]
        if spec.out_param not in targets or _any_dtensor(mod, targets):  # sharded: activation mask instead
            return False
        for attr in targets:
            p = getattr(mod, attr)
            if p.shape[spec.out_dims[attr]] != space.find().size:
                return False
        for attr in targets:
            parametrize.register_parametrization(mod, attr, _RawMask(self, [(spec.out_dims[attr], space)]),
                                                 unsafe=True)
            self.raw.append((mod, attr))
        return True

    def remove(self) -> None:
        """Detach everything, leaving the user's model as it was (same parameter objects)."""
        if self.raw and _sharded(self.model):
            raise RuntimeError("the masks cannot be removed from a model sharded with fully_shard (FSDP2 manages "
                               "the parametrized weights): export it with dms.export(), or remove the masks "
                               "before sharding")
        for h in self.handles:
            h.remove()
        self.handles.clear()
        self._hooked.clear()
        for mod, attr in self.raw:
            if parametrize.is_parametrized(mod, attr):
                parametrize.remove_parametrizations(mod, attr, leave_parametrized=False)
        self.raw.clear()
        self.installed = False

    @contextlib.contextmanager
    def detached(self) -> Iterator[None]:
        """Temporarily remove all masks (to copy the plain model), then put them back."""
        was = self.installed
        self.remove()
        try:
            yield
        finally:
            if was:
                self.install()

    @contextlib.contextmanager
    def use_mode(self, mode: str) -> Iterator[None]:
        """Run forwards with 'soft', 'hard' (export-equivalent) or 'off' masks."""
        if mode not in MODES:
            raise ValueError(f"mask mode must be one of {MODES}, got {mode!r}")
        old = self.mode
        self.mode = mode
        try:
            yield
        finally:
            self.mode = old
            self.current.clear()
            self._composite.clear()

    def _layer_hook(self, rec: LayerRecord, spec: LayerSpec, dims: list[tuple[int, Space]], norm: Space | None):
        def hook(mod: nn.Module, args: tuple, out: Any) -> Any:
            if self.mode == "off" or not isinstance(out, torch.Tensor):
                return None
            y = out
            if norm is not None:
                keep = self.keep_for(norm)
                if keep is not None:
                    y = spec.masked_norm(mod, args[0], keep)
            for d, s in dims:
                if rec.tied and self.mode == "hard":  # export cannot fold into a shared weight
                    k = self.keep_for(s)
                    m = None if k is None else k.to(y.dtype)
                else:
                    m = self.mask_for(s)
                if m is not None:
                    y = y * _along(m.to(y.dtype), d, y.dim())
            return y
        return hook

    def _block_hook(self, g: Group, i: int, spec: tuple[str, Any]):
        def hook(mod: nn.Module, args: tuple, kwargs: dict, out: Any) -> Any:
            if self.mode == "off":
                return None
            x = args[spec[1]] if spec[0] == "arg" else kwargs.get(spec[1])
            self._ensure()
            gate = self.current[g.key][i]
            if isinstance(out, torch.Tensor):
                y, rest = out, None
            elif isinstance(out, tuple) and out and isinstance(out[0], torch.Tensor):
                y, rest = out[0], out[1:]
            else:
                return None
            if self.mode == "hard":
                new = y if bool(gate > 0.5) else x
            else:
                new = x + gate.to(y.dtype) * (y - x)
            return new if rest is None else (new,) + tuple(rest)
        return hook


def _spec(rec: LayerRecord, mod: nn.Module) -> LayerSpec:
    """The spec a layer record was traced with (looked up for records made without one)."""
    spec = rec.spec if rec.spec is not None else spec_for(mod)
    if spec is None:
        raise ValueError(f"layer '{rec.module}' ({type(mod).__name__}) has no LayerSpec")
    return spec
