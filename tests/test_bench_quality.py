"""The equal-budget benchmark (benchmarks/bench_quality.py, BENCHMARKS.md section 4) at its smallest: every method's
model lands on the FLOPs budget, inherited weights get their BatchNorm statistics re-estimated, and the
two-column markdown table reads the result files."""

from __future__ import annotations

import json
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import bench_quality as bq  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def result() -> dict:
    return bq.run_dataset("digits", [0], [0.5], 20, lambda s: None, (256, 128))


def test_every_method_lands_on_the_budget(result) -> None:
    runs = {r["method"]: r for r in result["runs"]}
    assert set(runs) == {"base", *bq.METHODS}
    for m in bq.METHODS:  # DMS searches a 1.5x supernet to the base's budget; the rest prune or build the base
        assert 0.5 * 0.99 - 1e-9 <= runs[m]["flops_frac"] <= 0.5 + 1e-9, (m, runs[m])
    assert result["train_size"] == 256 and result["test_size"] == 128
    assert result["bn_recalibration_batches"] == bq.BN_BATCHES
    for m in ("DMS_fast", "L1", "Taylor"):
        assert 0.0 <= runs[m]["acc_before_finetune"] <= 1.0


def test_markdown_has_a_column_pair_per_file(result, tmp_path) -> None:
    short = {"datasets": {"digits": result}}
    long = {"datasets": {"digits": {**result, "steps_B": 80}}}
    paths = []
    for name, data in (("short", short), ("long", long)):
        p = tmp_path / f"{name}.json"
        p.write_text(json.dumps(data))
        paths.append(str(p))
    text = bq.markdown(paths)
    assert "B = 20: test acc %" in text and "B = 80: test acc %" in text
    rows = [line for line in text.splitlines() if line.startswith("| 0.50 |")]
    assert len(rows) == len(bq.METHODS)  # every method at the one budget
    assert sum(line.startswith("| 1.00 | base |") for line in text.splitlines()) == 1  # the unpruned reference
    best = max(r["acc"] for r in result["runs"] if r["method"] != "base")
    assert f"**{100 * best:.2f} ± 0.00**" in text


def test_patch_replaces_the_runs_of_the_rerun_methods(result, tmp_path) -> None:
    base = {"methods": bq.METHODS, "datasets": {"digits": result}}
    rerun = {**result, "runs": [{**r, "acc": 0.123} for r in result["runs"] if r["method"] in ("base", "uniform")]}
    extra = {"methods": ["uniform"], "datasets": {"digits": rerun}, "wall_s": 1.0}
    bp, ep = tmp_path / "base.json", tmp_path / "extra.json"
    bp.write_text(json.dumps(base))
    ep.write_text(json.dumps(extra))
    bq.patch(str(bp), str(ep))
    got = json.loads(bp.read_text())
    runs = got["datasets"]["digits"]["runs"]
    assert [r["acc"] for r in runs if r["method"] == "uniform"] == [0.123]
    assert [r["acc"] for r in runs if r["method"] == "base"] == [r["acc"] for r in result["runs"] if r["method"] == "base"]
    assert len(runs) == len(result["runs"]) and got["patches"][0]["methods"] == ["uniform"]
    agg = {(a["method"], a["budget"]): a for a in got["datasets"]["digits"]["aggregate"]}
    assert agg[("uniform", 0.5)]["acc_mean"] == 0.123
    ep.write_text(json.dumps({**extra, "datasets": {"digits": {**rerun, "steps_B": 999}}}))
    with pytest.raises(SystemExit, match="steps_B differs"):
        bq.patch(str(bp), str(ep))
