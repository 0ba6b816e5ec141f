"""Matrix products couple the contracted dims (a[-1] with b[-2]; with vectors, the vector's dim) and
equally sized batch dims; out = batch + [a[-2], b[-1]]; they fix nothing. Two 4-D operands tag the last
batch dim 'heads' and the contracted dim 'head_dim'; otherwise the factors of a batch dim split off a feature
dim (heads folded into the batch, ``view(B * H, T, D)`` + ``bmm``) are tagged 'heads'. ``addmm``-style ops also unite the added input
with the product by broadcasting. Parameters used as operands are raw (masked by parametrization)."""

import torch

from ruletools import free, run_op, same


def test_matmul_2d():
    tr, (a, b), out = run_op(lambda a, b: a @ b, torch.randn(3, 4), torch.randn(4, 5))
    ad, bd, od = tr.get(a), tr.get(b), tr.get(out)
    assert same(ad[1], bd[0]) and same(od[0], ad[0]) and same(od[1], bd[1])
    assert all(free(s) for s in ad + bd)
    assert tr.ops[0].name in ("matmul", "__matmul__") and tr.ops[0].flops == 2 * 3 * 4 * 5
    assert tr.params["p0"].raw and tr.params["p1"].raw


def test_mm_bmm_and_matmul_names():
    for fn in (torch.mm, torch.matmul):
        tr, (a, b), out = run_op(fn, torch.randn(3, 4), torch.randn(4, 5))
        assert same(tr.get(a)[1], tr.get(b)[0])
    tr, (a, b), out = run_op(torch.bmm, torch.randn(2, 3, 4), torch.randn(2, 4, 5))
    assert same(tr.get(a)[0], tr.get(b)[0]) and same(tr.get(out)[0], tr.get(a)[0])


def test_batched_4d_matmul_tags_heads_and_head_dim():
    tr, (q, k), out = run_op(lambda q, k: q @ k.transpose(-1, -2), torch.randn(2, 4, 5, 8), torch.randn(2, 4, 6, 8))
    qd, kd, od = tr.get(q), tr.get(k), tr.get(out)
    assert same(qd[-1], kd[-1]) and same(qd[1], kd[1]) and same(qd[0], kd[0])
    assert "heads" in qd[1].find().tags and "head_dim" in qd[-1].find().tags
    assert same(od[2], qd[2]) and same(od[3], kd[2])


def test_heads_folded_into_the_batch_dim_are_tagged_heads():
    """``(B, T, H * D) -> (B * H, T, D)`` then ``bmm``: the H factor of the projection's width is heads, the
    D factor head_dim; the batch factor is untouched, and unfolding after the bmm finds the same spaces."""
    def attend(x):
        b, t, _ = x.shape
        q = x.view(b, t, 4, 2).transpose(1, 2).reshape(b * 4, t, 2)
        out = torch.bmm(torch.bmm(q, q.transpose(1, 2)).softmax(-1), q)
        return out.view(b, 4, t, 2).transpose(1, 2).reshape(b, t, 8)

    tr, (x,), out = run_op(attend, torch.randn(3, 5, 8))
    heads, head_dim = tr.get(x)[2].find().children
    assert "heads" in heads.find().tags and "head_dim" not in heads.find().tags
    assert "head_dim" in head_dim.find().tags and "heads" not in head_dim.find().tags
    assert "heads" not in tr.get(x)[0].find().tags and free(heads) and free(head_dim)
    assert all(same(a, b) for a, b in zip(tr.get(out)[2].find().children, (heads, head_dim)))


def test_bmm_of_unsplit_batch_tags_nothing():
    tr, (a, b), out = run_op(torch.bmm, torch.randn(2, 3, 4), torch.randn(2, 4, 5))
    assert not any(t in s.find().tags for s in tr.get(a) + tr.get(b) for t in ("heads", "head_dim"))


def test_broadcast_batch_dim():
    tr, (a, b), out = run_op(torch.matmul, torch.randn(2, 3, 4), torch.randn(4, 5))
    od = tr.get(out)
    assert same(od[0], tr.get(a)[0]) and same(tr.get(a)[2], tr.get(b)[0])


def test_vector_operands():
    tr, (v, m), out = run_op(torch.matmul, torch.randn(4), torch.randn(4, 5))
    assert same(tr.get(v)[0], tr.get(m)[0]) and same(tr.get(out)[0], tr.get(m)[1])
    tr, (m, v), out = run_op(torch.matmul, torch.randn(3, 4), torch.randn(4))
    assert same(tr.get(v)[0], tr.get(m)[1]) and same(tr.get(out)[0], tr.get(m)[0])
    tr, (u, v), out = run_op(torch.matmul, torch.randn(4), torch.randn(4))
    assert same(tr.get(u)[0], tr.get(v)[0]) and tr.get(out) == []


def test_addmm_unites_bias_with_output_columns():
    tr, (c, a, b), out = run_op(torch.addmm, torch.randn(5), torch.randn(3, 4), torch.randn(4, 5))
    assert same(tr.get(c)[0], tr.get(b)[1]) and same(tr.get(out)[1], tr.get(b)[1])
    assert same(tr.get(a)[1], tr.get(b)[0])


def test_baddbmm():
    tr, (c, a, b), out = run_op(torch.baddbmm, torch.randn(2, 3, 5), torch.randn(2, 3, 4), torch.randn(2, 4, 5))
    assert same(tr.get(c)[2], tr.get(b)[2]) and same(tr.get(c)[0], tr.get(a)[0])


def test_baddbmm_with_beta_and_alpha():
    tr, (c, a, b), out = run_op(lambda c, a, b: torch.baddbmm(c, a, b, beta=0.5, alpha=2.0), torch.randn(2, 3, 5),
                                torch.randn(2, 3, 4), torch.randn(2, 4, 5))
    assert same(tr.get(a)[2], tr.get(b)[1]) and same(tr.get(c)[0], tr.get(a)[0]) and same(tr.get(c)[2], tr.get(b)[2])
    assert tr.ops[0].flops > 0 and not tr.unsupported


def test_addbmm_contracts_the_batch_dim():
    tr, (c, a, b), out = run_op(torch.addbmm, torch.randn(3, 5), torch.randn(2, 3, 4), torch.randn(2, 4, 5))
    assert out.shape == (3, 5) and same(tr.get(a)[0], tr.get(b)[0]) and same(tr.get(a)[2], tr.get(b)[1])
    assert same(tr.get(out)[0], tr.get(a)[1]) and same(tr.get(c)[1], tr.get(b)[2]) and not tr.unsupported
