"""Every pipeline's report shows the target, the achieved value and how far the projection moved the allocation;
the one-shot baselines recalibrate BatchNorm (``--bn-recalibrate N``, ``search.bn_recalibrate``) and report the
accuracy they start retraining from."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import dmscale
from dmscale.app.cli import main
from dmscale.app.report import budget_lines
from dmscale.recipes.bn import batchnorms
from clitools import tiny_sets as sets


pytestmark = pytest.mark.usefixtures("restore_threads")


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("budget") / "pre"
    assert main(["pretrain", "--out", str(out), "-q"] + sets()) == 0
    return out


def _summary(run: Path) -> dict:
    return json.loads((run / "summary.json").read_text())


@pytest.mark.parametrize("command", ["search", "fast"])
def test_search_pipelines_report_target_achieved_and_projection(command: str, pretrained: Path, tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / command
    extra = ["--pretrained", str(pretrained)] if command == "fast" else []
    assert main([command, "--out", str(out), "-q", "--target", "flops=0.6"] + extra + sets()) == 0
    text = capsys.readouterr().out
    s = _summary(out)
    sr = s["search"]
    p = sr["projection"]
    assert {"before", "after", "moved", "shift", "groups_changed", "ok", "target"} <= set(p)
    assert p["after"] == pytest.approx(sr["resource_fraction_of_supernet"], rel=1e-9)
    assert p["moved"] == pytest.approx(p["after"] / p["before"] - 1)
    assert "target: flops <= 0.6 of the base model" in text
    assert f"achieved flops {sr['resource_fraction_of_supernet']:.4f} of the supernet" in text
    assert f"projection onto the budget: {p['before']:.4f} -> {p['after']:.4f}" in text
    assert "mean width shift" in text
    report = (out / "report.md").read_text()
    assert "projection onto the budget" in report and "achieved flops" in report


def test_baselines_recalibrate_batchnorm_and_report_it(pretrained: Path, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    runs = {}
    for name, flag in (("on", []), ("off", ["--bn-recalibrate", "0"])):
        out = tmp_path / name
        assert main(["baseline", "--out", str(out), "-q", "--pretrained", str(pretrained), "--methods", "l1,uniform"]
                    + flag + sets()) == 0
        runs[name] = (out, capsys.readouterr().out)
    on, off = _summary(runs["on"][0]), _summary(runs["off"][0])
    row_on = next(r for r in on["rows"] if r.get("baseline") == "l1")
    row_off = next(r for r in off["rows"] if r.get("baseline") == "l1")
    assert row_on["bn_recalibrated"] == 20 and row_off["bn_recalibrated"] == 0
    assert 0.0 <= row_on["before_retrain"] <= 1.0 and 0.0 <= row_off["before_retrain"] <= 1.0
    assert "search:" not in runs["on"][1]  # no search, so no projection line
    assert "baseline l1: achieved flops" in runs["on"][1] and "(BatchNorm recalibrated on 20 batches)" in runs["on"][1]
    assert "(no BatchNorm recalibration)" in runs["off"][1]
    assert "bn_recalibrate: 0" in (runs["off"][0] / "config.yaml").read_text()
    # the one-shot model the baseline retrains from: the same channels, other statistics
    m_on = dmscale.load(runs["on"][0] / "baselines" / "l1" / "start")
    m_off = dmscale.load(runs["off"][0] / "baselines" / "l1" / "start")
    assert [p.shape for p in m_on.parameters()] == [p.shape for p in m_off.parameters()]
    for a, b in zip(batchnorms(m_on), batchnorms(m_off)):
        assert torch.equal(a.weight, b.weight)
    assert any(not torch.allclose(a.running_mean, b.running_mean) for a, b in zip(batchnorms(m_on), batchnorms(m_off)))


def test_bn_recalibrate_flag_sets_the_key_default_on_for_fast(tmp_path: Path) -> None:
    from dmscale.app.cli import _config, build_parser

    a = build_parser().parse_args(["fast", "--out", str(tmp_path / "x"), "--bn-recalibrate", "7"])
    assert _config(a, "dms_fast").search.bn_recalibrate == 7
    a = build_parser().parse_args(["fast", "--out", str(tmp_path / "y")])
    assert _config(a, "dms_fast").search.bn_recalibrate == 20
    assert main(["fast", "--out", str(tmp_path / "z"), "--bn-recalibrate", "-1"]) == 2


def test_budget_lines_of_a_latency_summary() -> None:
    s = {"target": {"resource": "latency", "seconds": 0.002, "device": "cpu", "batch_size": 4},
         "search": {"steps": 3, "seconds": 1.0, "resource_fraction_of_supernet": 0.5,
                    "target_fraction_of_supernet": 0.5, "projection": None,
                    "latency": {"target_s": 0.002, "predicted_s": 0.002, "supernet_s": 0.004, "device": "cpu",
                                "batch_size": 4}},
         "rows": []}
    text = "\n".join(budget_lines(s))
    assert "latency <= 2 ms per forward of a batch of 4 on cpu" in text and "predicted 2 ms" in text
    assert "projection onto the budget: none (off)" in text
