"""Reductions and softmax-like ops: the reduced / normalised dims are fixed, the others pass through."""

from __future__ import annotations

from ..registry import norm_dim, op_rule, tensors
from ..spaces import Space, fix

REDUCTIONS = (
    "mean", "sum", "amax", "amin", "max", "min", "std", "var", "norm", "logsumexp", "prod", "argmax", "argmin",
    "all", "any", "nansum", "nanmean", "median", "var_mean", "std_mean", "count_nonzero",
)
SOFTMAX_LIKE = ("softmax", "log_softmax", "_softmax", "cumsum", "cumprod", "softmin")


@op_rule(*REDUCTIONS)
def reduce(tr, c) -> None:
    """Fixes the reduced dims (all of them when no ``dim`` is given); the others pass through.

    Kept reduced dims (``keepdim``) become new size-1 spaces.
    """
    name, args, kwargs = c.name, c.args, c.kwargs
    src = args[0] if args else kwargs["input"]
    dim = kwargs.get("dim", args[1] if len(args) > 1 and not isinstance(args[1], bool) else None)
    if name in ("norm",):
        dim = kwargs.get("dim", args[2] if len(args) > 2 else None)
    sd = list(tr.get(src))
    if dim is None:
        red = list(range(src.dim()))
    else:
        red = [norm_dim(d, src.dim()) for d in ((dim,) if isinstance(dim, int) else dim)]
    for d in red:
        fix(sd[d], f"{name} over this dim in {tr.current_module() or 'model'}")
    for o in tensors(c.out):
        if o.dim() == src.dim():
            tr.set(o, [Space(1, "keepdim") if i in red else s for i, s in enumerate(sd)])
        elif o.dim() == src.dim() - len(red):
            tr.set(o, [s for i, s in enumerate(sd) if i not in red])
        else:
            tr.set(o, tr.fresh(o))


@op_rule(*SOFTMAX_LIKE)
def softmax(tr, c) -> None:
    """Same shape out; fixes the normalised dim (every dim when none is given)."""
    src = c.args[0]
    dim = c.kwargs.get("dim", c.args[1] if len(c.args) > 1 else None)
    dims = list(tr.get(src))
    if dim is None:
        for s in dims:
            fix(s, f"{c.name} over all dims")
    else:
        fix(dims[norm_dim(dim, src.dim())], f"{c.name} over this dim in {tr.current_module()}")
    tr.set(c.out, dims)


@op_rule("topk", "sort", "argsort", "kthvalue")
def select_along(tr, c) -> None:
    """Selection along one dim (a MoE router's ``topk`` over experts): that dim is fixed (the output's is a
    new fixed space, or gone for ``kthvalue`` without ``keepdim``); the other dims pass through."""
    src = c.args[0] if c.args else c.kwargs["input"]
    default = -1
    dim = c.kwargs.get("dim", c.args[2] if c.name in ("topk", "kthvalue") and len(c.args) > 2 else
                       (c.args[1] if c.name in ("sort", "argsort") and len(c.args) > 1 and
                        isinstance(c.args[1], int) and not isinstance(c.args[1], bool) else default))
    d = norm_dim(dim, src.dim())
    sd = list(tr.get(src))
    fix(sd[d], f"{c.name} over this dim in {tr.current_module() or 'model'}")
    for o in tensors(c.out):
        if o.dim() == src.dim():
            tr.set(o, [Space(o.shape[i], c.name, fixed=o.shape[i] > 1) if i == d else s for i, s in enumerate(sd)])
        elif o.dim() == src.dim() - 1:
            tr.set(o, sd[:d] + sd[d + 1:])
        else:
            tr.set(o, tr.fresh(o, fixed=True))
