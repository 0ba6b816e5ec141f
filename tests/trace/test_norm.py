"""Norm ops pass every dim through. ``batch_norm`` couples its statistics and affine parameters with the
channel dim; a bare ``layer_norm`` / ``rms_norm`` call couples weight / bias with the normalised dims and
fixes them (statistics over them; norm *layers* are traced as units, see tests/layers/test_norms.py);
``group_norm`` couples weight / bias with dim 1 and fixes it unless groups == channels."""

import torch
import torch.nn.functional as F

from ruletools import fixed, free, run_op, same


def test_batch_norm_couples_stats_and_affine_with_channels():
    tr, (x, rm, rv, w, b), out = run_op(lambda x, rm, rv, w, b: F.batch_norm(x, rm, rv, w, b),
                                        torch.randn(3, 4, 5), torch.zeros(4), torch.ones(4), torch.randn(4),
                                        torch.randn(4))
    xd = tr.get(x)
    for t in (rm, rv, w, b):
        assert same(tr.get(t)[0], xd[1])
    assert all(same(a, b) for a, b in zip(tr.get(out), xd))
    assert all(free(s) for s in xd)


def test_batch_norm_on_2d_input_uses_dim_1():
    tr, (x, rm, rv), out = run_op(lambda x, rm, rv: F.batch_norm(x, rm, rv), torch.randn(3, 4), torch.zeros(4),
                                  torch.ones(4))
    assert same(tr.get(rm)[0], tr.get(x)[1]) and not same(tr.get(rm)[0], tr.get(x)[0])


def test_bare_layer_norm_over_last_dim_fixes_it():
    tr, (x, w, b), out = run_op(lambda x, w, b: F.layer_norm(x, (6,), w, b), torch.randn(2, 3, 6), torch.randn(6),
                                torch.randn(6))
    xd = tr.get(x)
    assert same(tr.get(w)[0], xd[-1]) and same(tr.get(b)[0], xd[-1])
    assert same(tr.get(out)[-1], xd[-1]) and fixed(xd[-1]) and free(xd[0])
    assert any("layer_norm over 1 dim outside a recognised norm layer" in r for r in xd[-1].find().fix_reasons)


def test_layer_norm_over_two_dims_fixes_both():
    tr, (x, w), out = run_op(lambda x, w: F.layer_norm(x, (3, 6), w), torch.randn(2, 3, 6), torch.randn(3, 6))
    xd = tr.get(x)
    assert same(tr.get(w)[0], xd[1]) and same(tr.get(w)[1], xd[2])
    assert fixed(xd[1]) and fixed(xd[2]) and free(xd[0])


def test_bare_rms_norm_couples_weight_and_fixes():
    tr, (x, w), out = run_op(lambda x, w: F.rms_norm(x, (6,), w, 1e-6), torch.randn(2, 6), torch.randn(6))
    assert same(tr.get(w)[0], tr.get(x)[-1]) and fixed(tr.get(x)[-1]) and free(tr.get(x)[0])


def test_group_norm_one_group_per_channel_is_free():
    tr, (x, w, b), out = run_op(lambda x, w, b: F.group_norm(x, 4, w, b), torch.randn(2, 4, 5), torch.randn(4),
                                torch.randn(4))
    assert same(tr.get(w)[0], tr.get(x)[1]) and same(tr.get(b)[0], tr.get(x)[1]) and free(tr.get(x)[1])


def test_group_norm_with_fewer_groups_fixes_channels():
    tr, (x, w), out = run_op(lambda x, w: F.group_norm(x, 2, w), torch.randn(2, 4, 5), torch.randn(4))
    assert fixed(tr.get(x)[1]) and same(tr.get(w)[0], tr.get(x)[1])
    assert any("group_norm with 2 groups" in r for r in tr.get(x)[1].find().fix_reasons)
