"""``LayerSpec``: everything dmscale knows about one layer type, and the registry that finds it.

One spec says, for a layer class:

- how it is **traced**: through the ops its ``forward`` calls (``trace_unit=None``, the default),
  or as one unit whose output a ``trace_unit`` function labels (its insides are not followed);
- where its **output channels** are in each parameter (``out_dims``): the trace records where
  they are in the layer's output, the search masks them there, and the export folds the
  surviving mask values into these parameters before slicing;
- whether the output mask may be applied **through the weights** (``fold_into_weights``:
  exact for ``m * (W x + b) = (m W) x + m b``; chosen where the weight is smaller than the
  activation, i.e. convolutions and BatchNorm);
- for a layer that **normalises** over its output channels (LayerNorm, RMSNorm):
  ``masked_norm(module, x, keep)`` computes it with statistics over the kept channels only,
  and ``standard_forward`` is the ``forward`` that function models (a subclass overriding it
  is left unpruned);
- its **size attributes** as implied by its weights (``size_attrs(module)``, e.g.
  ``{"in_features": 8, "out_features": 4}``), which export sets after slicing
  (``update_attrs`` overrides that where attributes are not a plain function of the weights)
  and which loading can check;
- how ``upscale`` **widens** it (``widen``, optional; see :class:`Widening`);
- for a layer whose output cannot take a mask by multiplying its parameters (a norm with a
  ``(1 + w)`` scale): how export folds mask values into them (``fold_mask``);
- for a layer that keeps references to its parameters (the RNNs' flat weight list): how to
  refresh them after masks are put in or taken out and after export slicing (``refresh``).

Lookup (:func:`spec_for`) order: classes registered with :func:`register_layer` (the most
derived class in the module's MRO first), then duck-typed matchers (:func:`register_matcher`,
e.g. any class named ``*RMSNorm``), then dmscale's built-in classes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Mapping

import torch
import torch.nn as nn

if TYPE_CHECKING:
    from ..trace.tracer import Tracer

__all__ = ["LayerSpec", "Widening", "TensorWidening", "register_layer", "unregister_layer", "register_matcher",
           "spec_for", "layer_kind"]

TraceUnitFn = Callable[["Tracer", nn.Module, str, "torch.Tensor | None", Any, float], None]


@dataclass
class TensorWidening:
    """How ``upscale`` widens one parameter or buffer of a layer.

    ``maps`` are ``(dim, index_map)`` pairs applied in order as ``t = t.index_select(dim, index_map)``
    (copy-and-split duplicates unit ``i`` at every position where ``index_map == i``); the result is
    multiplied by ``scale`` (``1/k_in`` on fan-in dims keeps the function unchanged). ``k_in`` /
    ``k_out`` are the μP width multipliers of the tensor's fan-in / fan-out, and ``noise_fan_in``
    is the fan-in of the widened tensor for symmetry-breaking noise (None: no noise, e.g. biases,
    norms and read-outs).
    """

    maps: list[tuple[int, torch.Tensor]]
    scale: float = 1.0
    k_in: int = 1
    k_out: int = 1
    noise_fan_in: int | None = None


@dataclass
class Widening:
    """A layer's widening: per attribute name (parameter or buffer), and its size attributes afterwards."""

    tensors: dict[str, TensorWidening]
    attrs: dict[str, Any] = field(default_factory=dict)


# widen(module, in_map, out_map, k) -> Widening. ``in_map`` / ``out_map`` index the layer's input /
# output features (None: that side keeps its size); ``k`` is the integer widening factor.
WidenFn = Callable[[nn.Module, "torch.Tensor | None", "torch.Tensor | None", int], Widening]


@dataclass(frozen=True, eq=False)
class LayerSpec:
    """What dmscale needs to know about one layer type (see the module docstring).

    Fields:
        kind: short name, used in trace records and messages (``"linear"``, ``"conv"``, ...).
        out_dims: parameter name -> the dim of that parameter that holds the layer's output
            channels; the first entry locates the output channels during tracing. Empty: the
            layer is not masked or sliced as a unit (e.g. a layer traced as a unit and fixed).
        params: the parameters this spec accounts for; any other parameter of the module is
            treated as a raw parameter (masked along every searched dim by a parametrization).
            None: the ``out_dims`` parameters plus ``weight`` and ``bias``.
        trace_unit: ``fn(tracer, module, name, x, output, flops)`` labelling ``output`` when the
            layer is traced as one unit (``x``: its first tensor input; ``flops``: FLOPs spent
            inside it). None: trace through the ops of ``forward``.
        fold_into_weights: apply the output mask by a parametrization of the ``out_dims``
            parameters instead of a forward hook (exact; only worth it when weights are small).
        masked_norm: ``fn(module, x, keep) -> y``: the layer with statistics over kept channels
            only. Set for layers that normalise over their output channels.
        standard_forward: with ``masked_norm``: the ``forward`` it models; a subclass that
            overrides ``forward`` keeps its channels unpruned. None: any forward is accepted.
        size_attrs: ``fn(module) -> {attribute: value}``: the size attributes (ints, or tuples
            of ints such as ``normalized_shape``) implied by the module's current weights.
        update_attrs: ``fn(module)`` setting the size attributes after export sliced the
            weights; None: set every attribute ``size_attrs`` returns.
        widen: ``fn(module, in_map, out_map, k) -> Widening`` for ``upscale`` (optional).
        fold_mask: ``fn(module, m)`` folding the output-mask values ``m`` (one per output channel)
            into the module's parameters, in place, so that it computes ``m * output``; None:
            multiply every ``out_dims`` parameter by ``m`` along its dim.
        refresh: ``fn(module)`` for layers that cache references to their parameters: called
            before every masked forward, after masks are removed and after export slicing.
        norm_dim: with ``masked_norm`` and no ``out_dims`` (a norm without parameters, e.g. a non-affine
            LayerNorm): the dim of its output that it normalises (-1 or 1); its output channels are found there,
            and as it has no parameter to fold surviving mask values into, the hard-masked supernet masks its
            output with 0 / 1 (what the smaller exported layer computes).
        norm_applies_mask: with ``masked_norm``: it is called as ``masked_norm(module, x, keep, mask)``
            and applies the output mask itself (a layer with a skip term such as GRN's ``+ x``, whose
            input already carries the mask), instead of the output being multiplied by the mask.
    """

    kind: str
    out_dims: Mapping[str, int] = field(default_factory=dict)
    params: tuple[str, ...] | None = None
    trace_unit: TraceUnitFn | None = None
    fold_into_weights: bool = False
    masked_norm: Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor] | None = None
    standard_forward: Callable | None = None
    size_attrs: Callable[[nn.Module], dict[str, Any]] | None = None
    update_attrs: Callable[[nn.Module], None] | None = None
    widen: WidenFn | None = None
    fold_mask: Callable[[nn.Module, torch.Tensor], None] | None = None
    refresh: Callable[[nn.Module], None] | None = None
    norm_applies_mask: bool = False
    norm_dim: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.kind, str) or not self.kind:
            raise ValueError(f"LayerSpec.kind must be a non-empty string, got {self.kind!r}")
        if not isinstance(self.out_dims, Mapping) or not all(
                isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool) for k, v in self.out_dims.items()):
            raise ValueError(f"LayerSpec({self.kind!r}).out_dims must map parameter names to int dims, "
                             f"got {self.out_dims!r}")
        if self.params is None:
            object.__setattr__(self, "params", tuple(dict.fromkeys(tuple(self.out_dims) + ("weight", "bias"))))
        if isinstance(self.params, str) or not all(isinstance(p, str) for p in self.params):
            raise ValueError(f"LayerSpec({self.kind!r}).params must be a tuple of parameter names, got {self.params!r}")
        object.__setattr__(self, "out_dims", dict(self.out_dims))
        object.__setattr__(self, "params", tuple(self.params))
        for name in ("trace_unit", "masked_norm", "standard_forward", "size_attrs", "update_attrs", "widen", "fold_mask",
                     "refresh"):
            fn = getattr(self, name)
            if fn is not None and not callable(fn):
                raise TypeError(f"LayerSpec({self.kind!r}).{name} must be callable or None, got {fn!r}")
        if self.fold_into_weights and not self.out_dims:
            raise ValueError(f"LayerSpec({self.kind!r}): fold_into_weights needs out_dims")
        if self.masked_norm is not None and not self.out_dims and self.norm_dim is None:
            raise ValueError(f"LayerSpec({self.kind!r}): masked_norm needs out_dims (or norm_dim, for a norm without "
                             "parameters)")
        if self.norm_dim is not None and (self.masked_norm is None or self.norm_dim not in (-1, 1)):
            raise ValueError(f"LayerSpec({self.kind!r}): norm_dim (-1 or 1) goes with masked_norm, got {self.norm_dim!r}")
        missing = [p for p in self.out_dims if p not in self.params]
        if missing:
            raise ValueError(f"LayerSpec({self.kind!r}): out_dims names {missing} not listed in params {self.params}")

    @property
    def out_param(self) -> str | None:
        """The parameter whose ``out_dims`` entry locates the output channels (the first one)."""
        return next(iter(self.out_dims), None)

    @property
    def maskable(self) -> bool:
        """True when the layer's output channels are masked and sliced as a unit."""
        return bool(self.out_dims) or self.norm_dim is not None

    def sizes(self, module: nn.Module) -> dict[str, Any]:
        """The size attributes the module's weights imply (empty without ``size_attrs``)."""
        return dict(self.size_attrs(module)) if self.size_attrs is not None else {}

    def update(self, module: nn.Module) -> None:
        """Make the module's size attributes agree with its (sliced) weights."""
        if self.update_attrs is not None:
            self.update_attrs(module)
        else:
            for attr, value in self.sizes(module).items():
                setattr(module, attr, value)
        if self.refresh is not None:
            self.refresh(module)

    def fold(self, module: nn.Module, m: torch.Tensor, skip: tuple[str, ...] = ()) -> None:
        """Fold output-mask values ``m`` into the module's parameters (see ``fold_mask``), except those in ``skip``
        (folded by the caller, e.g. a weight-normalised weight)."""
        if self.fold_mask is not None:
            self.fold_mask(module, m)
            return
        for pname, d in self.out_dims.items():
            if pname in skip:
                continue
            p = getattr(module, pname, None)
            if isinstance(p, torch.Tensor) and p.dim() > d and p.shape[d] == m.numel():
                shape = [1] * p.dim()
                shape[d] = m.numel()
                p.mul_(m.to(p.dtype).view(shape))


_USER: dict[type, LayerSpec] = {}
_MATCHERS: list[tuple[Callable[[nn.Module], bool], LayerSpec]] = []
_BUILTIN: dict[type, LayerSpec] = {}


def register_layer(cls: type, spec: LayerSpec, *, replace: bool = False) -> None:
    """Tell dmscale how to trace, mask, export, describe and widen the layer class ``cls``.

    The spec also applies to subclasses of ``cls`` (unless they have their own). Registering a
    class that already has a spec (built-in ones included) needs ``replace=True``.
    """
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise TypeError(f"register_layer: {cls!r} is not a torch.nn.Module subclass")
    if not isinstance(spec, LayerSpec):
        raise TypeError(f"register_layer({cls.__name__}, ...): expected a dmscale.layers.LayerSpec, got "
                        f"{type(spec).__name__}")
    if not replace and (cls in _USER or cls in _BUILTIN):
        old = _USER.get(cls) or _BUILTIN[cls]
        raise ValueError(f"register_layer: {cls.__name__} already has a LayerSpec (kind {old.kind!r}); "
                         "pass replace=True to override it")
    _USER[cls] = spec


def unregister_layer(cls: type) -> None:
    """Remove a spec registered with :func:`register_layer` (built-in specs cannot be removed)."""
    if cls not in _USER:
        raise KeyError(f"unregister_layer: {getattr(cls, '__name__', cls)!r} was not registered with register_layer")
    del _USER[cls]


def register_matcher(predicate: Callable[[nn.Module], bool], spec: LayerSpec) -> None:
    """Use ``spec`` for every module for which ``predicate(module)`` is true (duck-typed classes from other
    libraries, matched by name or attributes); checked after :func:`register_layer` classes, in order."""
    if not callable(predicate) or not isinstance(spec, LayerSpec):
        raise TypeError("register_matcher(predicate, spec): predicate must be callable and spec a LayerSpec")
    _MATCHERS.append((predicate, spec))


def _register_builtin(classes: tuple[type, ...], spec: LayerSpec) -> None:
    for c in classes:
        _BUILTIN[c] = spec


def spec_for(module: nn.Module) -> LayerSpec | None:
    """The LayerSpec of a module, or None when dmscale has none (it is then traced through its ops)."""
    mro = type(module).__mro__
    if _USER:
        for c in mro:
            spec = _USER.get(c)
            if spec is not None:
                return spec
    for predicate, spec in _MATCHERS:
        if predicate(module):
            return spec
    for c in mro:
        spec = _BUILTIN.get(c)
        if spec is not None:
            return spec
    return None


def layer_kind(module: nn.Module) -> str | None:
    """The kind of a known layer whose output channels dmscale can mask and slice (else None)."""
    spec = spec_for(module)
    return spec.kind if spec is not None and spec.maskable else None
