"""``conv1d/2d/3d``: dense convs couple x[C] with w[1] and make out[C] = w[0]; depthwise convs couple
x[C] with w[0] and fix w[1]; other grouped convs fix all their channel dims; kernel dims are fixed;
output spatial dims are new spaces; bias[0] is coupled with w[0]."""

import pytest
import torch
import torch.nn.functional as F

from ruletools import fixed, free, run_op, same


@pytest.mark.parametrize("fn,spatial", [(F.conv1d, (9,)), (F.conv2d, (6, 7)), (F.conv3d, (4, 5, 3))])
def test_dense_conv(fn, spatial):
    k = (3,) * len(spatial)
    tr, (x, w, b), out = run_op(lambda x, w, b: fn(x, w, b, padding=1), torch.randn(2, 4, *spatial),
                                torch.randn(6, 4, *k), torch.randn(6))
    xd, wd, od = tr.get(x), tr.get(w), tr.get(out)
    assert same(xd[1], wd[1]) and same(od[1], wd[0]) and same(tr.get(b)[0], wd[0])
    assert same(od[0], xd[0])
    assert free(wd[0]) and free(wd[1])
    assert all(fixed(s) for s in wd[2:])
    assert not any(same(o, i) for o in od[2:] for i in xd[2:])
    assert tr.ops[0].name == "conv" and tr.ops[0].flops > 0


def test_unbatched_conv_uses_dim_0_as_channels():
    tr, (x, w), out = run_op(F.conv2d, torch.randn(4, 6, 6), torch.randn(5, 4, 3, 3))
    assert same(tr.get(x)[0], tr.get(w)[1]) and same(tr.get(out)[0], tr.get(w)[0])


def test_depthwise_conv_passes_channels_through():
    tr, (x, w), out = run_op(lambda x, w: F.conv2d(x, w, groups=4), torch.randn(2, 4, 6, 6), torch.randn(4, 1, 3, 3))
    xd, wd, od = tr.get(x), tr.get(w), tr.get(out)
    assert same(xd[1], wd[0]) and same(od[1], xd[1]) and free(xd[1])
    assert fixed(wd[1])


def test_grouped_conv_fixes_its_channels():
    tr, (x, w), out = run_op(lambda x, w: F.conv2d(x, w, groups=2), torch.randn(2, 4, 6, 6), torch.randn(6, 2, 3, 3))
    xd, wd = tr.get(x), tr.get(w)
    for s in (xd[1], wd[0], wd[1]):
        assert fixed(s)
    assert any("grouped convolution (groups=2)" in r for r in wd[0].find().fix_reasons)
