"""Convolutions: channels like ``linear``; kernel dims fixed; grouped and depthwise channels; transposed.

A grouped convolution (1 < groups, not depthwise) splits its input channels into a product
(groups x channels per group) and its output channels likewise; the group factors of input
and output are one space (removing a group removes its input and output channels), the
per-group factors are spaces of their own (the same channels are kept in every group). The
groups are tagged ``conv_groups`` (searched as kind ``groups``), the per-group channels
``group_channels`` (searched as width); export sets the layer's ``groups`` from the kept count.
"""

from __future__ import annotations

import torch

from ..registry import op_rule
from ..spaces import Space, fix, split, tag, union


def _fix_kernel(wd: list[Space], first: int) -> None:
    for k in wd[first:]:
        fix(k, "")


def spatial(n: int) -> Space:
    """A new space for an output spatial dim (tagged: never reported as a lost channel dim)."""
    s = Space(n, "conv-spatial")
    s.tags.add("spatial")
    return s


@op_rule("conv1d", "conv2d", "conv3d")
def conv(tr, c) -> None:
    """Dense: couples x[C] with w[1]; out[C] is w[0]. Depthwise: couples x[C] with w[0], fixes w[1].

    Grouped (1 < groups, not depthwise): x[C] = groups x w[1] and w[0] = groups x (out per group),
    the group factors coupled (see the module docstring). Fixes the kernel dims. Output spatial
    dims are new spaces. ``bias[0]`` is coupled with w[0].
    """
    x, w, b = c.arg(0, "input"), c.arg(1, "weight"), c.arg(2, "bias", None)
    groups = c.arg(6, "groups", 1)
    out = c.out
    xd, wd = tr.get(x), tr.get(w)
    cdim = x.dim() - w.dim() + 1  # 1 for batched input, 0 for unbatched
    cin, cout = x.shape[cdim], w.shape[0]
    od = list(xd[:cdim]) + [wd[0]] + [spatial(n) for n in out.shape[cdim + 1:]]
    _fix_kernel(wd, 2)
    where = tr.current_module()
    if groups == 1:
        union(xd[cdim], wd[1])
    elif groups == cin and w.shape[1] == 1 and cout == cin:
        union(xd[cdim], wd[0])  # depthwise: channels pass through
        fix(wd[1], "")
    else:
        xg = split(xd[cdim], [groups, w.shape[1]], "product", f"conv_groups:{where}")
        wg = split(wd[0], [groups, cout // groups], "product", f"conv_groups:{where}")
        union(xg[0], wg[0])
        union(xg[1], wd[1])
        tag(xg[0], "conv_groups")
        for part in (xg[1], wg[1]):
            tag(part, "group_channels")
        for part in (xg[0], xg[1], wg[1]):
            tag(part, "act")  # the parts of activation channels (searchable like them)
        tr.record_size_attr("groups", xg[0])
    if isinstance(b, torch.Tensor):
        union(tr.get(b)[0], wd[0])
    tr.set(out, od)
    tr.record_op("conv", c.flops, od + list(wd[1:]))


@op_rule("conv_transpose1d", "conv_transpose2d", "conv_transpose3d")
def conv_transpose(tr, c) -> None:
    """Weight (in, out per group, *kernel). Dense: couples x[C] with w[0]; out[C] is w[1].

    Depthwise (groups == in == out): couples x[C] with w[0] and the output channels with them;
    export sets ``groups`` from the kept count. Other grouped transposed convolutions fix their
    channels. Fixes the kernel dims; output spatial dims are new spaces; ``bias[0]`` is coupled
    with the output channels.
    """
    x, w, b = c.arg(0, "input"), c.arg(1, "weight"), c.arg(2, "bias", None)
    groups = c.arg(6, "groups", 1)
    out = c.out
    xd, wd = tr.get(x), tr.get(w)
    cdim = x.dim() - w.dim() + 1
    cin = x.shape[cdim]
    _fix_kernel(wd, 2)
    where = tr.current_module()
    if groups == 1:
        union(xd[cdim], wd[0])
        ch = wd[1]
    elif groups == cin and w.shape[1] == 1 and out.shape[cdim] == cin:
        ch = union(xd[cdim], wd[0])
        fix(wd[1], "")
        tr.record_size_attr("groups", ch)
    else:
        reason = f"grouped transposed convolution (groups={groups}) in {where}"
        for s in (xd[cdim], wd[0], wd[1]):
            fix(s, reason)
        ch = Space(out.shape[cdim], "conv_transpose-out", fixed=True)
        ch.fix_reasons.append(reason)
    if isinstance(b, torch.Tensor):
        union(tr.get(b)[0], ch)
    od = list(xd[:cdim]) + [ch] + [spatial(n) for n in out.shape[cdim + 1:]]
    tr.set(out, od)
    tr.record_op("conv_transpose", c.flops, list(xd) + list(wd[1:]))
