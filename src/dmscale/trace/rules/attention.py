"""``scaled_dot_product_attention``: q/k/v head and batch dims tied; grouped-query heads as a product;
an ``attn_mask`` with a head dimension (relative position bias, ALiBi, learned per-head biases) tied
to the query heads."""

from __future__ import annotations

import torch

from ..registry import op_rule
from ..spaces import Space, fix, split, tag, union


def tie_scores_bias(tr, bias: torch.Tensor, scores: list[Space], shape: list[int]) -> None:
    """Tie a tensor added to attention scores of ``shape`` (batch.., heads, q_len, k_len) to their dims.

    Broadcast from the right like the addition it stands for: a dim of the bias equal in size to
    the scores' dim (and not 1) is the same dim, so a per-head bias follows the heads the search
    keeps (a bias the model computes from its head count, like ALiBi slopes, is fixed, and so
    then are the heads).
    """
    bd = list(tr.get(bias))
    for j in range(1, min(len(bd), len(shape)) + 1):
        if bias.shape[-j] == shape[-j] and shape[-j] != 1:
            union(bd[-j], scores[-j])


@op_rule("scaled_dot_product_attention")
def sdpa(tr, c) -> None:
    """Couples q[-1] with k[-1] (and with v[-1] when equal in size: one head_dim attribute usually views
    all three), k/v sequence and head dims, and all leading batch dims.

    Equal head counts couple q[-3] with k[-3]. Multi-query attention (one key/value head): the
    query heads are searched on their own, tagged 'mask_params' (every parameter holding them is
    masked, the output projection's input included: a pruned head's output is not zero). Grouped-query attention splits q[-3] into (kv heads x
    repeats), couples the first part with k[-3] and fixes the repeat. The heads are tagged
    'heads', q[-1] and v[-1] 'head_dim' (and 'split': they are never searched as plain widths).
    An ``attn_mask`` tensor is tied to the scores (q batch.., heads, q_len, k_len) where its dims
    are not broadcast (see :func:`tie_scores_bias`). The output is q[:-1] + [v[-1]].
    """
    q, k, v = c.arg(0, "query"), c.arg(1, "key"), c.arg(2, "value")
    qd, kd, vd = list(tr.get(q)), list(tr.get(k)), list(tr.get(v))
    union(qd[-1], kd[-1])
    if v.shape[-1] == q.shape[-1]:  # models view q, k and v with one head_dim attribute: prune them alike
        union(vd[-1], qd[-1])
    union(kd[-2], vd[-2])  # key/value sequence
    union(kd[-3], vd[-3])
    for i in range(q.dim() - 3):
        union(qd[i], kd[i])
        union(qd[i], vd[i])
    hq, hk = q.shape[-3], k.shape[-3]
    if hq == hk:
        union(qd[-3], kd[-3])
        heads = qd[-3]
    elif hk == 1:  # multi-query attention: every query head reads the one key/value head
        heads = qd[-3]
        tag(heads, "mask_params")  # a pruned head's output (softmax @ shared v) is zeroed where it is read
    else:  # grouped-query attention: query heads = kv heads x repeats
        rep = hq // hk
        parts = split(qd[-3], [hk, rep], "product", f"gqa:{tr.current_module()}")
        union(parts[0], kd[-3])
        fix(parts[1], "")
        heads = kd[-3]
    tag(heads, "heads")
    for s in (qd[-1], vd[-1]):
        tag(s, "head_dim")
        tag(s, "split")
    mask = c.arg(3, "attn_mask", None)
    if isinstance(mask, torch.Tensor):
        tie_scores_bias(tr, mask, qd[:-1] + [kd[-2]], list(q.shape[:-1]) + [k.shape[-2]])
    od = qd[:-1] + [vd[-1]]
    tr.set(c.out, od)
    dq, dv = q.shape[-1], v.shape[-1]
    lk = kd[-2]
    base = qd[:-1]
    tr.record_op("sdpa_qk", c.flops * dq / (dq + dv), base + [lk, qd[-1]])
    tr.record_op("sdpa_av", c.flops * dv / (dq + dv), base + [lk, vd[-1]])
