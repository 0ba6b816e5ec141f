"""Latency targets: per-layer measurements, quadratic fits, calibration, cache, search to a latency.

Every test uses a deterministic timer (seconds = a fixed function of the module's FLOPs and
parameters) so that it checks the mechanics, never the machine's speed. Real timings are in
``benchmarks/bench_latency.py``.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

import dmscale
from dmscale.latency import CACHE_FILE, fit_quadratic, measure_latency
from zoo import MLP, ResNetCNN, TinyViT


pytestmark = pytest.mark.usefixtures("one_thread")


class FakeTimer:
    """1 ns per FLOP + 0.1 us per parameter; records what it timed."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple]] = []

    def __call__(self, module, args, kwargs) -> float:
        self.calls.append((type(module).__name__, tuple(tuple(a.shape) for a in args if torch.is_tensor(a))))
        return fake_seconds(module, args, kwargs)


def fake_seconds(module, args, kwargs=None) -> float:
    c = dmscale.count(module, tuple(args), kwargs or {})
    return 1e-9 * c["flops"] + 1e-7 * c["params"]


def _dms(model, x, latency_frac=0.5, timer=None, **kw):
    timer = timer or FakeTimer()
    full = fake_seconds(model, (x,))
    dms = dmscale.DMS(model, (x,), dmscale.Target(latency=latency_frac * full, **kw.pop("target_kw", {})),
                      total_steps=kw.pop("total_steps", 10), latency_timer=timer, warn=False, **kw)
    return dms, timer, full


def _search(dms, model, x, steps=20):
    opt = torch.optim.Adam(dms.structure_parameters(), lr=0.05)
    y = torch.randint(0, 5, (x.shape[0],))
    for _ in range(steps):
        loss = dms.loss(F.cross_entropy(model(x), y) if model(x).shape[-1] == 5 else model(x).pow(2).mean())
        opt.zero_grad()
        loss.backward()
        opt.step()
        dms.step()


def test_fit_quadratic_recovers_nonnegative_models():
    pts = [(x, y, 0.5 + 2 * x + 3 * x * y + 0.25 * y * y) for x in (0.25, 0.5, 0.75, 1) for y in (0.25, 0.5, 1)]
    coef = fit_quadratic(pts, 2)
    assert coef == pytest.approx([0.5, 2, 0, 0, 3, 0.25], abs=1e-9)
    # a decreasing trend cannot come out: coefficients stay >= 0, the model is nondecreasing
    coef = fit_quadratic([(x, 1.0, 1.0 - 0.5 * x) for x in (0.25, 0.5, 0.75, 1.0)], 1)
    assert all(c >= 0 for c in coef)
    assert fit_quadratic([(1.0, 1.0, 2.0)], 0) == pytest.approx([2.0])


def test_measure_latency_runs_the_module():
    calls = []
    m = torch.nn.Linear(4, 4)
    m.register_forward_hook(lambda *a: calls.append(1))
    t = measure_latency(m, (torch.randn(2, 4),), repeats=3, warmup=1, min_time=0.0)
    assert t > 0 and len(calls) >= 1 + 1 + 3


@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_prediction_equals_the_timer_on_exports(name):
    """With a timer that is exact in the widths, the model predicts every export's time exactly."""
    torch.manual_seed(0)
    model, x = ((MLP(16, 48, 5), torch.randn(4, 16)) if name == "mlp"
                else (ResNetCNN(widths=(8, 16), depths=(2, 2), n_classes=5), torch.randn(2, 3, 16, 16)))
    dms, timer, full = _dms(model, x)
    lm = dms.latency_model
    assert lm.alpha == pytest.approx(0.0, abs=1e-9) and lm.beta == pytest.approx(1.0, rel=1e-6)
    assert dms.resources.full["latency"] == pytest.approx(full, rel=1e-6)
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        with torch.no_grad():
            for grp in dms.groups:
                dms.space.importance(grp).copy_(torch.rand(grp.size, generator=g))
                dms.space.ratio(grp).fill_(0.3 + 0.7 * float(torch.rand((), generator=g)))
        pred = float(dms.resource(soft=False)["latency"])
        small = dms.export(project=False)
        assert pred == pytest.approx(fake_seconds(small, (x,)), rel=1e-4)


def test_latency_is_straight_through_and_differentiable():
    torch.manual_seed(0)
    model = MLP(16, 48, 5)
    x = torch.randn(4, 16)
    dms, _, _ = _dms(model, x)
    with torch.no_grad():
        for grp in dms.groups:
            dms.space.ratio(grp).fill_(0.61)
    soft = dms.resource(soft=True)["latency"]
    hard = dms.resource(soft=False)["latency"]
    assert float(soft.detach()) == pytest.approx(float(hard), rel=1e-6)  # forward: the hard widths
    soft.backward()
    assert all(p.grad is not None and float(p.grad) > 0 for p in dms.structure_parameters())


@pytest.mark.parametrize("name", ["mlp", "cnn", "vit"])
def test_search_lands_on_latency_target(name):
    torch.manual_seed(0)
    if name == "mlp":
        model, x = MLP(16, 48, 5), torch.randn(4, 16)
    elif name == "cnn":
        model, x = ResNetCNN(widths=(8, 16), depths=(2, 2), n_classes=5), torch.randn(2, 3, 16, 16)
    else:
        model, x = TinyViT(depth=2, n_classes=5), torch.randn(2, 3, 16, 16)
    dms, timer, full = _dms(model, x, latency_frac=0.5, total_steps=20)
    _search(dms, model, x)
    small = dms.export()
    got = fake_seconds(small, (x,))
    target = dms.target.latency
    assert float(dms.resource(soft=False)["latency"]) <= target * (1 + 1e-6)
    # exact for MLP/CNN (every FLOP is in a measured layer); the ViT's attention matmuls are calibrated
    tol = 0.01 if name != "vit" else 0.10
    assert abs(got / target - 1) <= tol, (got, target, dms.latency_model.calibration)
    assert "latency" in dms.summary() and "achieved" in dms.summary()


def test_batch_size_and_device_of_the_target_are_used():
    torch.manual_seed(0)
    model = MLP(16, 48, 5)
    x = torch.randn(4, 16)
    timer = FakeTimer()
    dms, _, _ = _dms(model, x, timer=timer, target_kw={"batch_size": 32, "device": "cpu"})
    layer_shapes = [s for name, s in timer.calls if name == "Linear"]
    assert layer_shapes and all(s[0][0] == 32 for s in layer_shapes)
    assert dms.latency_model.batch_size == 32 and dms.latency_model.device == "cpu"
    # calibration timed the whole export at batch 32 too
    assert any(name == "MLP" and s[0][0] == 32 for name, s in timer.calls)


def test_cache_is_reused_and_foreign_files_are_refused(tmp_path):
    torch.manual_seed(0)
    x = torch.randn(4, 16)
    d1, t1, _ = _dms(MLP(16, 48, 5), x, latency_cache=str(tmp_path / "lat"))
    assert t1.calls
    data = json.loads((tmp_path / "lat" / CACHE_FILE).read_text())
    assert data["format"] == "dmscale-latency-cache" and data["layers"] and data["models"]
    d2, t2, _ = _dms(MLP(16, 48, 5), x, latency_cache=str(tmp_path / "lat"), timer=t1)
    assert len(t2.calls) == len(t1.calls)  # nothing timed again
    assert d2.latency_model.alpha == d1.latency_model.alpha and d2.latency_model.beta == d1.latency_model.beta
    # another timer is another measurement: not mixed with the cached one
    t3 = FakeTimer()
    _dms(MLP(16, 48, 5), x, latency_cache=str(tmp_path / "lat"), timer=lambda m, a, k: 2 * t3(m, a, k))
    assert t3.calls
    bad = tmp_path / "foreign"
    bad.mkdir()
    (bad / CACHE_FILE).write_text("user data")
    with pytest.raises(ValueError, match="not a dmscale latency table"):
        _dms(MLP(16, 48, 5), x, latency_cache=str(bad))
    assert (bad / CACHE_FILE).read_text() == "user data"


def test_latency_target_validation():
    for bad in (0.0, -1.0, float("nan"), float("inf"), True, "1ms"):
        with pytest.raises(ValueError, match="latency"):
            dmscale.Target(latency=bad)
    with pytest.raises(ValueError, match="batch_size"):
        dmscale.Target(latency=1e-3, batch_size=2.5)
    with pytest.raises(ValueError, match="batch_size"):
        dmscale.Target(latency=1e-3, batch_size=0)
    with pytest.raises(ValueError, match="device"):
        dmscale.Target(latency=1e-3, device="nonsense")
    with pytest.raises(ValueError, match="latency targets only"):
        dmscale.Target(flops=0.5, device="cpu")
    t = dmscale.Target(latency=1e-3, device="cpu", batch_size=8)
    assert t.kind == "latency"
    with pytest.raises(ValueError, match="target_fraction"):
        t.fraction
    model = MLP(16, 48, 5)
    x = torch.randn(4, 16)
    with pytest.raises(ValueError, match="above the supernet"):
        _dms(model, x, latency_frac=2.0)


def test_fit_calibration_recovers_offset_scale_and_block_cost():
    from dmscale.latency import fit_calibration

    rows = [(p, b, 0.002 + 1.5 * p + 0.0003 * b) for p, b in ((1.0, 4), (0.6, 4), (0.3, 4), (1.0, 0), (0.5, 0))]
    assert fit_calibration(rows) == pytest.approx((0.002, 1.5, 0.0003), rel=1e-6, abs=1e-12)
    # no removable blocks (constant count): offset and scale only
    assert fit_calibration([(1.0, 2, 3.0), (0.5, 2, 2.0)]) == pytest.approx((1.0, 2.0, 0.0))


def _block_timer(module, args, kwargs):
    """``fake_seconds`` plus 2e-5 s per residual block: a cost no single layer shows."""
    from dmscale.app.zoo import BasicBlock

    n_blocks = sum(isinstance(m, BasicBlock) for m in module.modules())
    return fake_seconds(module, args, kwargs) + 2e-5 * n_blocks


def test_block_overhead_is_calibrated_with_depth_removed():
    """A cost per residual block that no single layer shows (activations, additions, calls) is learnt
    from the exports with blocks removed, so configurations with fewer blocks are predicted right."""
    torch.manual_seed(0)
    model, x = ResNetCNN(widths=(8, 16), depths=(3, 3), n_classes=5), torch.randn(2, 3, 16, 16)
    dms, _, _ = _dms(model, x, timer=_block_timer)
    assert dms.latency_model.gamma == pytest.approx(2e-5, rel=1e-3)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for grp in dms.groups:
            dms.space.importance(grp).copy_(torch.rand(grp.size, generator=g))
            dms.space.ratio(grp).fill_(0.5 if grp.kind == "depth" else 0.7)
    pred = float(dms.resource(soft=False)["latency"])
    small = dms.export(project=False)
    assert pred == pytest.approx(_block_timer(small, (x,), {}), rel=1e-4)


def test_projection_with_block_overhead_counts_exactly():
    """With a per-block cost (gamma > 0) the depth gates enter the latency: they are float64 like the widths, so
    the projection's own count equals the masks' to 1e-9 on every landing (float32 gates missed by ~1e-9)."""
    from dmscale.budget import hard_fraction, project

    torch.manual_seed(0)
    model, x = ResNetCNN(widths=(8, 16), depths=(3, 3), n_classes=5), torch.randn(2, 3, 16, 16)
    dms, _, _ = _dms(model, x, timer=_block_timer)
    assert dms.latency_model.gamma > 0
    gates = dms.resources.kept_fractions(soft=False)[1]
    assert gates and all(v.dtype == torch.float64 for v in gates.values())
    g = torch.Generator().manual_seed(4)
    for frac in (0.9, 0.7, 0.45):
        with torch.no_grad():
            for grp in dms.groups:
                dms.space.importance(grp).copy_(torch.rand(grp.size, generator=g))
                dms.space.ratio(grp).fill_(1.0)
        p = project(dms, frac, warn=False)  # raises when its bookkeeping and the masks disagree
        assert p.after <= frac * (1 + 1e-9)
        assert hard_fraction(dms, "latency") == pytest.approx(p.after, rel=1e-12)


class DriftTimer(FakeTimer):
    """``FakeTimer`` times ``factor`` plus ``per_model`` seconds for every whole model (not single layers): the
    machine got slower after the layers were measured, as a shared machine does."""

    def __init__(self) -> None:
        super().__init__()
        self.factor = 1.0
        self.per_model = 0.0

    def __call__(self, module, args, kwargs) -> float:
        whole = not isinstance(module, (torch.nn.Linear, torch.nn.Conv2d, torch.nn.BatchNorm2d, torch.nn.LayerNorm))
        return self.factor * super().__call__(module, args, kwargs) + (self.per_model if whole else 0.0)


@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_export_lands_on_the_measured_latency_when_the_model_is_off(name):
    """The model says the export meets the target, the clock says 30% slower: ``land_measured`` times the export,
    corrects the model by measured / predicted and projects again until the measured latency is within
    ``latency_tolerance``. With ``latency_checks=0`` the export trusts the model and misses by the drift."""
    got = {}
    for checks in (0, 4):
        torch.manual_seed(0)
        model, x = ((MLP(16, 96, 5), torch.randn(4, 16)) if name == "mlp"
                    else (ResNetCNN(widths=(8, 16), depths=(2, 2), n_classes=5), torch.randn(2, 3, 16, 16)))
        timer = DriftTimer()
        dms, _, _ = _dms(model, x, timer=timer, latency_frac=0.6, total_steps=20, latency_checks=checks)
        timer.factor = 1.3
        _search(dms, model, x)
        small = dms.export()
        got[checks] = timer(small, (x,), {}) / dms.target.latency
        if checks:
            assert dms.latency_checks and len(dms.latency_checks) <= 2 * checks
            last = dms.latency_checks[-1]
            assert last["when"] == "export" and abs(last["measured_s"] / last["target_s"] - 1) <= 0.05
            assert dms.latency_scale == pytest.approx(last["measured_s"] / last["predicted_s"], rel=1e-9)
            assert "latency check at export" in dms.summary()
            # the state carries the correction (a resumed search aims at the same corrected target)
            state = dms.state_dict()
            assert state["latency_scale"] == dms.latency_scale and state["latency_checks"] == dms.latency_checks
        else:
            assert not dms.latency_checks and dms.latency_scale == 1.0
    assert got[0] > 1.2, got  # the model alone misses by the drift
    assert abs(got[4] - 1) <= 0.05, got


def test_measured_landing_keeps_the_closest_export_and_stops_when_within():
    """An exact timer needs one check per landing; an export that can never be fast enough (a per-model cost
    larger than the target) keeps the closest of ``latency_checks`` tries, records every try, and warns nothing
    away: the summary shows the miss."""
    torch.manual_seed(0)
    model, x = MLP(16, 96, 5), torch.randn(4, 16)
    dms, _, _ = _dms(model, x, latency_frac=0.5, total_steps=20)
    _search(dms, model, x)
    dms.export()
    assert [c["when"] for c in dms.latency_checks] == ["refine", "export"]  # within tolerance at once
    torch.manual_seed(0)
    model = MLP(16, 96, 5)
    timer = DriftTimer()
    dms, _, full = _dms(model, x, timer=timer, latency_frac=0.5, total_steps=20, latency_checks=3)
    timer.per_model = full  # every whole model now costs at least the supernet's old time
    _search(dms, model, x)
    dms.export()
    ex = [c for c in dms.latency_checks if c["when"] == "export"]
    assert len(ex) == 3 and all(c["measured_s"] > c["target_s"] * 1.5 for c in ex)
    best = min(ex, key=lambda c: abs(c["measured_s"] / c["target_s"] - 1))
    assert [c["kept"] for c in ex] == [c is best for c in ex]
    assert timer(dms.export(project=False), (x,), {}) == pytest.approx(best["measured_s"], rel=1e-9)


def test_latency_check_options_are_validated():
    model, x = MLP(16, 48, 5), torch.randn(4, 16)
    with pytest.raises(ValueError, match="latency_checks"):
        _dms(model, x, latency_checks=-1)
    for bad in (0.0, 1.0, float("nan")):
        with pytest.raises(ValueError, match="latency_tolerance"):
            _dms(model, x, latency_tolerance=bad)
