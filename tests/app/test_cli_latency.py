"""``--target latency=SECONDS``: the run searches under a latency target, caches the measurement table in the run
directory, reuses it on ``--resume`` and refuses it for another device or model.

The layer timer is replaced by a deterministic stand-in (seconds proportional to the parameters timed), so the
test checks the wiring, never a wall-clock time."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import dmscale.latency as latency_mod
from dmscale.app import pipelines, zoo
from dmscale.app.cli import main, parse_target
from dmscale.app.config import ConfigError, load_config
from dmscale.latency import CACHE_FILE
from clitools import Timer, fake_seconds, set_args

TINY = ["data.name=digits", "data.limit_train=128", "data.limit_test=64", "data.batch_size=32",
        "data.eval_batch_size=64", "model.widths=[4,8]", "model.depths=[1,2]", "search.steps=6",
        "retrain.steps=2", "run.checkpoint_every=2", "run.threads=1", "search.latency_repeats=1",
        "search.prune_depth=false"]


@pytest.fixture(autouse=True)
def timer(monkeypatch: pytest.MonkeyPatch) -> Timer:
    t = Timer()
    monkeypatch.setattr(latency_mod, "measure_latency", t)
    n = torch.get_num_threads()
    yield t
    torch.set_num_threads(n)


def target_seconds(frac: float = 0.6) -> float:
    """``frac`` of the tiny supernet's (fake) latency."""
    return frac * fake_seconds(zoo.build([4, 8], [1, 2], 1, 10, width_mult=1.5, depth_mult=1.5))


def sets(*extra: str) -> list[str]:
    """``--set`` arguments for the tiny config plus extras."""
    return set_args(*TINY, *extra)


def test_parse_target() -> None:
    assert parse_target("0.4") == {"search.target": 0.4}
    assert parse_target("params=0.5") == {"search.target": 0.5, "search.resource": "params"}
    assert parse_target("latency=0.002") == {"search.target": 0.002, "search.resource": "latency"}
    with pytest.raises(ConfigError, match="--target 'memory=1'"):
        parse_target("memory=1")
    with pytest.raises(ConfigError, match="not a number"):
        parse_target("latency=fast")


def test_latency_config_is_checked() -> None:
    with pytest.raises(ConfigError, match=r"search\.target.*seconds"):
        load_config(None, ["search.resource=latency", "search.target=-1"])
    with pytest.raises(ConfigError, match=r"search\.latency_device"):
        load_config(None, ["search.resource=latency", "search.target=0.01", "search.latency_device=nodevice"])
    with pytest.raises(ConfigError, match=r"search\.latency_device.*applies to search\.resource = latency"):
        load_config(None, ["search.latency_device=cpu"])
    with pytest.raises(ConfigError, match=r"search\.resource.*baselines"):
        load_config(None, ["search.resource=latency", "search.target=0.01"], pipeline="baseline")
    with pytest.raises(ConfigError, match=r"search\.target.*fraction"):  # a fraction target stays a fraction
        load_config(None, ["search.target=0.01", "search.target=2"])


def test_cli_search_under_a_latency_target_writes_the_cache(tmp_path: Path, timer: Timer,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    t = target_seconds()
    assert main(["search", "--out", str(out), "-q", "--target", f"latency={t}"] + sets()) == 0
    assert timer.calls > 0
    text = capsys.readouterr().out
    assert "target: latency <=" in text and "latency: predicted" in text and "projection onto the budget" in text
    s = json.loads((out / "summary.json").read_text())
    assert s["target"]["resource"] == "latency" and s["target"]["seconds"] == pytest.approx(t)
    lat = s["search"]["latency"]
    assert lat["target_s"] == pytest.approx(t) and lat["device"] == "cpu" and lat["batch_size"] == 1
    assert lat["predicted_s"] <= t * (1 + 1e-6)
    assert s["search"]["target_fraction_of_supernet"] == pytest.approx(t / lat["supernet_s"])
    table = json.loads((out / CACHE_FILE).read_text())
    assert table["format"] == "dmscale-latency-cache" and table["layers"] and table["models"]
    state = json.loads((out / "state.json").read_text())
    assert state["latency_cache"]["file"] == CACHE_FILE and state["latency_cache"]["threads"] == 1


class _Crash(RuntimeError):
    pass


def _crash(phase: str, step: int):
    def cb(p: str, s: int) -> None:
        if p == phase and s == step:
            raise _Crash(f"{p}:{s}")
    return cb


def test_resume_reuses_the_table_and_refuses_another_device_or_model(tmp_path: Path, timer: Timer,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    t = target_seconds()
    ov = TINY + ["search.resource=latency", f"search.target={t}", "run.progress=false"]
    ref = pipelines.run(load_config(None, ov + [f"run.out={tmp_path / 'a'}"], pipeline="dms"))
    b = tmp_path / "b"
    with pytest.raises(_Crash):
        pipelines.run(load_config(None, ov + [f"run.out={b}"], pipeline="dms"), callback=_crash("search", 5))
    table = (b / CACHE_FILE).read_bytes()
    mtime = (b / CACHE_FILE).stat().st_mtime_ns
    # another thread count measures another machine: refused, naming the file and what differs
    cfg = pipelines.load_run_config(b)
    cfg.run.threads = 2
    with pytest.raises(ConfigError, match=rf"latency cache .*{CACHE_FILE}.*threads: measured 1, now 2"):
        pipelines.run(cfg, resume=True)
    # a model that is not the one measured: refused
    state = json.loads((b / "state.json").read_text())
    good = state["latency_cache"]["model"]
    state["latency_cache"]["model"] = "0" * 24
    (b / "state.json").write_text(json.dumps(state))
    with pytest.raises(ConfigError, match=r"another device or model \(model: measured '0+'"):
        pipelines.run(pipelines.load_run_config(b), resume=True)
    state["latency_cache"]["model"] = good
    (b / "state.json").write_text(json.dumps(state))
    # the same machine and model: the table is read back, no layer is measured again; the only timings are of
    # the exports that land the target on their measured latency (latency.land_measured)
    timer.calls = 0
    exports: list[int] = []
    measure_export = latency_mod.measure_export
    monkeypatch.setattr(latency_mod, "measure_export", lambda dms: exports.append(1) or measure_export(dms))
    got = pipelines.run(pipelines.load_run_config(b), resume=True)
    assert exports and timer.calls == latency_mod.ROUNDS * len(exports)
    assert (b / CACHE_FILE).read_bytes() == table and (b / CACHE_FILE).stat().st_mtime_ns == mtime
    assert got["groups"] == ref["groups"] and got["search"]["latency"] == ref["search"]["latency"]
