"""``conv1d/2d/3d``: channels like ``linear``; kernel dims fixed; depthwise passes channels through.

Grouped convolutions with 1 < groups (other than depthwise) fix their channels for now.
"""

from __future__ import annotations

import torch

from ..registry import op_rule
from ..spaces import Space, fix, union


@op_rule("conv1d", "conv2d", "conv3d")
def conv(tr, c) -> None:
    """Dense: couples x[C] with w[1]; out[C] is w[0]. Depthwise: couples x[C] with w[0].

    Fixes the kernel dims, w[1] of a depthwise conv, and every channel dim of a grouped conv.
    Output spatial dims are new spaces.
    """
    x, w, b = c.arg(0, "input"), c.arg(1, "weight"), c.arg(2, "bias", None)
    groups = c.arg(6, "groups", 1)
    out = c.out
    xd, wd = tr.get(x), tr.get(w)
    cdim = x.dim() - w.dim() + 1  # 1 for batched input, 0 for unbatched
    cin, cout = x.shape[cdim], w.shape[0]
    od = list(xd[:cdim]) + [wd[0]] + [Space(n, "conv-spatial") for n in out.shape[cdim + 1:]]
    for k in wd[2:]:
        fix(k, "")
    if groups == 1:
        union(xd[cdim], wd[1])
    elif groups == cin and w.shape[1] == 1 and cout == cin:
        union(xd[cdim], wd[0])  # depthwise: channels pass through
        fix(wd[1], "")
    else:
        where = tr.current_module()
        fix(xd[cdim], f"grouped convolution (groups={groups}) in {where}")
        fix(wd[0], f"grouped convolution (groups={groups}) in {where}")
        fix(wd[1], f"grouped convolution (groups={groups}) in {where}")
    if isinstance(b, torch.Tensor):
        union(tr.get(b)[0], wd[0])
    tr.set(out, od)
    tr.record_op("conv", c.flops, od + list(wd[1:]))
