"""The differentiable top-k operator against its definition."""

import torch
import pytest

from dmscale.topk import differentiable_topk, hard_keep, rank_normalize


def test_rank_normalize_matches_definition():
    torch.manual_seed(0)
    c = torch.randn(257, dtype=torch.float64)
    n = c.numel()
    expected = torch.tensor([(c < ci).sum().item() for ci in c], dtype=torch.float64)
    torch.testing.assert_close(rank_normalize(c), (expected + 0.5) / n)


def test_all_equal_importance_gives_distinct_ranks():
    c = torch.zeros(10)
    r = rank_normalize(c)
    assert len(set(r.tolist())) == 10  # ties broken by index, not all identical
    m = differentiable_topk(c, torch.tensor(0.5))
    assert int((m >= 0.5).sum()) == 5


@pytest.mark.parametrize("n", [1, 2, 7, 64, 1000])
def test_kept_count_is_round_ratio_times_n(n):
    torch.manual_seed(n)
    c = torch.rand(n)
    for r in [0.0, 0.1, 0.33, 0.5, 0.77, 1.0]:
        m = differentiable_topk(c, torch.tensor(r))
        kept = int((m >= 0.5).sum())
        assert abs(kept - r * n) <= 0.5 + 1e-6, (n, r, kept)
        # the kept ones are the most important
        if 0 < kept < n:
            assert c[m >= 0.5].min() > c[m < 0.5].max()


def test_n_equal_one():
    m = differentiable_topk(torch.tensor([3.0]), torch.tensor(1.0))
    assert m.shape == (1,) and float(m) > 0.5
    m0 = differentiable_topk(torch.tensor([3.0]), torch.tensor(0.0))
    assert float(m0) < 0.5


def test_gradcheck_ratio_float64():
    torch.manual_seed(0)
    c = torch.rand(50, dtype=torch.float64)
    r = torch.tensor(0.6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda ratio: differentiable_topk(c, ratio, 50.0), (r,))
    assert torch.autograd.gradcheck(lambda ratio: differentiable_topk(c, ratio, 200.0), (r,))


def test_gradient_formula():
    c = torch.rand(20, dtype=torch.float64)
    r = torch.tensor(0.4, dtype=torch.float64, requires_grad=True)
    m = differentiable_topk(c, r, 20.0)
    (g,) = torch.autograd.grad(m.sum(), r)
    torch.testing.assert_close(g, (20.0 * m * (1 - m)).sum().detach())


def test_only_few_elements_are_fuzzy_with_lambda_n():
    n = 1000
    m = differentiable_topk(torch.rand(n), torch.tensor(0.5))
    fuzzy = ((m - m.round()).abs() > 0.05).sum()
    assert int(fuzzy) <= 8


def test_hard_keep_matches_soft_threshold():
    torch.manual_seed(1)
    c = torch.rand(33)
    m = differentiable_topk(c, torch.tensor(0.42))
    k = int((m >= 0.5).sum())
    assert torch.equal(hard_keep(c, k), m >= 0.5)


def test_bad_inputs():
    with pytest.raises(ValueError, match="1-D"):
        rank_normalize(torch.zeros(2, 2))
    with pytest.raises(ValueError, match="empty"):
        rank_normalize(torch.zeros(0))
    with pytest.raises(ValueError, match="lam"):
        differentiable_topk(torch.zeros(3), torch.tensor(0.5), lam=0)


def test_cached_ranks_in_search_space_match_operator():
    """SearchSpace sorts once per importance update; masks must equal the pure operator's."""
    import dmscale
    from dmscale.topk import differentiable_topk as topk
    from zoo import MLP

    dms = dmscale.DMS(MLP(), (torch.randn(2, 16),), dmscale.Target(flops=0.5), total_steps=5)
    g = dms.groups[0]
    imp = dms.space.importance(g)
    for trial in range(3):
        imp.copy_(torch.rand(g.size))  # in-place update bumps the version: cache must refresh
        r = torch.tensor(0.37 + 0.1 * trial)
        torch.testing.assert_close(dms.space.soft_mask(g, r), topk(imp, r, g.lam))
        k = int((topk(imp, r, g.lam) >= 0.5).sum())
        assert torch.equal(dms.space.keep(g, dms.space.soft_mask(g, r)), hard_keep(imp, k))
