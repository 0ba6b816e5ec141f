"""The op-rule table: how each torch function couples or fixes the dimensions it touches.

A rule is a function ``rule(tr, call)`` registered for one or more op names with
:func:`op_rule`. The tracer calls it after the op ran, with ``call.out`` holding the result;
the rule reads the spaces of the inputs with ``tr.get(t)`` and labels every output tensor with
``tr.set(t, spaces)``. Op names are the torch function's ``__name__`` as seen by a
``TorchFunctionMode``: ``"conv2d"`` for ``F.conv2d``, ``"view"`` for ``Tensor.view``,
``"__getitem__"`` for indexing, ``"__add__"`` for ``a + b``, and ``"get:T"`` for reading the
``Tensor.T`` property. An op with no rule fixes every dimension it touches (safe: the export
stays exact, only pruning freedom is lost) and is reported by name when that cost something.

The rule API of the tracer (the ``tr`` argument), for rule writers:

- ``tr.get(t) -> list[Space]``: the spaces of ``t``'s dims (fresh owned spaces for a parameter,
  fresh *fixed* ones for a tensor of unknown origin);
- ``tr.set(t, spaces, act=True)``: label an output tensor (in place on a parameter: unites instead;
  ``act=False`` for a tensor computed from parameters only, such as a weight-normalised weight);
- ``tr.fresh(t, origin="", fixed=False)``: new spaces for a new tensor's dims;
- ``tr.broadcast_union(tensors, out)``: the elementwise rule (unite aligned dims, label ``out``);
- ``tr.unknown(name, args, kwargs, out, reason=None)``: treat the op as unsupported;
- ``tr.record_op(name, flops, spaces)``: an op whose FLOPs scale with the sizes of ``spaces``;
- ``tr.record_reshape(value, space)``: an explicit int of the current module that sized ``space``;
- ``tr.record_size_attr(attr, space)``: the current module's attribute ``attr`` holds the kept size of
  ``space`` (export sets it);
- ``tr.watch(t, fn)``: call ``fn(op_name)`` if ``t`` is read by a later op or returned by the model;
- ``tr.mark_raw(t)``, ``tr.is_param(t)``, ``tr.current_module()``; in a layer's ``trace_unit``,
  ``tr.unit_call`` holds the ``(args, kwargs)`` the layer was called with;
- and from :mod:`dmscale.trace.spaces`: ``union``, ``fix``, ``split``, ``composite``, ``tag``.

A rule that raises is caught: the op is then treated as unsupported (``rule error`` in the
report), so a faulty rule costs pruning freedom, never a wrong export.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

import torch
from torch.utils._pytree import tree_flatten

if TYPE_CHECKING:
    from .tracer import Tracer

__all__ = ["OpCall", "op_rule", "rule_for", "registered_ops", "unregister_op_rule", "tensors", "first_tensor", "norm_dim"]

_REQUIRED = object()


@dataclass
class OpCall:
    """One call of a torch function seen by the tracer (after it ran)."""

    name: str
    func: Callable
    args: tuple
    kwargs: dict
    out: Any
    flops: float  # FLOPs of this call (torch.utils.flop_counter formulas); 0 for most ops

    def arg(self, i: int, key: str, default: Any = _REQUIRED) -> Any:
        """Argument ``i`` if given positionally, else keyword ``key`` (KeyError when required and absent)."""
        if len(self.args) > i:
            return self.args[i]
        if default is _REQUIRED:
            return self.kwargs[key]
        return self.kwargs.get(key, default)


RuleFn = Callable[["Tracer", OpCall], None]
_RULES: dict[str, RuleFn] = {}


def op_rule(*names: str, replace: bool = False) -> Callable[[RuleFn], RuleFn]:
    """Register the decorated function as the rule for the ops called ``names``.

    ``replace=True`` overrides an existing rule (a built-in one included); without it,
    registering a name twice is an error, so two rules never silently compete.
    """
    if not names or not all(isinstance(n, str) and n for n in names):
        raise ValueError(f"op_rule needs one or more non-empty op names, got {names!r}")

    def deco(fn: RuleFn) -> RuleFn:
        if not callable(fn):
            raise TypeError(f"op_rule({', '.join(map(repr, names))}) decorates a function, got {fn!r}")
        if not replace:
            taken = [n for n in names if n in _RULES and _RULES[n] is not fn]
            if taken:
                owner = _RULES[taken[0]]
                raise ValueError(f"op {taken[0]!r} already has a rule ({owner.__module__}.{owner.__qualname__}); "
                                 "pass replace=True to override it")
        for n in names:
            _RULES[n] = fn
        return fn

    return deco


def rule_for(name: str) -> RuleFn | None:
    """The rule registered for op ``name`` (None: the op is unsupported)."""
    return _RULES.get(name)


def registered_ops() -> dict[str, RuleFn]:
    """A copy of the table: op name -> rule."""
    return dict(_RULES)


def unregister_op_rule(*names: str) -> None:
    """Remove the rules of these ops (they become unsupported); unknown names are an error."""
    missing = [n for n in names if n not in _RULES]
    if missing:
        raise KeyError(f"no op rule registered for {missing}")
    for n in names:
        del _RULES[n]


# helpers for rule writers
def tensors(obj: Any) -> list[torch.Tensor]:
    """Every tensor in a nested structure of tuples / lists / dicts, in order."""
    flat, _ = tree_flatten(obj)
    return [t for t in flat if isinstance(t, torch.Tensor)]


def norm_dim(d: int, n: int) -> int:
    """A possibly negative dim index as a non-negative one for a rank-``n`` tensor."""
    return d + n if d < 0 else d


def first_tensor(obj: Any) -> torch.Tensor | None:
    """``obj`` itself if a tensor, else the first element of a tuple / list when that is a tensor."""
    if isinstance(obj, torch.Tensor):
        return obj
    if isinstance(obj, (tuple, list)) and obj and isinstance(obj[0], torch.Tensor):
        return obj[0]
    return None
