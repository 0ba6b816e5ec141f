"""Normalisation ops: affine parameters are tied to the normalised / channel dim, which passes through.

``layer_norm`` / ``rms_norm`` compute statistics over their normalised dims, so pruning those would
change every output: the dims are fixed. A norm *layer* (``nn.LayerNorm``, any RMSNorm or
channels-first LayerNorm) is recognised by what it computes (:mod:`dmscale.layers.norms`) and
traced as one unit, with statistics over the kept channels; these rules only see bare calls.
"""

from __future__ import annotations

import torch

from ..registry import op_rule
from ..spaces import fix, union


@op_rule("batch_norm")
def batch_norm(tr, c) -> None:
    """Couples running_mean / running_var / weight / bias with the channel dim (1, or 0 unbatched)."""
    x = c.arg(0, "input")
    xd = list(tr.get(x))
    cdim = 1 if x.dim() > 1 else 0
    for i, key in ((1, "running_mean"), (2, "running_var"), (3, "weight"), (4, "bias")):
        t = c.arg(i, key, None)
        if isinstance(t, torch.Tensor):
            union(tr.get(t)[0], xd[cdim])
    tr.set(c.out, xd)


def _layer_norm(tr, c, weight_index: int, bias_index: int | None) -> None:
    x = c.arg(0, "input")
    shape = c.arg(1, "normalized_shape")
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    xd = list(tr.get(x))
    k = len(shape)
    params = [(weight_index, "weight")] + ([(bias_index, "bias")] if bias_index is not None else [])
    for i, key in params:
        t = c.arg(i, key, None)
        if isinstance(t, torch.Tensor):
            for a, b in zip(tr.get(t), xd[-k:]):
                union(a, b)
    for s in xd[-k:]:  # statistics over these dims: pruning one changes every output
        fix(s, f"{c.name} over {k} dim{'s' if k > 1 else ''} outside a recognised norm layer in "
               f"{tr.current_module() or 'model'}")
    tr.set(c.out, xd)


@op_rule("layer_norm")
def layer_norm(tr, c) -> None:
    """Couples weight / bias with the normalised dims and fixes them (statistics over them)."""
    _layer_norm(tr, c, 2, 3)


@op_rule("rms_norm")
def rms_norm(tr, c) -> None:
    """Like ``layer_norm`` (weight only)."""
    _layer_norm(tr, c, 2, None)


@op_rule("group_norm")
def group_norm(tr, c) -> None:
    """Couples weight / bias with dim 1; fixes it unless there is one group per channel."""
    x = c.arg(0, "input")
    g = c.arg(1, "num_groups")
    xd = list(tr.get(x))
    for i, key in ((2, "weight"), (3, "bias")):
        t = c.arg(i, key, None)
        if isinstance(t, torch.Tensor):
            union(tr.get(t)[0], xd[1])
    if g != x.shape[1]:
        fix(xd[1], f"group_norm with {g} groups over {x.shape[1]} channels in {tr.current_module()}")
    tr.set(c.out, xd)


@op_rule("_weight_norm")
def weight_norm(tr, c) -> None:
    """``W = g * v / ||v||`` (weight norm): W has v's dims; g is tied to v's dim ``dim`` (one norm per slice of it).

    No dim is fixed: the masked supernet uses W as it is, and export rescales g so that the sliced layer computes
    the kept part of W (:mod:`dmscale.layers.weightnorm`)."""
    v, g = c.arg(0, "v"), c.arg(1, "g")
    dim = c.arg(2, "dim", 0)
    vd = list(tr.get(v))
    if dim != -1 and isinstance(g, torch.Tensor) and g.dim() == v.dim():
        d = dim % v.dim()
        union(tr.get(g)[d], vd[d])
    tr.set(c.out, vd, act=False)  # a weight, not an activation
