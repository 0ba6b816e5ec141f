"""One-shot pruning, the common-ratio search and ``space.leaf_index`` against their definitions."""

from __future__ import annotations

import pytest
import torch

import dmscale
from dmscale.app.zoo import TinyViT
from dmscale.budget import hard_fraction
from dmscale.recipes.oneshot import common_ratio, l1_importance, oneshot_prune, rank, width_groups
from dmscale.recipes.tasks import ImageClassification
from dmscale.space import leaf_index
from dmscale.trace.tracer import Space


# ------------------------------------------------------------------ leaf_index
def _composite(kind: str, *children: Space) -> Space:
    size = sum(c.size for c in children) if kind == "concat" else int(torch.tensor([c.size for c in children]).prod())
    s = Space(size)
    s.kind, s.children = kind, list(children)
    return s


def test_leaf_index_concat_and_product_follow_the_masker_layout():
    a, b = Space(3), Space(2)
    assert leaf_index(_composite("concat", a, b), a).tolist() == [0, 1, 2, -1, -1]
    assert leaf_index(_composite("concat", b, a), a).tolist() == [-1, -1, 0, 1, 2]
    # row-major product: position i * |b| + j
    assert leaf_index(_composite("product", a, b), a).tolist() == [0, 0, 1, 1, 2, 2]
    assert leaf_index(_composite("product", b, a), a).tolist() == [0, 1, 2, 0, 1, 2]
    assert leaf_index(_composite("product", b, b), a).tolist() == [-1] * 4
    # nested: 3 x (heads x head_dim), the fused qkv layout
    heads, hd, three = Space(2), Space(2), Space(3)
    idx = leaf_index(_composite("product", three, _composite("product", heads, hd)), heads)
    assert idx.tolist() == [0, 0, 1, 1] * 3


def test_leaf_index_agrees_with_the_mask_of_each_element():
    """Dropping element k of the leaf zeroes exactly the positions leaf_index maps to k (outer-product masks)."""
    a, b = Space(3), Space(4)
    for space in (_composite("product", a, b), _composite("product", b, a), _composite("concat", b, a, b)):
        idx = leaf_index(space, a)
        for k in range(3):
            ma = torch.ones(3)
            ma[k] = 0
            mb = torch.ones(4)
            parts = {id(a): ma, id(b): mb}
            if space.kind == "product":
                m = torch.outer(parts[id(space.children[0])], parts[id(space.children[1])]).reshape(-1)
            else:
                m = torch.cat([parts[id(c)] for c in space.children])
            assert torch.equal(m == 0, idx == k)


def test_leaf_index_resolves_union_find_members_and_gives_a_self_product_uniform_ownership():
    a = Space(3)
    alias = Space(3)
    alias.parent = a  # united with a: a is the root
    assert leaf_index(_composite("product", Space(2), a), alias).tolist() == [0, 1, 2, 0, 1, 2]
    idx = leaf_index(_composite("product", a, a), a)
    # a x a: the first factor owns the position, so every element owns the same number of positions
    assert idx.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert torch.bincount(idx).tolist() == [3, 3, 3]


# ------------------------------------------------------------------ L1 importance and the common ratio
def test_l1_importance_is_the_l1_norm_of_each_heads_weights():
    torch.manual_seed(0)
    vit = TinyViT(img=8, patch=4, dim=16, depth=1, heads=4)
    dms = dmscale.DMS(vit, (torch.randn(1, 3, 8, 8),), dmscale.Target(flops=0.5), total_steps=2, warn=False,
                      prune_depth=False)
    heads = next(g for g in dms.groups if g.kind == "heads")
    l1_importance(dms, [heads])
    def raw(mod):  # the unmasked weight under the mask parametrization
        par = getattr(mod, "parametrizations", None)
        return par["weight"].original if par is not None and "weight" in par else mod.weight

    qkv, proj = dms.model.blocks[0].attn.qkv, dms.model.blocks[0].attn.proj
    w, hd = raw(qkv), 4
    want = (w.detach().abs().reshape(3, 4, hd, -1).sum((0, 2, 3))
            + qkv.bias.detach().abs().reshape(3, 4, hd).sum((0, 2)))
    want = want + raw(proj).detach().abs().reshape(-1, 4, hd).sum((0, 2))
    torch.testing.assert_close(dms.space.importance(heads), want.float())


def test_common_ratio_is_the_largest_meeting_the_target(cnn):
    dms = dmscale.DMS(cnn(), (torch.randn(1, 1, 8, 8),), dmscale.Target(flops=0.5), total_steps=2, warn=False,
                      prune_depth=False)
    rank(dms, "random", seed=3)
    r = common_ratio(dms, 0.5)
    assert hard_fraction(dms, "flops") <= 0.5 + 1e-9
    gs = width_groups(dms)
    assert all(dms.space.ratio(g).item() == pytest.approx(max(r, g.min_ratio())) for g in gs)
    with torch.no_grad():
        for g in gs:
            dms.space.ratio(g).fill_(min(1.0, max(r + 1e-3, g.min_ratio())))
    assert hard_fraction(dms, "flops") > 0.5  # a hair more does not fit: r is the largest


# ------------------------------------------------------------------ one-shot pruning
def test_l1_oneshot_keeps_the_largest_channels_unscaled_and_leaves_the_model_as_it_was(net):
    model = net(hidden=8)
    with torch.no_grad():
        model.fc1.weight[5] *= 50  # channel 5 of fc1 must be kept
    before = {k: v.clone() for k, v in model.state_dict().items()}
    small, info = oneshot_prune(model, (torch.randn(1, 8),), dmscale.Target(params=0.6), "l1")
    assert info["params_frac"] <= 0.6 + 1e-9 and 0 < info["ratio"] < 1
    assert not any(hasattr(m, "parametrizations") for m in model.modules())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    # kept rows are exact copies of the original rows (sharp masks: nothing folded into them)
    rows = [next(i for i in range(8) if torch.equal(model.fc1.weight[i], r)) for r in small.fc1.weight]
    assert 5 in rows
    norms = (model.fc1.weight.abs().sum(1) + model.fc1.bias.abs() + model.fc2.weight.abs().sum(0)).detach()
    assert sorted(rows) == sorted(torch.argsort(norms, descending=True)[:len(rows)].tolist())
    x = torch.randn(4, 8)
    assert small(x).shape == (4, 4) and all(p.requires_grad for p in small.parameters())


def test_taylor_and_random_oneshot(cnn, data):
    batches = data((1, 8, 8), 3)
    model = cnn()
    small, info = oneshot_prune(model, (batches(0)[0][:1],), dmscale.Target(flops=0.5), "taylor",
                                task=ImageClassification(), batches=batches, n_batches=3)
    x = torch.randn(1, 1, 8, 8)
    c = dmscale.count(small, (x,))["flops"] / dmscale.count(model, (x,))["flops"]
    assert c == pytest.approx(info["flops_frac"]) and c <= 0.5 + 1e-9
    a, _ = oneshot_prune(model, (torch.randn(1, 1, 8, 8),), dmscale.Target(flops=0.5), "random", seed=1)
    b, _ = oneshot_prune(model, (torch.randn(1, 1, 8, 8),), dmscale.Target(flops=0.5), "random", seed=1)
    assert all(torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in a.state_dict())
    with pytest.raises(ValueError, match="task.*batches"):
        oneshot_prune(model, (torch.randn(1, 1, 8, 8),), dmscale.Target(flops=0.5), "taylor")
    with pytest.raises(ValueError, match="method"):
        oneshot_prune(model, (torch.randn(1, 1, 8, 8),), dmscale.Target(flops=0.5), "snip")
    assert not any(hasattr(m, "parametrizations") for m in model.modules())
