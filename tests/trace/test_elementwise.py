"""Elementwise ops pass every dim through. Unary ops (activations, casts, dropout, pointwise math) give
the output the input's spaces; binary ops (add, mul, where, ...) couple the equally sized aligned dims of
all tensor operands by numpy broadcasting (size-1 dims are not coupled). They fix nothing."""

import torch
import torch.nn.functional as F

from dmscale.trace import OpCall, rule_for
from ruletools import fixed, free, run_op, same


def test_unary_passes_spaces_through():
    for fn in (F.relu, F.gelu, torch.tanh, lambda x: x.float(), lambda x: F.dropout(x, 0.1, training=False),
               torch.exp, lambda x: x.clamp(-1, 1), lambda x: -x, lambda x: x ** 2):
        tr, (x,), out = run_op(fn, torch.randn(2, 3))
        assert all(same(a, b) for a, b in zip(tr.get(out), tr.get(x)))
        assert all(free(s) for s in tr.get(x))
        assert not tr.unsupported


def test_unary_with_tensor_operand_broadcasts():
    tr, (x, lo), out = run_op(lambda x, lo: torch.clamp(x, min=lo), torch.randn(2, 3), torch.randn(3))
    assert same(tr.get(lo)[0], tr.get(x)[1])


def test_unary_with_a_differently_shaped_output_is_unsupported():
    tr, (x,), out = run_op(lambda x: x, torch.randn(2, 3))
    y = torch.randn(6)
    rule_for("relu")(tr, OpCall("relu", F.relu, (x,), {}, y, 0.0))
    assert "relu" in tr.unsupported and all(fixed(s) for s in tr.get(x))


def test_add_couples_aligned_dims_and_broadcasts_size_one():
    tr, (x, b, s), out = run_op(lambda x, b, s: x + b + s, torch.randn(2, 5, 4), torch.randn(4), torch.randn(2, 1, 4))
    xd, od = tr.get(x), tr.get(out)
    assert same(tr.get(b)[0], xd[2]) and same(tr.get(s)[2], xd[2]) and same(tr.get(s)[0], xd[0])
    assert not same(tr.get(s)[1], xd[1])
    assert all(same(a, c) for a, c in zip(od, xd))
    assert tr.params["p1"].raw  # a parameter with several elements used elementwise is raw


def test_residual_add_of_two_branches_unites_them():
    tr, (x, w1, w2), out = run_op(lambda x, a, b: F.linear(x, a) * F.linear(x, b), torch.randn(2, 4), torch.randn(6, 4),
                                  torch.randn(6, 4))
    assert same(tr.get(w1)[0], tr.get(w2)[0])


def test_where_and_masked_fill():
    tr, (c, a, b), out = run_op(lambda c, a, b: torch.where(c > 0, a, b), torch.randn(3, 4), torch.randn(3, 4),
                                torch.randn(4))
    assert same(tr.get(c)[1], tr.get(a)[1]) and same(tr.get(b)[0], tr.get(a)[1])
    tr, (x, m), out = run_op(lambda x, m: x.masked_fill(m > 0, 0.0), torch.randn(3, 4), torch.randn(3, 4))
    assert same(tr.get(x)[0], tr.get(m)[0])


def test_scalar_operand():
    tr, (x,), out = run_op(lambda x: x * 2.0 + 1, torch.randn(2, 3))
    assert all(same(a, b) for a, b in zip(tr.get(out), tr.get(x))) and not tr.unsupported


def test_triu_and_data_keep_spaces():
    tr, (x,), out = run_op(lambda x: torch.triu(x).data, torch.randn(3, 3))
    assert all(same(a, b) for a, b in zip(tr.get(out), tr.get(x)))
    assert not tr.unsupported


def test_pow_of_a_scalar_base_broadcasts_like_a_binary_op():
    """ALiBi slopes ``torch.pow(base, powers)`` with a 0-d base: the output has the exponents' dims."""
    tr, (base, p), out = run_op(lambda b, p: torch.pow(b, p), torch.tensor(0.5), torch.arange(1.0, 5.0))
    assert same(tr.get(out)[0], tr.get(p)[0]) and "pow" not in tr.unsupported
