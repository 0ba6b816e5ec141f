"""``scaled_dot_product_attention`` couples q[-1] with k[-1], the key/value sequence and head dims and all
leading batch dims; equal head counts couple q/k/v heads; grouped-query attention makes the query heads
a product (kv heads x repeats), couples the first factor with the kv heads and fixes the repeats;
multi-query attention (one kv head) leaves the query heads free. The heads are tagged 'heads', q[-1] /
v[-1] 'head_dim'. An attn_mask is tied to the scores' dims it does not broadcast over (a per-head bias
follows the query heads). The output is q[:-1] + [v[-1]]."""

import torch
import torch.nn.functional as F

from ruletools import fixed, free, run_op, same


def test_sdpa_equal_heads():
    tr, (q, k, v), out = run_op(F.scaled_dot_product_attention, torch.randn(2, 4, 5, 8), torch.randn(2, 4, 6, 8),
                                torch.randn(2, 4, 6, 3))
    qd, kd, vd, od = tr.get(q), tr.get(k), tr.get(v), tr.get(out)
    assert same(qd[-1], kd[-1]) and same(kd[-2], vd[-2]) and same(qd[1], kd[1]) and same(kd[1], vd[1])
    assert same(qd[0], kd[0]) and same(qd[0], vd[0])
    assert not same(qd[-1], vd[-1]) and not same(qd[-2], kd[-2])  # v's head dim (3) differs from q's (8)
    assert same(od[-1], vd[-1]) and same(od[-2], qd[-2]) and same(od[1], qd[1])
    assert "heads" in qd[1].find().tags and "head_dim" in qd[-1].find().tags and "head_dim" in vd[-1].find().tags
    assert all(free(s) for s in (qd[1], qd[-1], vd[-1]))
    names = [o.name for o in tr.ops]
    assert names == ["sdpa_qk", "sdpa_av"]
    total = sum(o.flops for o in tr.ops)
    assert abs(tr.ops[0].flops / total - 8 / 11) < 1e-9


def test_sdpa_equal_head_dims_are_pruned_alike():
    tr, (q, k, v), out = run_op(F.scaled_dot_product_attention, torch.randn(2, 4, 5, 8), torch.randn(2, 4, 6, 8),
                                torch.randn(2, 4, 6, 8))
    assert same(tr.get(q)[-1], tr.get(v)[-1]) and same(tr.get(out)[-1], tr.get(q)[-1])


def test_sdpa_grouped_query_heads():
    tr, (q, k, v), out = run_op(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, enable_gqa=True),
                                torch.randn(1, 6, 5, 4), torch.randn(1, 2, 5, 4), torch.randn(1, 2, 5, 4))
    qh = tr.get(q)[1].find()
    assert qh.kind == "product" and [c.find().size for c in qh.children] == [2, 3]
    kv, rep = qh.children
    assert same(kv, tr.get(k)[1]) and same(kv, tr.get(v)[1]) and free(kv)
    assert fixed(rep)
    assert "heads" in kv.find().tags


def test_sdpa_attn_mask_without_head_dim_leaves_heads_free():
    mask = torch.zeros(5, 5)
    tr, (q, k, v), out = run_op(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=mask),
                                torch.randn(1, 2, 5, 4), torch.randn(1, 2, 5, 4), torch.randn(1, 2, 5, 4))
    assert free(tr.get(q)[1]) and free(tr.get(q)[-1])
    assert all(fixed(s) for s in tr.get(mask))


def test_sdpa_per_head_bias_is_tied_to_the_query_heads():
    """A learned (heads, q, k) bias passed as attn_mask (T5, Swin): its head dim is the query heads."""
    tr, (q, k, v, bias), out = run_op(
        lambda q, k, v, b: F.scaled_dot_product_attention(q, k, v, attn_mask=b[None]),
        torch.randn(2, 3, 5, 4), torch.randn(2, 3, 6, 4), torch.randn(2, 3, 6, 4), torch.randn(3, 5, 6))
    assert same(tr.get(bias)[0], tr.get(q)[1]) and free(tr.get(q)[1])
    # GQA: a (6 query heads) bias is the whole kv heads x repeats product
    tr, (q, k, v, bias), out = run_op(
        lambda q, k, v, b: F.scaled_dot_product_attention(q, k, v, attn_mask=b, enable_gqa=True),
        torch.randn(1, 6, 5, 4), torch.randn(1, 2, 5, 4), torch.randn(1, 2, 5, 4), torch.randn(1, 6, 5, 5))
    assert same(tr.get(bias)[1], tr.get(q)[1]) and free(tr.get(k)[1])


def test_sdpa_bias_computed_from_the_head_count_fixes_the_heads():
    """ALiBi: slopes made by arange from the head count cannot follow pruned heads, so heads are fixed."""
    def alibi_attention(q, k, v):
        slopes = torch.pow(2.0, -torch.arange(1, 4, dtype=torch.float32))
        bias = slopes[:, None, None] * torch.arange(6, dtype=torch.float32)[None, None, :]
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias[None])

    tr, (q, k, v), out = run_op(alibi_attention, torch.randn(2, 3, 5, 4), torch.randn(2, 3, 6, 4),
                                torch.randn(2, 3, 6, 4))
    assert fixed(tr.get(q)[1]) and free(tr.get(q)[-1])


def test_sdpa_multi_query_heads_are_free():
    """One key/value head (multi-query attention): the query heads are searched on their own."""
    tr, (q, k, v), out = run_op(F.scaled_dot_product_attention, torch.randn(2, 4, 5, 8),
                                torch.randn(2, 1, 5, 8), torch.randn(2, 1, 5, 8))
    qh = tr.get(q)[1]
    assert free(qh) and "heads" in qh.find().tags and qh.find().kind == "atomic"
    assert "split" in tr.get(v)[-1].find().tags  # the kv head dim is never searched as a plain width
