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
