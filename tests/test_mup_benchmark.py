"""The μpscaling HP-transfer benchmark's analysis (on synthetic sweeps) and its committed result file."""

from __future__ import annotations

import json
import math
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))


@pytest.fixture(scope="module")
def hp():
    import hp_transfer

    return hp_transfer


def _units(table):
    """Fake benchmark units from {width: {lr: [loss per seed]}}."""
    units = []
    for w, row in table.items():
        for seed in range(len(next(iter(row.values())))):
            runs = [{"param": "mup", "sweep": "lr", "lr": lr, "sigma": 1.0, "train": v[seed], "val": v[seed]}
                    for lr, v in row.items()]
            units.append({"task": "t", "width": w, "seed": seed, "runs": runs})
    return units


def test_transfer_summary_same_optimum(hp) -> None:
    table = {8: {1e-3: [1.0, 1.1], 1e-2: [0.5, 0.6], 1e-1: [0.9, 0.8]},
             64: {1e-3: [0.8, 0.9], 1e-2: [0.3, 0.4], 1e-1: [0.7, float("inf")]}}
    s = hp.transfer_summary(hp.curves(_units(table), "mup", "lr", "lr", "train"))
    assert s["best"] == {"8": 1e-2, "64": 1e-2} and s["same_point"]
    assert s["gap"] == 0 and s["grid_steps_apart_at_largest"] == 0
    assert s["mean"]["64"]["0.1"] == pytest.approx(0.7)  # a diverged seed is left out of the mean


def test_transfer_summary_shifted_optimum(hp) -> None:
    table = {8: {1e-3: [0.6], 1e-2: [0.5], 1e-1: [0.9]}, 64: {1e-3: [0.8], 1e-2: [0.5], 1e-1: [0.3]}}
    s = hp.transfer_summary(hp.curves(_units(table), "mup", "lr", "lr", "train"))
    assert not s["same_point"] and s["best"]["64"] == 1e-1
    assert s["largest_pair_at_smallest_best"] == pytest.approx(0.5) and s["gap"] == pytest.approx(0.2)
    assert s["gap_relative"] == pytest.approx(0.2 / 0.3) and s["grid_steps_apart_at_largest"] == 1


def test_all_diverged_is_inf_not_an_error(hp) -> None:
    table = {8: {1e-3: [float("inf")], 1e-2: [0.5]}, 16: {1e-3: [float("inf")], 1e-2: [float("inf")]}}
    s = hp.transfer_summary(hp.curves(_units(table), "mup", "lr", "lr", "train"))
    assert math.isinf(s["largest_pair_own_best"]) and s["gap_relative"] is None


def test_committed_result_files_are_small_summaries() -> None:
    """benchmarks/results/*.json may be committed (.gitignore); keep them summaries, not dumps."""
    d = os.path.join(ROOT, "benchmarks", "results")
    files = [f for f in os.listdir(d) if f.endswith(".json")] if os.path.isdir(d) else []
    for f in files:
        assert os.path.getsize(os.path.join(d, f)) < 1_000_000, f
    if "hp_transfer.json" in files:
        with open(os.path.join(d, "hp_transfer.json")) as fh:
            r = json.load(fh)
        assert not r["quick"] and r["seeds"] >= 3
        for task in r["results"].values():
            assert len(task["task"]["widths"]) >= 4
            assert set(task["train"]["lr"]) == {"mup", "base_small", "sp"}
