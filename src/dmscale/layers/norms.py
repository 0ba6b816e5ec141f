"""Normalisation layers recognised by what they compute, not by their class name.

A module is a *norm candidate* when its only parameters are one or two 1-D tensors of one size
``n`` (a scale such as ``weight`` and optionally a shift such as ``bias``), it has no child
modules, and it maps a tensor whose last dim (channels last) or dim 1 (channels first) has size
``n`` to a tensor of the same shape. The tracer then *probes* it: it runs the module on the
example activation and on a random input with random parameters, and compares the results
with every :class:`NormForm`:

    y = (x - mean(x)) / sqrt(var(x) + eps) * (offset + w) + b      (LayerNorm, center=True)
    y = x / sqrt(mean(x^2) + eps) * (offset + w)                   (RMSNorm, center=False)

over the last dim or over dim 1, with ``offset`` 0 (the usual ``y * w``) or 1 (Gemma's
``y * (1 + w)``), statistics in float32 (T5 style). A module that matches one form is traced as
one unit, and the search masks it with that form's statistics over the kept channels only (what
the smaller exported layer computes); export folds surviving mask values into its parameters
in a way that respects the offset. A module that matches no form is traced through its ops (the
reduction over its channels then keeps them unpruned, and the lost dimension is reported).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from ..trace.registry import first_tensor
from ..trace.spaces import fix, union
from .spec import LayerSpec

__all__ = ["NormForm", "norm_candidate", "identify_norm", "norm_spec", "SCALE_NAMES", "SHIFT_NAMES"]

SCALE_NAMES = ("weight", "scale", "gamma", "g")
SHIFT_NAMES = ("bias", "beta", "b", "shift")
# attributes a norm module may keep its size in (set from the sliced weights on export)
SIZE_NAMES = ("hidden_size", "dim", "d_model", "num_features", "num_channels", "embed_dim", "n_embd", "channels",
              "features", "size")
_EPS_NAMES = ("eps", "variance_epsilon", "epsilon", "layer_norm_eps", "norm_eps", "rms_norm_eps")
_DEFAULT_EPS = (1e-5, 1e-6, 1e-12, 1e-8)


def _stat_dtype(x: torch.Tensor) -> torch.dtype:
    """Statistics in float32 at least (T5 style), float64 for a float64 model."""
    return torch.promote_types(x.dtype, torch.float32)


@dataclass(frozen=True)
class NormForm:
    """One normalisation formula (see the module docstring)."""

    center: bool  # subtract the mean (LayerNorm) or not (RMSNorm)
    offset: float  # y * (offset + w): 0.0 or 1.0
    dim: int  # normalised dim: -1 (channels last) or 1 (channels first)
    eps: float
    scale: str | None  # parameter names on the module
    shift: str | None

    @property
    def kind(self) -> str:
        return "layernorm" if self.center else "rmsnorm"

    def _param(self, module: nn.Module, name: str | None, x: torch.Tensor) -> torch.Tensor | None:
        if name is None:
            return None
        p = getattr(module, name)
        d = self.dim % x.dim()
        shape = [1] * x.dim()
        shape[d] = p.numel()
        return p.to(_stat_dtype(x)).reshape(shape)

    def apply(self, module: nn.Module, x: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        """The norm of ``x`` with statistics over the channels where ``keep`` is True (all when None)."""
        d = self.dim % x.dim()
        xf = x.to(_stat_dtype(x))
        if keep is None:
            mean = xf.mean(d, keepdim=True) if self.center else None
            xc = xf - mean if mean is not None else xf
            var = (xc * xc).mean(d, keepdim=True)
        else:
            shape = [1] * x.dim()
            shape[d] = keep.numel()
            h = keep.to(xf.dtype).reshape(shape)
            n = h.sum().clamp_min(1.0)
            mean = (xf * h).sum(d, keepdim=True) / n if self.center else None
            xc = xf - mean if mean is not None else xf
            var = (xc * xc * h).sum(d, keepdim=True) / n
        y = xc * torch.rsqrt(var + self.eps)
        w = self._param(module, self.scale, x)
        if w is not None:
            y = y * (w + self.offset) if self.offset else y * w
        b = self._param(module, self.shift, x)
        if b is not None:
            y = y + b
        return y.to(x.dtype)

    def fold(self, module: nn.Module, m: torch.Tensor) -> None:
        """Fold output-mask values ``m`` into the parameters: ``m * norm(x) (offset + w) + m b``."""
        if self.scale is not None:
            w = getattr(module, self.scale)
            w.copy_((w.to(torch.float32) + self.offset) * m.to(torch.float32) - self.offset)
        if self.shift is not None:
            b = getattr(module, self.shift)
            b.mul_(m.to(b.dtype))


def _norm_params(module: nn.Module) -> tuple[str | None, str | None, int] | None:
    """(scale name, shift name, size) when the module's parameters look like a norm's, else None."""
    if any(True for _ in module.children()):
        return None
    params = {n: p for n, p in module.named_parameters(recurse=False) if p is not None}
    if not params or len(params) > 2 or any(p.dim() != 1 for p in params.values()):
        return None
    sizes = {p.numel() for p in params.values()}
    if len(sizes) != 1:
        return None
    n = sizes.pop()
    scale = next((k for k in SCALE_NAMES if k in params), None)
    shift = next((k for k in SHIFT_NAMES if k in params), None)
    if len(params) != (scale is not None) + (shift is not None) or scale is None or n < 2:
        return None
    return scale, shift, n


def _paramless_candidate(module: nn.Module) -> bool:
    """A module without parameters or children that may be a norm without affine parameters: ``nn.LayerNorm`` /
    ``nn.RMSNorm`` with ``elementwise_affine=False``, or a class whose name says it normalises (OLMo's LayerNorm)."""
    if any(True for _ in module.children()) or any(True for _ in module.parameters(recurse=False)):
        return False
    return "norm" in type(module).__name__.lower() and "normalize" not in type(module).__name__.lower()


def norm_candidate(module: nn.Module) -> bool:
    """True when the module's parameters have the shape of a norm's, or it has none and its class is a norm
    (see the module docstring)."""
    return _norm_params(module) is not None or _paramless_candidate(module)


def _eps_candidates(module: nn.Module) -> list[float]:
    out: list[float] = []
    for name in _EPS_NAMES:
        v = getattr(module, name, None)
        if isinstance(v, float) and 0.0 <= v < 1.0:
            out.append(v)
    for v in vars(module).values():
        if type(v) is float and 0.0 < v < 1e-1 and v not in out:
            out.append(v)
    out.extend(e for e in _DEFAULT_EPS if e not in out)
    return out


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.shape != b.shape or not bool(torch.isfinite(b).all()):
        return False
    tol = 1e-4 if a.dtype in (torch.float32, torch.float64) else 2e-2
    scale = max(1.0, float(b.abs().max())) if b.numel() else 1.0
    return bool(((a.to(torch.float32) - b.to(torch.float32)).abs() <= tol * scale).all())


@torch.no_grad()
def identify_norm(module: nn.Module, args: tuple, kwargs: dict) -> NormForm | None:
    """The :class:`NormForm` the module computes on this input (None: it is not a norm dmscale models).

    Runs ``module.forward`` on the given input with the module's parameters and on a random input
    with random parameters (restored afterwards; the global RNG is not used).
    """
    info = _norm_params(module)
    if info is None and not _paramless_candidate(module):
        return None
    scale, shift, n = info if info is not None else (None, None, None)
    x = args[0] if args and isinstance(args[0], torch.Tensor) else None
    if x is None:
        x = next((v for v in kwargs.values() if isinstance(v, torch.Tensor)), None)
    if x is None or not x.is_floating_point() or x.dim() < 1 or x.numel() == 0:
        return None
    dims = [d for d in (-1, 1) if x.dim() > (d % x.dim()) and (x.shape[d] == n or n is None and x.shape[d] >= 2)
            and (d == -1 or x.dim() >= 3)]
    if not dims:
        return None
    try:
        y = first_tensor(module.forward(*args, **kwargs))
    except Exception:
        return None
    if not isinstance(y, torch.Tensor) or y.shape != x.shape:
        return None
    gen = torch.Generator(device=x.device)
    gen.manual_seed(1234)
    small = x[:1] if x.dim() > 1 else x
    xr = (torch.randn(small.shape, generator=gen, device=x.device) * 2.0 + 0.7).to(x.dtype)
    params = {k: getattr(module, k) for k in (scale, shift) if k is not None}
    saved = {k: p.detach().clone() for k, p in params.items()}
    try:
        for k, p in params.items():
            p.copy_(torch.randn(p.shape, generator=gen, device=p.device).to(p.dtype) * 0.7 + 0.3)
        rargs = (xr,) + tuple(args[1:]) if args and args[0] is x else args
        rkwargs = {k: (xr if v is x else v) for k, v in kwargs.items()}
        yr = first_tensor(module.forward(*rargs, **rkwargs))
        if not isinstance(yr, torch.Tensor) or yr.shape != xr.shape:
            return None
        found = None
        for d in dims:
            for center in (True, False):
                for offset in ((0.0, 1.0) if scale is not None else (0.0,)):
                    form = NormForm(center, offset, d, _eps_candidates(module)[0], scale, shift)
                    if _close(form.apply(module, xr), yr):
                        found = form
                        break
                if found:
                    break
            if found:
                break
        if found is None:
            return None
        # the eps that reproduces the random-input output best
        best = min(_eps_candidates(module), key=lambda e: float(
            (_replace_eps(found, e).apply(module, xr).float() - yr.float()).abs().max()))
        found = _replace_eps(found, best)
    except Exception:
        return None
    finally:
        for k, p in params.items():
            p.copy_(saved[k])
    return found if _close(found.apply(module, x), y) else None


def _replace_eps(form: NormForm, eps: float) -> NormForm:
    return NormForm(form.center, form.offset, form.dim, eps, form.scale, form.shift)


# --------------------------------------------------------------------------- the spec of a recognised norm
def _norm_unit(form: NormForm):
    def trace_unit(tr, mod: nn.Module, name: str, x: torch.Tensor | None, output: Any, flops: float) -> None:
        y = first_tensor(output)
        xd = list(tr.get(x))
        d = form.dim % x.dim()
        for pname in (form.scale, form.shift):
            if pname is not None:
                p = getattr(mod, pname)
                if p.numel() == x.shape[d]:
                    union(tr.get(p)[0], xd[d])
                else:
                    fix(tr.get(p)[0], f"{type(mod).__name__} '{name}' called on another width")
        if y is not None and tuple(y.shape) == tuple(x.shape):
            tr.set(y, xd)
        if form.scale is None and form.shift is None:  # no weights to read the kept size off at export
            for a in ("normalized_shape",) + SIZE_NAMES:
                v = vars(mod).get(a)
                if v == (x.shape[d],) or type(v) is int and v == x.shape[d]:
                    tr.record_size_attr(a, xd[d], name)
        tr.record_op(form.kind, flops, [])
    return trace_unit


def _generic_sizes(form: NormForm):
    def size_attrs(mod: nn.Module) -> dict[str, Any]:
        if form.scale is None and form.shift is None:
            return {}  # no weights: export sets the sizes the trace recorded (SizeAttrRecord)
        n = getattr(mod, form.scale or form.shift).numel()
        out: dict[str, Any] = {}
        ns = getattr(mod, "normalized_shape", None)
        if isinstance(ns, (tuple, list)) and len(ns) == 1:
            out["normalized_shape"] = (n,)
        for a in SIZE_NAMES:
            if type(vars(mod).get(a)) is int:
                out[a] = n
        return out
    return size_attrs


_SPECS: dict[tuple[NormForm, int], LayerSpec] = {}


def norm_spec(form: NormForm, base: LayerSpec | None = None) -> LayerSpec:
    """The LayerSpec of a module recognised as ``form`` (size attributes from ``base`` when given)."""
    key = (form, id(base))
    spec = _SPECS.get(key)
    if spec is None:
        out_dims = {p: 0 for p in (form.scale, form.shift) if p is not None}
        size_attrs = base.size_attrs if base is not None and base.size_attrs is not None else _generic_sizes(form)
        update = base.update_attrs if base is not None else None
        spec = LayerSpec(base.kind if base is not None else form.kind, out_dims=out_dims, trace_unit=_norm_unit(form),
                         masked_norm=form.apply, size_attrs=size_attrs, update_attrs=update,
                         fold_mask=form.fold if out_dims else None, norm_dim=None if out_dims else form.dim)
        _SPECS[key] = spec
    return spec
