"""Pooling and resampling pass the batch and channel dims through and give the spatial dims new spaces;
``pixel_shuffle`` / ``pixel_unshuffle`` fix the channel dims on both sides (they move channels into space).
Nothing else is fixed."""

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
    xd, od = tr.get(x), tr.get(out)
    assert fixed(xd[1]) and fixed(od[1]) and od[1].size == 2  # C / r^2 output channels: a space of their own
    assert same(od[0], xd[0]) and not same(od[1], xd[1])


def test_pixel_unshuffle_fixes_channels():
    tr, (x,), out = run_op(lambda x: F.pixel_unshuffle(x, 2), torch.randn(1, 2, 6, 6))
    xd, od = tr.get(x), tr.get(out)
    assert fixed(xd[1]) and fixed(od[1]) and od[1].size == 8 and not tr.unsupported


def test_sub_pixel_upsampler_between_convs_searches_the_rest():
    """conv -> pixel_shuffle -> conv (an ESPCN / super-resolution upsampler): the channels around the shuffle
    stay, the convs' other widths are searched, and the export equals the hard-masked supernet."""
    import dmscale

    class Up(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.c1, self.c2 = torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.Conv2d(16, 32, 3, padding=1)
            self.c3, self.c4 = torch.nn.Conv2d(8, 12, 3, padding=1), torch.nn.Conv2d(12, 3, 3, padding=1)

        def forward(self, x):
            return self.c4(torch.relu(self.c3(F.pixel_shuffle(self.c2(torch.relu(self.c1(x))), 2))))

    x = torch.randn(2, 3, 8, 8)
    dms = dmscale.DMS(Up(), (x,), dmscale.Target(flops=0.7), total_steps=5, warn=False)
    assert sorted(g.name for g in dms.groups) == ["c1", "c3"]
    with torch.no_grad():
        for g in dms.groups:
            dms.space.ratio(g).fill_(0.5)
    ex = dms.export(project=False)
    with torch.no_grad(), dms.hard():
        ref = dms.model(x)
    torch.testing.assert_close(ex(x), ref, atol=1e-5, rtol=1e-5)
    assert ex.c1.out_channels == 8 and ex.c3.out_channels == 6 and ex.c2.out_channels == 32
