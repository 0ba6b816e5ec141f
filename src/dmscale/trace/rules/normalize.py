"""``F.normalize`` (x / max(||x||_p, eps) along one dim, e.g. Swin-V2's cosine attention): the normalised dim
is fixed (its norm reads every element), the others pass through."""

from __future__ import annotations

from ..registry import norm_dim, op_rule
from ..spaces import fix


@op_rule("normalize")
def normalize(tr, c) -> None:
    """Same shape out; fixes ``dim`` (default 1, as in ``F.normalize``); every other dim passes through."""
    src = c.args[0] if c.args else c.kwargs["input"]
    dim = c.kwargs.get("dim", c.args[2] if len(c.args) > 2 else 1)
    dims = list(tr.get(src))
    fix(dims[norm_dim(dim, src.dim())], f"normalize over this dim in {tr.current_module() or 'model'}")
    tr.set(c.out, dims)
