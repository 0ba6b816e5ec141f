"""Pooling and resampling pass the batch and channel dims through and give the spatial dims new spaces;
``pixel_shuffle`` fixes the channel dim (it moves channels into space). Nothing else is fixed."""

import torch
import torch.nn.functional as F

from ruletools import fixed, free, run_op, same


def test_pools_keep_channels():
    for fn, shape in [(lambda x: F.avg_pool2d(x, 2), (2, 3, 8, 8)), (lambda x: F.max_pool1d(x, 2), (2, 3, 8)),
                      (lambda x: F.adaptive_avg_pool2d(x, 1), (2, 3, 8, 8)),
                      (lambda x: F.interpolate(x, scale_factor=2.0), (2, 3, 4, 4))]:
        tr, (x,), out = run_op(fn, torch.randn(*shape))
        xd, od = tr.get(x), tr.get(out)
        assert same(od[0], xd[0]) and same(od[1], xd[1]) and free(xd[1])
        assert not any(same(o, i) for o in od[2:] for i in xd[2:])
        assert not tr.unsupported


def test_max_pool_with_indices_labels_both_outputs():
    tr, (x,), (y, i) = run_op(lambda x: F.max_pool2d(x, 2, return_indices=True), torch.randn(2, 3, 4, 4))
    assert same(tr.get(y)[1], tr.get(x)[1]) and same(tr.get(i)[1], tr.get(x)[1])


def test_pixel_shuffle_fixes_channels():
    tr, (x,), out = run_op(lambda x: F.pixel_shuffle(x, 2), torch.randn(1, 8, 3, 3))
    assert fixed(tr.get(x)[1])
