"""Every ``dmscale`` subcommand on tiny settings (digits, a few steps)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import dmscale
from dmscale.app.cli import main
from clitools import tiny_sets as sets


pytestmark = pytest.mark.usefixtures("restore_threads")


@pytest.fixture(scope="module")
def searched(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One tiny ``dmscale search`` run shared by the read-only commands."""
    out = tmp_path_factory.mktemp("cli") / "search"
    cfg = out.parent / "tiny.toml"
    cfg.write_text("[search]\ntarget = 0.6\n\n[model]\nsupernet_width_mult = 1.5\n")
    assert main(["search", "-c", str(cfg), "--out", str(out), "-q", "--reset"] + sets()) == 0
    return out


def test_search_subcommand(searched: Path, capsys: pytest.CaptureFixture[str]) -> None:
    saved = (searched / "config.yaml").read_text()
    assert "target: 0.6" in saved and "reset: true" in saved
    s = json.loads((searched / "summary.json").read_text())
    assert s["pipeline"] == "dms" and s["rows"][-1]["name"] == "found, retrained (reset)"


def test_prune_fast_pretrain_subcommands(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pre = tmp_path / "pre"
    assert main(["pretrain", "--out", str(pre), "-q"] + sets()) == 0
    assert main(["prune", "--out", str(tmp_path / "p"), "--pretrained", str(pre), "-q", "--target", "0.7"]
                + sets()) == 0
    out = capsys.readouterr().out
    assert "found, retrained" in out and "pretrained base" in out
    assert main(["fast", "--out", str(tmp_path / "f"), "--pretrained", str(pre), "-q"] + sets()) == 0
    out = capsys.readouterr().out
    assert "exported" in out and "structure found" in out
    # resuming a finished run re-prints the result without training; a wrong subcommand is refused
    assert main(["fast", "--resume", str(tmp_path / "f"), "-q"]) == 0
    assert main(["prune", "--resume", str(tmp_path / "f")]) == 2
    assert "pipeline 'dms_fast'" in capsys.readouterr().err


def test_baseline_subcommand_into_a_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "b"
    assert main(["baseline", "--out", str(out), "-q", "--methods", "uniform,l1"] + sets()) == 0
    text = capsys.readouterr().out
    assert "baseline: uniform" in text and "baseline: l1" in text and "baseline: taylor" not in text
    assert (out / "baselines" / "l1" / "model" / "structure.json").exists()


def test_demo_quick_subcommand(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--out", str(out), "-q"] + sets("model.stem_stride=1")) == 0
    text = capsys.readouterr().out
    assert "using dataset digits" in text and "found, retrained" in text and "structure found" in text
    assert main(["demo", "--quick", "--out", str(out), "-q"] + sets()) == 2  # refuses to overwrite
    assert main(["demo", "--quick", "--out", str(out), "-q", "--fresh"] + sets("search.steps=3")) == 0


def test_info_and_report(searched: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["info", str(searched)]) == 0
    out = capsys.readouterr().out
    assert "searchable groups" in out and "FLOPs" in out and "structure: stem" in out and "found" in out
    assert main(["info", str(searched / "searched"), "--input-shape", "1,8,8"]) == 0
    assert main(["report", str(searched)]) == 0
    assert "structure found" in capsys.readouterr().out


def test_upscale_subcommand(searched: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "wide"
    assert main(["upscale", str(searched), "--width", "2", "--noise", "0", "--out", str(out)]) == 0
    small, big = dmscale.load(searched / "model").eval(), dmscale.load(out).eval()
    x = torch.randn(4, 1, 8, 8)
    torch.testing.assert_close(big(x), small(x), atol=1e-4, rtol=1e-4)
    assert sum(p.numel() for p in big.parameters()) > 3 * sum(p.numel() for p in small.parameters())
    assert main(["upscale", str(searched), "--width", "4", "--noise", "1e-3", "--out", str(tmp_path / "w4")]) == 0
    assert "upscaled x4" in capsys.readouterr().out


def test_bad_config_fails_before_training(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "bad"
    assert main(["search", "--out", str(out), "--set", "search.target=1.5"]) == 2
    assert "search.target" in capsys.readouterr().err
    assert main(["search", "--out", str(out), "--set", "search.tagret=0.5"]) == 2
    assert "search.tagret" in capsys.readouterr().err
    assert main(["search", "--out", str(out), "--data-root", str(tmp_path / "missing")]) == 2
    assert "data.root" in capsys.readouterr().err
    bad = tmp_path / "bad.toml"
    bad.write_text("[retrain]\nsteps = -1\n")
    assert main(["search", "-c", str(bad), "--out", str(out)]) == 2
    assert "retrain.steps" in capsys.readouterr().err
    assert not out.exists()


def test_resume_refuses_config_changes(searched: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["search", "--resume", str(searched), "--set", "search.target=0.3"]) == 2
    assert "search.target" in capsys.readouterr().err
    assert main(["search", "--resume", str(searched), "-q"]) == 0  # finished: re-prints the result, trains nothing
    assert "found, retrained (reset)" in capsys.readouterr().out


# ------------------------------------------------------------------ run directories: no data loss, no mixing
def test_second_command_on_a_locked_run_fails_at_once_naming_the_holder(searched: Path, tmp_path: Path,
                                                                         capsys: pytest.CaptureFixture[str]) -> None:
    import subprocess
    import sys

    code = ("import sys; from dmscale.serialization.dirs import lock_dir; lock = lock_dir(sys.argv[1]); "
            "print('locked', flush=True); sys.stdin.read()")
    holder = subprocess.Popen([sys.executable, "-c", code, str(searched)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        before = (searched / "state.json").read_text()
        for argv in (["search", "--resume", str(searched), "-q"], ["baseline", "--out", str(searched), "-q"],
                     ["demo", "--quick", "--out", str(searched), "--fresh", "-q"], ["report", str(searched)]):
            assert main(argv) == 2, argv
            err = capsys.readouterr().err
            assert f"PID {holder.pid}" in err and "in use" in err, err
        assert (searched / "state.json").read_text() == before and (searched / "model" / "structure.json").exists()
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)
    assert main(["search", "--resume", str(searched), "-q"]) == 0  # the lock goes with its holder


def test_fresh_replaces_only_a_directory_dmscale_created(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "config.yaml").write_text("my: own\n")
    (foreign / "thesis.tex").write_text("years of work")
    assert main(["demo", "--quick", "--out", str(foreign), "--fresh", "-q"] + sets("search.steps=2")) == 2
    assert "not created by dmscale" in capsys.readouterr().err
    assert (foreign / "thesis.tex").read_text() == "years of work"
    # a non-empty directory without config.yaml: refused as well (not a run to continue)
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("keep")
    assert main(["baseline", "--out", str(other), "-q", "--methods", "uniform"] + sets()) == 2
    assert "not a dmscale run directory" in capsys.readouterr().err
    assert sorted(p.name for p in other.iterdir()) == ["notes.txt"]


def test_outputs_inside_a_run_are_refused(searched: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model_files = {p.name: p.read_bytes() for p in (searched / "model").iterdir() if p.is_file()}
    for out in (searched / "model", searched / "wide", searched):
        assert main(["upscale", str(searched), "--width", "2", "--out", str(out)]) == 2
        assert "run directory" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in (searched / "model").iterdir() if p.is_file()} == model_files
    assert not (searched / "wide").exists()
    assert main(["search", "--out", str(searched / "nested"), "-q"] + sets()) == 2
    assert "inside the run directory" in capsys.readouterr().err and not (searched / "nested").exists()


def test_nonfinite_training_fails_naming_the_phase_and_learning_rate(tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "nan"
    rc = main(["search", "--out", str(out), "-q"] + sets("retrain.lr=1e30", "retrain.steps=6"))
    err = capsys.readouterr().err
    assert rc == 1 and "retrain: the loss is nan" in err and "retrain.lr=1e+30" in err, err
    assert not (out / "model").exists()  # no all-NaN model is saved


def test_over_budget_search_fails_unless_allowed(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """A search the projection could not bring onto the budget stops (exit 1, nothing saved as the result) unless
    --allow-over-budget. The exact projection reaches every target the construction accepts, so the projection's
    outcome is made over budget here (the projection itself is tested in tests/test_budget.py)."""
    from dmscale.app import pipelines

    real = pipelines.finish_search

    def over_budget(dms, **kw):
        small, info = real(dms, **kw)
        kind, goal = info["target"]["kind"], info["target"]["fraction"]
        return small, {**info, "over_budget": True, f"{kind}_frac": 1.5 * goal}

    monkeypatch.setattr(pipelines, "finish_search", over_budget)
    extra = sets("search.target=0.05", "search.steps=2", "retrain.steps=0")
    assert main(["search", "--out", str(tmp_path / "r"), "-q"] + extra) == 1
    err = capsys.readouterr().err
    assert "over budget" in err and "--allow-over-budget" in err
    assert not (tmp_path / "r" / "model").exists()
    assert main(["search", "--resume", str(tmp_path / "r"), "-q", "--allow-over-budget"]) == 0
    s = json.loads((tmp_path / "r" / "state.json").read_text())["phases"]["search"]
    assert s["over_budget"] and s["resource_fraction_of_supernet"] > s["target_fraction_of_supernet"]
