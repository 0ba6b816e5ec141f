"""``F.multi_head_attention_forward`` (what ``nn.MultiheadAttention`` calls): one rule for the whole op.

Under a ``TorchFunctionMode`` the function is dispatched as one call (its insides are not seen),
so the rule labels it from its arguments: the inner width (heads x head_dim) is the output
projection's input dim, split into a product; the q / k / v projections' output dims are that
inner width (three stacked copies in the packed ``in_proj_weight``); their input dims are the
widths of query / key / value; the output is ``out_proj_weight``'s dim 0. Heads are tagged
``heads``, the head size ``head_dim``. The attention weights it returns are averaged over (or
indexed by) heads, so the heads are fixed if anything reads them; a 3-D ``attn_mask`` (one per
batch x head) fixes them too. Export sets ``num_heads`` from the kept heads
(:mod:`dmscale.layers.mha`).
"""

from __future__ import annotations

import torch

from ..registry import op_rule
from ..spaces import Space, composite, fix, split, tag, union


@op_rule("multi_head_attention_forward")
def multi_head_attention(tr, c) -> None:
    """See the module docstring. FLOPs are recorded per projection and for the attention products."""
    q, k, v = c.arg(0, "query"), c.arg(1, "key"), c.arg(2, "value")
    heads_n = int(c.arg(4, "num_heads"))
    w_in, b_in = c.arg(5, "in_proj_weight"), c.arg(6, "in_proj_bias")
    bias_k, bias_v = c.arg(7, "bias_k"), c.arg(8, "bias_v")
    w_out, b_out = c.arg(11, "out_proj_weight"), c.arg(12, "out_proj_bias")
    kpm = c.arg(14, "key_padding_mask", None)
    attn_mask = c.arg(16, "attn_mask", None)
    separate = bool(c.arg(17, "use_separate_proj_weight", False))
    wq, wk, wv = c.arg(18, "q_proj_weight", None), c.arg(19, "k_proj_weight", None), c.arg(20, "v_proj_weight", None)
    static_k, static_v = c.arg(21, "static_k", None), c.arg(22, "static_v", None)
    if static_k is not None or static_v is not None or not isinstance(w_out, torch.Tensor):
        return tr.unknown(c.name, c.args, c.kwargs, c.out, f"{c.name} with static_k / static_v")
    where = tr.current_module() or "model"
    qd, kd, vd = list(tr.get(q)), list(tr.get(k)), list(tr.get(v))
    batched = q.dim() == 3
    inner_n = w_out.shape[1]
    od_w = list(tr.get(w_out))
    heads, hdim = split(od_w[1], [heads_n, inner_n // heads_n], "product", f"mha:{where}")
    inner = od_w[1]
    tag(heads, "heads")
    tag(hdim, "head_dim")
    for s in (heads, hdim):
        s.find().tags.add("act")
    if not separate:
        wd = list(tr.get(w_in))
        union(wd[0], composite("concat", [inner, inner, inner], f"qkv:{where}"))
        for t in (qd, kd, vd):
            union(wd[1], t[-1])
        proj_in = [(qd, wd[1]), (kd, wd[1]), (vd, wd[1])]
    else:
        proj_in = []
        for w, t in ((wq, qd), (wk, kd), (wv, vd)):
            wd = list(tr.get(w))
            union(wd[0], inner)
            union(wd[1], t[-1])
            proj_in.append((t, wd[1]))
    if isinstance(b_in, torch.Tensor):
        union(tr.get(b_in)[0], composite("concat", [inner, inner, inner], f"qkv:{where}"))
    for b in (bias_k, bias_v):
        if isinstance(b, torch.Tensor):
            union(tr.get(b)[-1], inner)
    if isinstance(b_out, torch.Tensor):
        union(tr.get(b_out)[0], od_w[0])
    if batched:
        union(qd[1], kd[1])
        union(qd[1], vd[1])
    union(kd[0], vd[0])
    if isinstance(kpm, torch.Tensor):
        kp = tr.get(kpm)
        if batched and kpm.dim() == 2:
            union(kp[0], qd[1])
        if kpm.shape[-1] == k.shape[0]:
            union(kp[-1], kd[0])
    if isinstance(attn_mask, torch.Tensor):
        tr.get(attn_mask)
        if attn_mask.dim() == 3 and attn_mask.shape[0] > 1:
            fix(heads, f"3-D attn_mask (one per batch x head) in {where}")
    out, weights = c.out
    tr.set(out, ([qd[0], qd[1]] if batched else [qd[0]]) + [od_w[0]])
    if isinstance(weights, torch.Tensor):
        tr.set(weights, tr.fresh(weights))
        tr.watch(weights, lambda op: fix(heads, f"attention weights of {where} (over heads) read by {op}"))
    # FLOPs: projections and attention products at full size, scaled to what was measured
    n = q.shape[1] if batched else 1
    lq, lk = q.shape[0], k.shape[0]
    batch = [qd[1]] if batched else []
    terms: list[tuple[float, list[Space]]] = []
    for (t, w_in_dim), rows in zip(proj_in, (lq, lk, lk)):
        terms.append((2.0 * rows * n * w_in_dim.find().size * inner_n, [t[0]] + batch + [w_in_dim, inner]))
    lk_att = lk + int(isinstance(bias_k, torch.Tensor)) + int(bool(c.arg(9, "add_zero_attn", False)))
    terms.append((4.0 * n * lq * lk_att * inner_n, [qd[0], kd[0]] + batch + [inner]))
    terms.append((2.0 * lq * n * inner_n * w_out.shape[0], [qd[0]] + batch + [inner, od_w[0]]))
    total = sum(f for f, _ in terms)
    for f, dims in terms:
        tr.record_op("mha", c.flops * f / total if total else 0.0, dims)
    tr.record_size_attr("num_heads", heads)
