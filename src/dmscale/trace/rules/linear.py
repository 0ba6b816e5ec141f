"""``linear``: the weight's input dim is tied to the input's last dim; its output dim is a new space."""

from __future__ import annotations

import torch

from ..registry import op_rule
from ..spaces import union


@op_rule("linear")
def linear(tr, c) -> None:
    """Couples x[-1] with weight[1] and bias[0] with weight[0]; out[-1] is weight[0]; fixes nothing."""
    x, w, b = c.arg(0, "input"), c.arg(1, "weight"), c.arg(2, "bias", None)
    xd, wd = tr.get(x), tr.get(w)
    union(xd[-1], wd[1])
    od = list(xd[:-1]) + [wd[0]]
    if isinstance(b, torch.Tensor):
        union(tr.get(b)[0], wd[0])
    tr.set(c.out, od)
    tr.record_op("linear", c.flops, list(od) + [wd[1]])
