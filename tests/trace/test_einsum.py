"""``einsum``: each subscript letter is one space (operands' and output's dims with that letter are
coupled); a letter summed within one operand or repeated in one operand (a diagonal) is fixed; with
two operands, split batch letters are tagged heads and split contracted letters head_dim."""

import torch

from ruletools import fixed, free, run_op, same


def test_attention_scores():
    tr, (q, k), out = run_op(lambda q, k: torch.einsum("bihd,bjhd->bhij", q, k), torch.randn(2, 5, 3, 4),
                             torch.randn(2, 6, 3, 4))
    qd, kd, od = tr.get(q), tr.get(k), tr.get(out)
    assert same(qd[0], kd[0]) and same(qd[2], kd[2]) and same(qd[3], kd[3])
    assert same(od[1], qd[2]) and same(od[2], qd[1]) and same(od[3], kd[1])
    assert all(free(s) for s in qd + kd)
    assert tr.ops[-1].name == "einsum" and tr.ops[-1].flops == 2 * 2 * 5 * 6 * 3 * 4


def test_heads_are_tagged_when_split_from_a_projection():
    def f(x, wq, wk):
        q = (x @ wq).view(2, 5, 3, 4)
        k = (x @ wk).view(2, 5, 3, 4)
        return torch.einsum("bihd,bjhd->bhij", q, k)

    tr, (x, wq, wk), out = run_op(f, torch.randn(2, 5, 8), torch.randn(8, 12), torch.randn(8, 12))
    h, d = tr.get(wq)[1].find().children
    assert "heads" in h.find().tags and "head_dim" in d.find().tags and "heads" not in d.find().tags


def test_linear_written_as_einsum():
    tr, (x, w), out = run_op(lambda x, w: torch.einsum("bni,io->bno", x, w), torch.randn(2, 3, 4), torch.randn(4, 6))
    assert same(tr.get(x)[2], tr.get(w)[0]) and same(tr.get(out)[2], tr.get(w)[1]) and same(tr.get(out)[1], tr.get(x)[1])
    assert tr.params["p1"].raw


def test_sums_and_diagonals_are_fixed():
    tr, (a,), out = run_op(lambda a: torch.einsum("ij->i", a), torch.randn(3, 4))
    assert fixed(tr.get(a)[1]) and free(tr.get(a)[0])
    tr, (a,), out = run_op(lambda a: torch.einsum("ii->i", a), torch.randn(3, 3))
    assert fixed(tr.get(a)[0]) and fixed(tr.get(a)[1])


def test_ellipsis_and_implicit_output():
    tr, (a, b), out = run_op(lambda a, b: torch.einsum("...i,ij", a, b), torch.randn(2, 5, 3), torch.randn(3, 4))
    assert out.shape == (2, 5, 4)
    assert same(tr.get(a)[2], tr.get(b)[0]) and same(tr.get(out)[2], tr.get(b)[1]) and same(tr.get(out)[1], tr.get(a)[1])
    tr, (a, b), out = run_op(lambda a, b: torch.einsum("ij,jk", [a, b]), torch.randn(2, 3), torch.randn(3, 4))
    assert same(tr.get(out)[0], tr.get(a)[0]) and same(tr.get(out)[1], tr.get(b)[1])


def test_broadcast_of_size_one_dims():
    tr, (a, b), out = run_op(lambda a, b: torch.einsum("bij,bjk->bik", a, b), torch.randn(1, 2, 3), torch.randn(4, 3, 5))
    assert out.shape == (4, 2, 5) and same(tr.get(out)[0], tr.get(b)[0]) and same(tr.get(a)[2], tr.get(b)[1])
