"""``scaled_dot_product_attention``: q/k/v head and batch dims tied; grouped-query heads as a product."""

from __future__ import annotations

import torch

from ..registry import op_rule
from ..spaces import fix, split, tag, union


@op_rule("scaled_dot_product_attention")
def sdpa(tr, c) -> None:
    """Couples q[-1] with k[-1], k/v sequence and head dims, and all leading batch dims.

    Equal head counts couple q[-3] with k[-3]; grouped-query attention splits q[-3] into
    (kv heads x repeats), couples the first part with k[-3] and fixes the repeat. The heads
    are tagged 'heads', q[-1] and v[-1] 'head_dim'. The output is q[:-1] + [v[-1]]. An
    ``attn_mask`` tensor is only labelled (a tensor of unknown origin is fixed there).
    """
    q, k, v = c.arg(0, "query"), c.arg(1, "key"), c.arg(2, "value")
    qd, kd, vd = list(tr.get(q)), list(tr.get(k)), list(tr.get(v))
    union(qd[-1], kd[-1])
    union(kd[-2], vd[-2])  # key/value sequence
    union(kd[-3], vd[-3])
    for i in range(q.dim() - 3):
        union(qd[i], kd[i])
        union(qd[i], vd[i])
    hq, hk = q.shape[-3], k.shape[-3]
    if hq == hk:
        union(qd[-3], kd[-3])
        heads = qd[-3]
    else:  # grouped-query attention: query heads = kv heads x repeats
        rep = hq // hk
        parts = split(qd[-3], [hk, rep], "product", f"gqa:{tr.current_module()}")
        union(parts[0], kd[-3])
        fix(parts[1], "")
        heads = kd[-3]
    tag(heads, "heads")
    tag(qd[-1], "head_dim")
    tag(vd[-1], "head_dim")
    mask = c.arg(3, "attn_mask", None)
    if isinstance(mask, torch.Tensor):
        tr.get(mask)
    od = qd[:-1] + [vd[-1]]
    tr.set(c.out, od)
    dq, dv = q.shape[-1], v.shape[-1]
    lk = kd[-2]
    base = qd[:-1]
    tr.record_op("sdpa_qk", c.flops * dq / (dq + dv), base + [lk, qd[-1]])
    tr.record_op("sdpa_av", c.flops * dv / (dq + dv), base + [lk, vd[-1]])
