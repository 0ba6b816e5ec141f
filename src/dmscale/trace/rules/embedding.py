"""``embedding``: the output gains the weight's column dim; the vocabulary (rows) is never pruned."""

from __future__ import annotations

from ..registry import op_rule
from ..spaces import fix


@op_rule("embedding")
def embedding(tr, c) -> None:
    """out = index dims + weight[1]; fixes weight[0] (the vocabulary)."""
    idx, w = c.arg(0, "input"), c.arg(1, "weight")
    wd = tr.get(w)
    fix(wd[0], "embedding rows (vocabulary)")
    tr.set(c.out, list(tr.get(idx)) + [wd[1]])


@op_rule("embedding_bag")
def embedding_bag(tr, c) -> None:
    """out = (bags, weight[1]): a sum / mean / max over each bag's rows keeps every column apart; fixes
    weight[0] (the vocabulary), and weight[1] too with ``max_norm`` (rows renormalised over the columns)."""
    w = c.arg(1, "weight")
    wd = tr.get(w)
    fix(wd[0], "embedding rows (vocabulary)")
    if c.arg(3, "max_norm", None) is not None:
        fix(wd[1], f"embedding_bag with max_norm in {tr.current_module() or 'model'} (rows renormalised)")
    out = c.out[0] if isinstance(c.out, tuple) else c.out
    tr.set(out, tr.fresh(out)[:-1] + [wd[1]])
