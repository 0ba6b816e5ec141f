"""Indexing by tensors (and lists, masks) fixes the dims it indexes by position and passes every other
dim through (basic indexing: tests/trace/test_shape.py); ``x[i] = v`` unites ``v`` with the region written; ``gather`` and
``index_select`` fix the dim they select along and keep the others (an index expanded along a dim
does not tie it)."""

import torch

from ruletools import fixed, free, run_op, same


def test_tensor_index_over_an_unpruned_dim_keeps_the_others():
    idx = torch.tensor([0, 2, 1])
    tr, (x,), out = run_op(lambda x: x[idx], torch.randn(4, 5))
    assert fixed(tr.get(x)[0]) and free(tr.get(x)[1]) and same(tr.get(out)[1], tr.get(x)[1])
    tr, (x,), out = run_op(lambda x: x[:, idx, :], torch.randn(2, 4, 5))
    assert out.shape == (2, 3, 5) and free(tr.get(x)[0]) and fixed(tr.get(x)[1])
    assert same(tr.get(out)[0], tr.get(x)[0]) and same(tr.get(out)[2], tr.get(x)[2])
    assert not tr.unsupported
    tr, (x,), out = run_op(lambda x: x[:, [0, 2]], torch.randn(2, 3, 5))  # a list is an index tensor
    assert fixed(tr.get(x)[1]) and same(tr.get(out)[2], tr.get(x)[2]) and not tr.unsupported


def test_advanced_indices_together_and_apart():
    idx = torch.tensor([0, 1])
    # adjacent: the index dims replace the indexed dims in place (pooling the token at a position per row)
    tr, (x,), out = run_op(lambda x: x[torch.arange(2), idx], torch.randn(2, 4, 5))
    assert out.shape == (2, 5) and fixed(tr.get(x)[0]) and fixed(tr.get(x)[1])
    assert same(tr.get(out)[1], tr.get(x)[2]) and free(tr.get(x)[2])
    # separated by a slice: the index dims go first
    tr, (x,), out = run_op(lambda x: x[idx, :, idx], torch.randn(4, 3, 5))
    assert out.shape == (2, 3) and same(tr.get(out)[1], tr.get(x)[1]) and free(tr.get(x)[1])
    # an int with a tensor index is an advanced index too
    tr, (x,), out = run_op(lambda x: x[0, idx], torch.randn(3, 4, 5))
    assert out.shape == (2, 5) and same(tr.get(out)[1], tr.get(x)[2])


def test_boolean_mask_index():
    mask = torch.tensor([True, False, True, True])
    tr, (x,), out = run_op(lambda x: x[mask], torch.randn(4, 5))
    assert out.shape == (3, 5) and fixed(tr.get(x)[0]) and same(tr.get(out)[1], tr.get(x)[1])
    assert free(tr.get(x)[1]) and fixed(tr.get(out)[0])


def test_setitem_unites_the_value_with_the_region():
    def f(x, v):
        y = x * 1.0
        y[:, 0] = v
        return y

    tr, (x, v), out = run_op(f, torch.randn(2, 3, 5), torch.randn(5))
    assert same(tr.get(v)[0], tr.get(x)[2]) and fixed(tr.get(x)[1]) and free(tr.get(x)[2])
    assert tr.params["p1"].raw


def test_gather_along_a_position_dim():
    pos = torch.tensor([[0], [2]])
    # the same position for every channel: an index expanded along the channels (traced)
    tr, (x,), out = run_op(lambda x: x.gather(1, pos.unsqueeze(-1).expand(-1, -1, x.shape[-1])), torch.randn(2, 4, 5))
    assert out.shape == (2, 1, 5) and fixed(tr.get(x)[1]) and free(tr.get(x)[2])
    assert same(tr.get(out)[2], tr.get(x)[2])


def test_gather_with_a_per_channel_index_ties_the_channels_to_it():
    index = torch.randint(0, 4, (2, 1, 5))  # a different position per channel, made at run time
    tr, (x,), out = run_op(lambda x: x.gather(1, index), torch.randn(2, 4, 5))
    assert fixed(tr.get(x)[2])


def test_index_select():
    tr, (x,), out = run_op(lambda x: x.index_select(0, torch.tensor([3, 1])), torch.randn(4, 5))
    assert fixed(tr.get(x)[0]) and free(tr.get(x)[1]) and same(tr.get(out)[1], tr.get(x)[1])
