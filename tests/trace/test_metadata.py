"""Metadata reads (``size``, ``dim``, ``numel``, ``shape``, ``item``, ...) couple and fix nothing and
are never reported as unsupported."""

import torch
import torch.nn.functional as F

from ruletools import free, run_op


def test_metadata_reads_are_free():
    def fn(x, w):
        n = x.size(-1) + x.dim() + x.numel() + x.shape[0] + len(x) + int(x.is_contiguous()) + x.stride(0)
        return F.linear(x, w) * (n > 0)

    tr, (x, w), out = run_op(fn, torch.randn(2, 3), torch.randn(4, 3))
    assert not tr.unsupported
    assert free(tr.get(w)[0]) and free(tr.get(w)[1])


def test_item_on_a_reduction_fixes_only_the_reduced_dims():
    tr, (x,), out = run_op(lambda x: x * float(x.sum().item() > 0), torch.randn(2, 3))
    assert not tr.unsupported
