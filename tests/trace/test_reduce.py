"""Reductions fix the reduced dims (all dims without ``dim``) and pass the others through; ``keepdim``
outputs get new size-1 spaces there. Softmax-like ops (softmax, log_softmax, cumsum) keep the shape and
fix the normalised dim."""

import torch

from ruletools import fixed, free, run_op, same


def test_mean_over_one_dim():
    tr, (x,), out = run_op(lambda x: x.mean(-1), torch.randn(2, 3, 4))
    xd = tr.get(x)
    assert fixed(xd[2]) and free(xd[0]) and free(xd[1])
    assert same(tr.get(out)[1], xd[1])


def test_keepdim_and_several_dims():
    tr, (x,), out = run_op(lambda x: x.sum(dim=(1, 2), keepdim=True), torch.randn(2, 3, 4))
    xd, od = tr.get(x), tr.get(out)
    assert fixed(xd[1]) and fixed(xd[2]) and free(xd[0])
    assert same(od[0], xd[0]) and od[1].size == 1 and not same(od[1], xd[1])


def test_full_reduction_fixes_everything():
    tr, (x,), out = run_op(lambda x: x.sum(), torch.randn(2, 3))
    assert all(fixed(s) for s in tr.get(x))


def test_norm_reads_dim_from_third_argument():
    tr, (x,), out = run_op(lambda x: torch.norm(x, 2, 1), torch.randn(2, 3))
    assert fixed(tr.get(x)[1]) and free(tr.get(x)[0])


def test_max_with_dim_labels_values_and_indices():
    tr, (x,), (vals, idx) = run_op(lambda x: x.max(dim=1), torch.randn(2, 3))
    assert same(tr.get(vals)[0], tr.get(x)[0]) and same(tr.get(idx)[0], tr.get(x)[0]) and fixed(tr.get(x)[1])


def test_softmax_fixes_its_dim_only():
    tr, (x,), out = run_op(lambda x: x.softmax(-1), torch.randn(2, 3, 4))
    xd = tr.get(x)
    assert fixed(xd[2]) and free(xd[1]) and all(same(a, b) for a, b in zip(tr.get(out), xd))
    tr, (x,), out = run_op(lambda x: torch.cumsum(x, dim=0), torch.randn(2, 3))
    assert fixed(tr.get(x)[0]) and free(tr.get(x)[1])


def test_topk_and_sort_fix_the_selected_dim_only():
    """A MoE router's ``topk`` over experts: the expert dim is fixed, the token dims pass through."""
    tr, (x,), (vals, idx) = run_op(lambda x: torch.topk(x, 2, dim=-1), torch.randn(5, 4))
    assert fixed(tr.get(x)[1]) and free(tr.get(x)[0])
    assert same(tr.get(vals)[0], tr.get(x)[0]) and same(tr.get(idx)[0], tr.get(x)[0]) and fixed(tr.get(vals)[1])
    tr, (x,), out = run_op(lambda x: x.sort(dim=0).values, torch.randn(5, 4))
    assert fixed(tr.get(x)[0]) and same(tr.get(out)[1], tr.get(x)[1]) and free(tr.get(x)[1])
