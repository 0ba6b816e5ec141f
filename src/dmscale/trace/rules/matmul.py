"""Matrix products: the contracted dims are tied; batch dims are tied where both operands have them."""

from __future__ import annotations

import torch

from ..registry import op_rule
from ..spaces import Space, tag, union


def matmul_dims(tr, a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, flops: float, name: str) -> None:
    """Label ``out = a @ b`` (numpy matmul semantics) and record its FLOPs.

    Couples a[-1] with b[-2] (b[0] / a[0] for vectors) and equally sized batch dims; out is
    batch + [a[-2], b[-1]]. With two 4-D operands the last batch dim is tagged as attention
    heads and the contracted dim as head_dim; otherwise the factors of the batch dims that were split off
    a feature dim (heads folded into the batch, ``view(B * H, T, D)`` before a ``bmm``) are tagged as
    heads (see :func:`tag_folded_heads`). Fixes nothing; parameters used here are raw.
    """
    ad, bd = list(tr.get(a)), list(tr.get(b))
    for t in (a, b):
        if tr.is_param(t):
            tr.mark_raw(t)
    if a.dim() == 1 or b.dim() == 1:
        if a.dim() == 1 and b.dim() == 1:
            union(ad[0], bd[0])
            tr.set(out, [])
            return
        if a.dim() == 1:
            union(ad[0], bd[-2])
            od = bd[:-2] + [bd[-1]]
        else:
            union(ad[-1], bd[-1])
            od = ad[:-1]
        tr.set(out, od)
        tr.record_op(name, flops, list(od) + [ad[-1] if a.dim() > 1 else ad[0]])
        return
    union(ad[-1], bd[-2])
    ba, bb = ad[:-2], bd[:-2]
    nb = out.dim() - 2
    batch: list[Space] = []
    for i in range(nb):
        ia, ib = i - (nb - len(ba)), i - (nb - len(bb))
        sa = ba[ia] if ia >= 0 and a.shape[ia] == out.shape[i] else None
        sb = bb[ib] if ib >= 0 and b.shape[ib] == out.shape[i] else None
        if sa is not None and sb is not None:
            batch.append(union(sa, sb))
        else:
            batch.append(sa or sb or Space(out.shape[i], "bcast"))
    od = batch + [ad[-2], bd[-1]]
    tr.set(out, od)
    tr.record_op(name, flops, od + [ad[-1]])
    if nb >= 1 and a.dim() == 4 and b.dim() == 4:
        tag(batch[-1], "heads")
        tag(ad[-1], "head_dim")
    else:
        tag_folded_heads(batch, [ad[-1]])


def _split_leaves(s: Space) -> list[Space]:
    return [leaf for leaf in s.leaves() if "split" in leaf.tags]


def tag_folded_heads(batch: list[Space], contracted: list[Space]) -> None:
    """The factors of a product's batch dims that were split off a feature dim (heads folded into the batch:
    ``view(B, T, H, D).transpose(1, 2).reshape(B * H, T, D)``) are attention heads: tag them 'heads', and
    the factors of the contracted dims split off a feature dim 'head_dim' (so the heads are searched, or
    named as lost when the trace fixes them, instead of staying an anonymous split factor). The other
    factors (the batch itself) are left alone."""
    folded = [leaf for s in batch for leaf in _split_leaves(s)]
    for leaf in folded:
        tag(leaf, "heads")
    if folded:
        for s in contracted:
            for leaf in _split_leaves(s):
                tag(leaf, "head_dim")


@op_rule("matmul", "__matmul__", "__rmatmul__", "mm", "bmm")
def matmul(tr, c) -> None:
    """See :func:`matmul_dims` (``__rmatmul__`` swaps its operands)."""
    a, b = (c.args[1], c.args[0]) if c.name == "__rmatmul__" else (c.args[0], c.args[1])
    matmul_dims(tr, a, b, c.out, c.flops, c.name)


@op_rule("addmm", "baddbmm")
def addmm(tr, c) -> None:
    """``beta * input + alpha * a @ b``: the product as :func:`matmul_dims`, then ``input`` broadcast-united
    with it (``baddbmm``: batch dims too)."""
    bias = c.arg(0, "input", None)
    a, b = c.arg(1, "batch1" if c.name == "baddbmm" else "mat1"), c.arg(2, "batch2" if c.name == "baddbmm" else "mat2")
    matmul_dims(tr, a, b, c.out, c.flops, c.name)
    if isinstance(bias, torch.Tensor):
        tr.broadcast_union([bias, c.out], c.out)


@op_rule("addbmm")
def addbmm(tr, c) -> None:
    """``input + sum_i a[i] @ b[i]``: the batch dim is contracted like the inner dim (both coupled);
    out is [a[-2], b[-1]], broadcast-united with ``input``."""
    bias, a, b = c.arg(0, "input", None), c.arg(1, "batch1"), c.arg(2, "batch2")
    ad, bd = list(tr.get(a)), list(tr.get(b))
    for t in (a, b):
        if tr.is_param(t):
            tr.mark_raw(t)
    union(ad[0], bd[0])
    union(ad[2], bd[1])
    tr.set(c.out, [ad[1], bd[2]])
    tr.record_op(c.name, c.flops, [ad[0], ad[1], ad[2], bd[2]])
    if isinstance(bias, torch.Tensor):
        tr.broadcast_union([bias, c.out], c.out)
