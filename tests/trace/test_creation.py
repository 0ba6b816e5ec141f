"""Created tensors get new *fixed* spaces (export cannot slice data made at run time), so anything they
are combined with becomes unprunable; ``*_like`` of the source's shape shares the source's spaces; zeros
(any slice of zeros is zeros) get unfixed spaces and the ints that sized them are recorded."""

import torch

from ruletools import fixed, free, run_op, same


def test_zeros_like_shares_spaces():
    tr, (x,), out = run_op(lambda x: torch.zeros_like(x) + x, torch.randn(2, 3))
    assert all(same(a, b) for a, b in zip(tr.get(out), tr.get(x))) and all(free(s) for s in tr.get(x))


def test_zeros_do_not_fix_what_they_touch_and_record_their_sizes():
    tr, (x,), out = run_op(lambda x: x.new_zeros(2, 3), torch.randn(2, 3))
    assert all(free(s) for s in tr.get(out)) and all(free(s) for s in tr.get(x))
    assert [r.value for r in tr.reshapes] == [2, 3]
    tr, (x,), out = run_op(lambda x: x + torch.zeros(1, 3), torch.randn(2, 3))
    assert free(tr.get(x)[1]) and [r.value for r in tr.reshapes] == [3]


def test_ones_fix_what_they_touch():
    tr, (x,), out = run_op(lambda x: x * x.new_ones(2, 3), torch.randn(2, 3))
    assert fixed(tr.get(x)[0]) and fixed(tr.get(x)[1])


def test_factory_tensor_fixes_what_it_touches():
    tr, (x,), out = run_op(lambda x: x + torch.ones(3), torch.randn(2, 3))
    assert fixed(tr.get(x)[1]) and free(tr.get(x)[0])


def test_arange_is_fixed_size_one_dims_are_not():
    tr, (x,), out = run_op(lambda x: torch.arange(4), torch.randn(2))
    assert fixed(tr.get(out)[0])
    tr, (x,), out = run_op(lambda x: torch.zeros(1, 1), torch.randn(2))
    assert not tr.get(out)[0].fixed  # size-1 dims are never fixed (nothing to prune)
