"""``scaled_dot_product_attention`` couples q[-1] with k[-1], the key/value sequence and head dims and all
leading batch dims; equal head counts couple q/k/v heads; grouped-query attention makes the query heads
a product (kv heads x repeats), couples the first factor with the kv heads and fixes the repeats. The
heads are tagged 'heads', q[-1] / v[-1] 'head_dim'. The output is q[:-1] + [v[-1]]."""

import torch
import torch.nn.functional as F

from ruletools import fixed, free, run_op, same


def test_sdpa_equal_heads():
    tr, (q, k, v), out = run_op(F.scaled_dot_product_attention, torch.randn(2, 4, 5, 8), torch.randn(2, 4, 6, 8),
                                torch.randn(2, 4, 6, 3))
    qd, kd, vd, od = tr.get(q), tr.get(k), tr.get(v), tr.get(out)
    assert same(qd[-1], kd[-1]) and same(kd[-2], vd[-2]) and same(qd[1], kd[1]) and same(kd[1], vd[1])
    assert same(qd[0], kd[0]) and same(qd[0], vd[0])
    assert not same(qd[-1], vd[-1]) and not same(qd[-2], kd[-2])
    assert same(od[-1], vd[-1]) and same(od[-2], qd[-2]) and same(od[1], qd[1])
    assert "heads" in qd[1].find().tags and "head_dim" in qd[-1].find().tags and "head_dim" in vd[-1].find().tags
    assert all(free(s) for s in (qd[1], qd[-1], vd[-1]))
    names = [o.name for o in tr.ops]
    assert names == ["sdpa_qk", "sdpa_av"]
    total = sum(o.flops for o in tr.ops)
    assert abs(tr.ops[0].flops / total - 8 / 11) < 1e-9


def test_sdpa_grouped_query_heads():
    tr, (q, k, v), out = run_op(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, enable_gqa=True),
                                torch.randn(1, 6, 5, 4), torch.randn(1, 2, 5, 4), torch.randn(1, 2, 5, 4))
    qh = tr.get(q)[1].find()
    assert qh.kind == "product" and [c.find().size for c in qh.children] == [2, 3]
    kv, rep = qh.children
    assert same(kv, tr.get(k)[1]) and same(kv, tr.get(v)[1]) and free(kv)
    assert fixed(rep)
    assert "heads" in kv.find().tags


def test_sdpa_attn_mask_of_unknown_origin_is_only_labelled():
    mask = torch.zeros(5, 5)
    tr, (q, k, v), out = run_op(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=mask),
                                torch.randn(1, 2, 5, 4), torch.randn(1, 2, 5, 4), torch.randn(1, 2, 5, 4))
    assert free(tr.get(q)[1]) and free(tr.get(q)[-1])
    assert all(fixed(s) for s in tr.get(mask))
