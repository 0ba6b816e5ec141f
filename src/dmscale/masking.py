"""Insert masks into an unchanged user model (forward hooks + parametrizations) and remove them again."""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator

import torch
import torch.nn as nn
from torch.nn.utils import parametrize

from ._sharded import is_dtensor, is_sharded
from .space import Group, SearchSpace
from .layers.spec import LayerSpec, spec_for
from .trace.tracer import LayerRecord, Space, TraceError, TraceResult
from .trace.registry import first_tensor, tensors

__all__ = ["Masker", "MODES", "MaskingError", "install_checked"]

MODES = ("soft", "hard", "off", "full")  # full: every mask exactly 1 (the user's model, through the masks)


class MaskingError(TraceError):
    """The model with every mask at 1 does not compute what the user's model computes."""


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
    if not is_dtensor(x):
        return mask
    from torch.distributed.tensor import DTensor, Replicate

    return DTensor.from_local(mask.to(x.device), x.device_mesh, [Replicate()] * x.device_mesh.ndim, run_check=False)


def _any_dtensor(mod: nn.Module, attrs: list[str]) -> bool:
    return any(is_dtensor(getattr(mod, a, None)) for a in attrs)


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
        if self.mode == "full":
            for g in self.groups:
                ratio = self.space.ratio(g)
                self.current[g.key] = torch.ones(g.size, dtype=ratio.dtype, device=ratio.device)
                self.current_keep[g.key] = torch.ones(g.size, dtype=torch.bool, device=ratio.device)
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
            self.handles.append(mod.register_forward_hook(self._layer_hook(rec, spec, dims, norm), with_kwargs=True))
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
        self._refresh_hooks(modules)
        self.installed = True

    def _refresh_hooks(self, modules: dict[str, nn.Module]) -> None:
        """Layers that cache references to their parameters (RNNs) re-read them before each forward, and
        fused fast paths that would bypass the masks (``nn.MultiheadAttention`` in eval) are switched off."""
        self.refreshed = []
        for mod in dict.fromkeys(m for m, _ in self.raw):
            spec = spec_for(mod)
            if spec is not None and spec.refresh is not None:
                self.refreshed.append((mod, spec.refresh))
                self.handles.append(mod.register_forward_pre_hook(lambda m, args, fn=spec.refresh: fn(m)))
        if any(isinstance(m, nn.MultiheadAttention) for m in modules.values()):
            self.handles.append(self.model.register_forward_pre_hook(lambda mod, args: self._fastpath(False)))
            self.handles.append(self.model.register_forward_hook(lambda mod, args, out: self._fastpath(True),
                                                                 always_call=True))

    def _fastpath(self, restore: bool) -> None:
        """Switch torch's fused MultiheadAttention / TransformerEncoderLayer eval path off for a masked
        forward (it reads the weights directly and skips the masks' hooks), then restore the setting."""
        mha = getattr(torch.backends, "mha", None)
        if mha is None:
            return
        if not restore:
            self._fastpath_was = mha.get_fastpath_enabled()
            mha.set_fastpath_enabled(False)
        elif getattr(self, "_fastpath_was", None) is not None:
            mha.set_fastpath_enabled(self._fastpath_was)
            self._fastpath_was = None

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
        if self.raw and is_sharded(self.model):
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
        for mod, fn in getattr(self, "refreshed", ()):
            fn(mod)  # drop the references to masked tensors
        self.refreshed = []
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
        """Run forwards with 'soft', 'hard' (export-equivalent), 'off' or 'full' (all ones) masks."""
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
        def hook(mod: nn.Module, args: tuple, kwargs: dict, out: Any) -> Any:
            if self.mode == "off" or not isinstance(out, torch.Tensor):
                return None
            y = out
            if norm is not None:
                keep = self.keep_for(norm)
                x = args[0] if args and isinstance(args[0], torch.Tensor) else \
                    next(v for v in kwargs.values() if isinstance(v, torch.Tensor))
                if spec.norm_applies_mask:  # the layer masks its own output (a skip term keeps the input's mask)
                    m = self.mask_for(norm)
                    return spec.masked_norm(mod, x, keep, None if m is None else m.to(out.dtype))
                if keep is not None:
                    y = spec.masked_norm(mod, x, keep)
            for d, s in dims:
                if (rec.tied or not spec.out_dims) and self.mode == "hard":  # export cannot fold into a shared
                    # weight, nor into a norm without parameters: 0 / 1
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


# --------------------------------------------------------------------------- construction check
def _tolerance(t: torch.Tensor) -> float:
    return 1e-4 if t.dtype in (torch.float32, torch.float64) else 2e-2


def _outputs(out: Any) -> list[torch.Tensor]:
    if hasattr(out, "to_tuple"):
        out = out.to_tuple()
    return [t for t in tensors(out) if t.is_floating_point()]


def _differs(a: torch.Tensor, b: torch.Tensor) -> float | None:
    """Max abs difference when ``b`` is not within tolerance of ``a`` (None when it is)."""
    if a.shape != b.shape:
        return float("inf")
    if a.numel() == 0:
        return None
    af, bf = a.detach().to(torch.float32), b.detach().to(torch.float32)
    tol = _tolerance(a)
    scale = max(1.0, float(af.abs().max()))
    diff = (af - bf).abs()
    ok = bool((diff <= tol * scale + tol * af.abs()).all()) and bool((torch.isfinite(af) == torch.isfinite(bf)).all())
    return None if ok else float(diff.nan_to_num(float("inf")).max())


@torch.no_grad()
def _run(model: nn.Module, inputs: tuple, kwargs: dict, capture: bool) -> tuple[list[torch.Tensor], dict[str, Any]]:
    """Outputs of one eval forward (same seed every time), and optionally every module's first output."""
    seen: dict[str, Any] = {}
    handles = []
    if capture:
        for name, mod in model.named_modules():
            def hook(m, a, out, name=name):
                y = first_tensor(out)
                if y is not None and name not in seen and y.is_floating_point():
                    seen[name] = (type(m).__name__, y.detach().clone())
            handles.append(mod.register_forward_hook(hook))
    was = model.training
    model.eval()
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            out = _outputs(model(*inputs, **kwargs))
    finally:
        model.train(was)
        for h in handles:
            h.remove()
    return [t.detach().clone() for t in out], seen


def install_checked(masker: Masker, inputs: tuple, kwargs: dict) -> None:
    """Install the masks, then check that with every mask at 1 the model computes what it did before.

    Raises :class:`MaskingError` naming the first module whose output changed (the masks are taken
    out again first), so a layer dmscale models wrongly is caught before any search runs. Only
    the model's outputs are kept; module outputs are compared (one more pair of forwards) when
    they differ.
    """
    model = masker.model
    ref, _ = _run(model, inputs, kwargs, capture=False)
    masker.install()
    try:
        with masker.use_mode("full"):
            got, _ = _run(model, inputs, kwargs, capture=False)
        bad = [(i, d) for i, (a, b) in enumerate(zip(ref, got)) if (d := _differs(a, b)) is not None]
        if len(ref) != len(got) or bad:
            with masker.use_mode("off"):  # masks installed but inactive: the model as it was
                _, ref_mods = _run(model, inputs, kwargs, capture=True)
            with masker.use_mode("full"):
                _, got_mods = _run(model, inputs, kwargs, capture=True)
            where = next(((n, got_mods[n][0], d) for n, (_, y) in ref_mods.items()
                          if n in got_mods and (d := _differs(y, got_mods[n][1])) is not None), None)
            what = f"output {bad[0][0]} differs by {bad[0][1]:.3g}" if bad else \
                f"it returns {len(got)} tensors instead of {len(ref)}"
            at = f"; the first module whose output changed is '{where[0] or 'model'}' ({where[1]}, max difference " \
                 f"{where[2]:.3g})" if where is not None else ""
            raise MaskingError(
                f"dmscale: with every mask at 1 the wrapped model does not compute what the model computes "
                f"({what}){at}. dmscale models a layer of this model wrongly: register a LayerSpec for it "
                f"(dmscale.register_layer) or exclude it (exclude=[...]).")
    except BaseException:
        masker.remove()
        raise
