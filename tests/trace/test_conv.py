"""``conv1d/2d/3d``: dense convs couple x[C] with w[1] and make out[C] = w[0]; depthwise convs couple
x[C] with w[0] and fix w[1]; other grouped convs split x[C] and w[0] into groups x channels per group
(the group factors coupled, tagged ``conv_groups``; per-group channels ``group_channels``; ``groups``
recorded as a size attribute); kernel dims are fixed; output spatial dims are new spaces; bias[0] is
coupled with w[0]. ``conv_transpose1d/2d/3d``: weight (in, out per group, *kernel): x[C] with w[0],
out[C] = w[1]; depthwise transposed convs pass channels through; other grouped ones fix their channels."""

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


def test_grouped_conv_splits_channels_into_groups():
    tr, (x, w, b), out = run_op(lambda x, w, b: F.conv2d(x, w, b, groups=2), torch.randn(2, 4, 6, 6),
                                torch.randn(6, 2, 3, 3), torch.randn(6))
    xd, wd, od = tr.get(x), tr.get(w), tr.get(out)
    assert xd[1].find().kind == "product" and wd[0].find().kind == "product"
    xg, xc = xd[1].find().children
    wg, wc = wd[0].find().children
    assert (xg.find().size, xc.find().size, wg.find().size, wc.find().size) == (2, 2, 2, 3)
    assert same(xg, wg) and same(xc, wd[1]) and not same(wc, xc)
    assert "conv_groups" in xg.find().tags and "group_channels" in xc.find().tags and "group_channels" in wc.find().tags
    assert same(od[1], wd[0]) and same(tr.get(b)[0], wd[0])
    assert all(free(s) for s in (xd[1], wd[0], wd[1]))
    (rec,) = tr.size_attrs
    assert rec.attr == "groups" and same(rec.space, xg)


def test_depthwise_multiplier_conv_is_grouped():
    tr, (x, w), out = run_op(lambda x, w: F.conv1d(x, w, groups=4), torch.randn(2, 4, 9), torch.randn(8, 1, 3))
    xg, xc = tr.get(x)[1].find().children
    assert xc.find().size == 1 and same(xg, tr.get(w)[0].find().children[0]) and free(xg)


@pytest.mark.parametrize("fn,spatial", [(F.conv_transpose1d, (5,)), (F.conv_transpose2d, (4, 3)),
                                        (F.conv_transpose3d, (2, 3, 2))])
def test_dense_conv_transpose(fn, spatial):
    k = (2,) * len(spatial)
    tr, (x, w, b), out = run_op(lambda x, w, b: fn(x, w, b, stride=2), torch.randn(2, 4, *spatial),
                                torch.randn(4, 6, *k), torch.randn(6))
    xd, wd, od = tr.get(x), tr.get(w), tr.get(out)
    assert same(xd[1], wd[0]) and same(od[1], wd[1]) and same(tr.get(b)[0], wd[1])
    assert free(wd[0]) and free(wd[1]) and all(fixed(s) for s in wd[2:])
    assert tr.ops[0].name == "conv_transpose" and tr.ops[0].flops > 0


def test_depthwise_conv_transpose_passes_channels_through():
    tr, (x, w), out = run_op(lambda x, w: F.conv_transpose2d(x, w, groups=4), torch.randn(2, 4, 3, 3),
                             torch.randn(4, 1, 2, 2))
    assert same(tr.get(out)[1], tr.get(x)[1]) and same(tr.get(w)[0], tr.get(x)[1]) and free(tr.get(x)[1])
    assert [r.attr for r in tr.size_attrs] == ["groups"]


def test_grouped_conv_transpose_fixes_its_channels():
    tr, (x, w), out = run_op(lambda x, w: F.conv_transpose2d(x, w, groups=2), torch.randn(2, 4, 3, 3),
                             torch.randn(4, 3, 2, 2))
    assert fixed(tr.get(x)[1]) and fixed(tr.get(w)[1]) and fixed(tr.get(out)[1])
    assert any("grouped transposed convolution (groups=2)" in r for r in tr.get(w)[0].find().fix_reasons)


def test_conv_output_spatial_dims_are_tagged_spatial():
    tr, (x, w), out = run_op(F.conv2d, torch.randn(2, 4, 6, 6), torch.randn(5, 4, 3, 3))
    assert all("spatial" in s.find().tags for s in tr.get(out)[2:])
