"""Pipelines, config and baselines on tiny settings (digits, a few steps)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

import dmscale
from dmscale.app import pipelines
from dmscale.app import zoo
from dmscale.app.config import ConfigError, load_config

TINY = ["data.name=digits", "data.limit_train=256", "data.limit_test=128", "data.batch_size=32",
        "data.eval_batch_size=128", "model.widths=[4,8]", "model.depths=[1,2]", "search.steps=6",
        "retrain.steps=4", "pretrain.steps=4", "run.checkpoint_every=2", "run.threads=1", "run.progress=false"]


pytestmark = pytest.mark.usefixtures("restore_threads")


def tiny(tmp: Path, pipeline: str = "dms", *extra: str):
    """A validated tiny config writing to ``tmp``."""
    return load_config(None, TINY + [f"run.out={tmp}", *extra], pipeline=pipeline)


# ------------------------------------------------------------------------------------------- config
def test_config_unknown_key_names_it(tmp_path: Path) -> None:
    f = tmp_path / "c.toml"
    f.write_text("[search]\ntagret = 0.5\n")
    with pytest.raises(ConfigError, match=r"search\.tagret.*did you mean search\.target"):
        load_config(f)
    with pytest.raises(ConfigError, match=r"serch"):
        load_config(None, ["serch.target=0.5"])


@pytest.mark.parametrize("value", ["0", "1.5", "-0.2"])
def test_config_target_outside_unit_interval(value: str) -> None:
    with pytest.raises(ConfigError, match=r"search\.target"):
        load_config(None, [f"search.target={value}"])


def test_config_missing_data_path_and_pretrained() -> None:
    with pytest.raises(ConfigError, match=r"data\.root"):
        load_config(None, ["data.root=/nonexistent/dmscale-data"])
    with pytest.raises(ConfigError, match=r"model\.pretrained"):
        load_config(None, ["model.pretrained=/nonexistent/model"], pipeline="dms_p")


def test_config_types_yaml_and_defaults(tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text("search:\n  target: 0.4\n  steps: '12'\nmodel:\n  widths: [8, 16]\n  depths: [1, 1]\n")
    cfg = load_config(f, ["search.prune_depth=false", "data.name=digits"], pipeline="dms_fast")
    assert cfg.search.target == 0.4 and cfg.search.steps == 12 and cfg.model.widths == [8, 16]
    assert cfg.search.prune_depth is False and cfg.run.pipeline == "dms_fast" and cfg.retrain.steps == 0
    with pytest.raises(ConfigError, match=r"search\.steps"):
        load_config(None, ["search.steps=many"])
    with pytest.raises(ConfigError, match=r"model\.depths"):
        load_config(None, ["model.depths=[1,2,3,4]"])


def test_config_user_model_keys_tables_and_json(tmp_path: Path) -> None:
    """model.spec / kwargs / trust / supernet_kwargs and [task] from TOML tables, YAML, --set JSON; checked by key."""
    f = tmp_path / "c.toml"
    f.write_text('[model]\nspec = "hf:some/hub-name"\ntrust = ["mypkg"]\n[model.kwargs]\ndtype = "bfloat16"\n'
                 '[task]\ndistill = 0.5\ntemperature = 2\n[data]\nname = "digits"\n')
    cfg = load_config(f, pipeline="dms_p")
    assert cfg.model.spec == "hf:some/hub-name" and cfg.model.kwargs == {"dtype": "bfloat16"}
    assert cfg.model.trust == ["mypkg"] and cfg.task.distill == 0.5 and cfg.task.temperature == 2.0
    again = load_config(None, ['model.kwargs={"width": 8}', "model.spec=hf:x/y"], pipeline="dms_p")
    assert again.model.kwargs == {"width": 8}
    from dmscale.app.config import dump_yaml, from_dict
    import yaml

    assert from_dict(yaml.safe_load(dump_yaml(cfg))).model.kwargs == {"dtype": "bfloat16"}  # config.yaml round trip
    for bad, key in ((["model.kwargs=[1, 2]", "model.spec=hf:x/y"], "model.kwargs"),
                     (["model.kwargs={\"w\": 1}"], "model.kwargs"),  # the built-in family has no kwargs
                     (["task.distill=-1"], "task.distill"), (["task.temperature=0"], "task.temperature"),
                     (["task.loss=no colon"], "task.loss"), (["data.seq_len=1"], "data.seq_len"),
                     (["data.heldout_fraction=0"], "data.heldout_fraction"), (["data.channels=2"], "data.channels"),
                     (["model.supernet_width_mult=0.5"], "model.supernet_width_mult"),
                     (["model.spec=hf:x/y", "model.supernet_kwargs={\"w\": 2}"], "model.supernet_kwargs"),
                     (["model.spec=hf:x/y", "model.trust=[os]"], "model.trust")):
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            load_config(None, bad, pipeline="dms_p")
    with pytest.raises(ConfigError, match=r"task\.distill.*pipeline 'dms'"):
        load_config(None, ["task.distill=1"], pipeline="dms")


def test_supernet_multipliers_auto() -> None:
    from dmscale.app.config import supernet_mults

    assert supernet_mults(load_config(None, [], pipeline="dms").model) == (1.5, 1.5)  # the built-in family
    user = load_config(None, ["model.spec=hf:x/y"], pipeline="dms").model
    assert supernet_mults(user) == (1.0, 1.0)  # a user model: no enlargement unless asked
    assert supernet_mults(load_config(None, ["model.supernet_width_mult=2"]).model) == (2.0, 1.5)


def test_example_configs_parse() -> None:
    root = Path(__file__).resolve().parents[1] / "configs"
    files = sorted(root.glob("*.toml"))
    assert files, "configs/*.toml missing"
    for f in files:
        load_config(f)


# ------------------------------------------------------------------------------------------- pieces
def test_zoo_multipliers_and_describe() -> None:
    m = zoo.build([8, 16], [2, 2], in_ch=1, n_classes=3, width_mult=1.5, depth_mult=1.5)
    d = zoo.describe(m)
    assert d["stem"] == 12 and [s["blocks"] for s in d["stages"]] == [3, 3] and d["stages"][1]["out"][0] == 24
    assert m(torch.randn(2, 1, 8, 8)).shape == (2, 3)


def test_batches_are_a_function_of_seed_and_step() -> None:
    x, y = torch.arange(100).float()[:, None], torch.arange(100)
    a, b = pipelines.Batches(x, y, 16, seed=3), pipelines.Batches(x, y, 16, seed=3)
    seq = [a(s)[1] for s in range(20)]
    assert all(torch.equal(seq[s], b(s)[1]) for s in (19, 0, 7, 13))  # random access = sequential
    assert a.per_epoch == 6 and not torch.equal(a(0)[1], a(6)[1])  # a new permutation each epoch


def test_one_shot_pruning_and_uniform_width_hit_the_budget() -> None:
    torch.manual_seed(0)
    m = zoo.build([8, 16], [1, 2], in_ch=1, n_classes=10)
    x = torch.randn(1, 1, 8, 8)
    full = dmscale.count(m, (x,))["flops"]
    xb, yb = torch.randn(16, 1, 8, 8), torch.randint(0, 10, (16,))
    for method in ("l1", "taylor"):
        small, r = pipelines.one_shot_prune(m, x, 0.5, method, "flops", lambda i: (xb, yb), n_batches=2)
        f = dmscale.count(small, (x,))["flops"]
        assert 0.3 * full < f <= 0.5 * full + 1, (method, f / full)
        assert 0.0 < r < 1.0


# ------------------------------------------------------------------------------------------- pipelines
def test_dms_pipeline_writes_the_run_directory(tmp_path: Path) -> None:
    out = tmp_path / "run"
    s = pipelines.run(tiny(out))
    for f in ("config.yaml", "log.jsonl", "state.json", "summary.json", "report.md", "resource.png", "widths.png",
              "acc_flops.png", "model/structure.json", "searched/structure.json"):
        assert (out / f).exists(), f
    recs = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    search = [r for r in recs if r["phase"] == "search" and "resource" in r]
    assert [r["step"] for r in search] == list(range(1, 7))
    assert {"task_loss", "resource", "target", "kept"} <= set(search[0])
    assert len([r for r in recs if r["phase"] == "retrain" and "loss" in r]) == 4
    names = [r["name"] for r in s["rows"]]
    assert names[:2] == ["base (reference)", "supernet (full)"] and "found, retrained" in names
    model = dmscale.load(out / "model")
    c = dmscale.count(model, (torch.randn(1, 1, 8, 8),))
    assert c["flops"] == s["rows"][-1]["flops"]
    report = (out / "report.md").read_text()
    assert "stages.0[depth]" in report and "found, retrained" in report
    assert not list((out / "checkpoints").iterdir())  # finished phases drop their checkpoints
    with pytest.raises(FileExistsError, match="--resume"):
        pipelines.run(tiny(out))


class _Crash(RuntimeError):
    pass


def _crash_at(phase: str, step: int):
    def cb(p: str, s: int) -> None:
        if p == phase and s == step:
            raise _Crash(f"{p}:{s}")
    return cb


def test_resume_reaches_the_same_result(tmp_path: Path) -> None:
    extra = ["search.steps=7", "retrain.steps=5", "run.eval_every=3"]
    ref = pipelines.run(tiny(tmp_path / "a", "dms", *extra))
    b = tmp_path / "b"
    with pytest.raises(_Crash):
        pipelines.run(tiny(b, "dms", *extra), callback=_crash_at("search", 5))
    assert (b / "checkpoints" / "search.pt").exists()
    ck = torch.load(b / "checkpoints" / "search.pt", weights_only=True)
    assert ck["step"] == 4 and {"model", "optimizers", "dms", "rng", "data"} <= set(ck)
    with pytest.raises(_Crash):
        pipelines.run(pipelines.load_run_config(b), resume=True, callback=_crash_at("retrain", 3))
    got = pipelines.run(pipelines.load_run_config(b), resume=True)
    assert got["groups"] == ref["groups"]
    assert [(r["name"], r["flops"], r["acc"]) for r in got["rows"]] == [(r["name"], r["flops"], r["acc"])
                                                                         for r in ref["rows"]]
    sa = dmscale.load(tmp_path / "a" / "model").state_dict()
    sb = dmscale.load(b / "model").state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    la = (tmp_path / "a" / "log.jsonl").read_text().splitlines()
    lb = (b / "log.jsonl").read_text().splitlines()
    assert la == lb


def test_dms_p_and_fast_from_a_pretrained_run(tmp_path: Path) -> None:
    pre = pipelines.run(tiny(tmp_path / "pre", "pretrain"))
    assert pre["rows"][0]["name"] == "pretrained base"
    p = pipelines.run(tiny(tmp_path / "p", "dms_p", f"model.pretrained={tmp_path / 'pre'}"))
    assert p["rows"][0]["acc"] == pre["rows"][0]["acc"]  # the same pretrained model, evaluated again
    before = dmscale.load(tmp_path / "pre" / "pretrained")
    f = pipelines.run(tiny(tmp_path / "f", "dms_fast", f"model.pretrained={tmp_path / 'pre'}", "search.steps=5"))
    assert f["rows"][-1]["name"] == "exported"
    assert not (tmp_path / "f" / "checkpoints" / "retrain.pt").exists()
    # frozen weights: surviving conv filters are slices of the pretrained ones
    after = dmscale.load(tmp_path / "f" / "model")
    w0, w1 = before.head.weight, after.head.weight
    assert all(any(torch.allclose(w1[:, j], w0[:, i]) for i in range(w0.shape[1])) for j in range(w1.shape[1]))


def test_baselines_compare_at_the_same_budget(tmp_path: Path) -> None:
    out = tmp_path / "run"
    pipelines.run(tiny(out))
    cfg = pipelines.load_run_config(out)
    s = pipelines.run_baselines(cfg)
    rows = {r["name"]: r for r in s["rows"]}
    goal = 0.5 * s["reference"]["flops"]
    for m in ("uniform", "l1", "taylor"):
        r = rows[f"baseline: {m}"]
        assert r["flops"] <= goal * 1.0001 and r["acc"] is not None
    assert "baseline: taylor" in (out / "report.md").read_text()


# ------------------------------------------------------------------------------------------- run directory safety
@pytest.fixture(scope="module")
def crashed(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Runs interrupted in the search after step 5 (checkpoint at 4): seed 0, seed 1, other widths."""
    root = tmp_path_factory.mktemp("crashed")
    out = {}
    for name, extra in {"a": [], "seed1": ["run.seed=1"], "wide": ["model.widths=[6,8]"]}.items():
        with pytest.raises(_Crash):
            pipelines.run(tiny(root / name, "dms", *extra), callback=_crash_at("search", 5))
        out[name] = root / name
    return out


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_run_directory_is_marked_and_locked_while_a_command_runs(tmp_path: Path) -> None:
    from dmscale.app.runs import is_run_dir, lock_run_dir
    from dmscale.serialization.dirs import MARKER_FILE, dir_kind, lock_dir
    from dmscale.serialization.errors import DirLockedError

    out = tmp_path / "run"
    seen = []

    def probe(phase: str, step: int) -> None:
        if not seen:  # inside the command: the directory is marked and its lock is taken
            for take in (lock_run_dir, lock_dir):  # another command, or any other holder, in this process too
                with pytest.raises(DirLockedError, match=f"in use .*PID {os.getpid()}"):
                    take(out)
            seen.append(phase)
    pipelines.run(tiny(out, "pretrain"), callback=probe)
    assert seen and (out / MARKER_FILE).is_file() and dir_kind(out) == "run" and is_run_dir(out)
    with lock_run_dir(out):  # released when the command ended
        with pytest.raises(DirLockedError):
            pipelines.run(pipelines.load_run_config(out), resume=True)


def test_run_of_the_previous_layout_resumes_and_is_marked(crashed: dict[str, Path], tmp_path: Path) -> None:
    """A run directory of dmscale < 0.2 (config.yaml + state.json, no marker) resumes, and is marked then."""
    from dmscale.app.runs import check_output_path, is_run_dir
    from dmscale.serialization.dirs import MARKER_FILE, dir_kind

    d = _copy(crashed["a"], tmp_path / "legacy")
    (d / MARKER_FILE).unlink()
    assert dir_kind(d) is None and is_run_dir(d)
    with pytest.raises(ConfigError, match="inside the run directory"):
        check_output_path(d / "model")  # unmarked, it is still a run: its outputs are its own
    s = pipelines.run(pipelines.load_run_config(d), resume=True)
    assert "found, retrained" in [r["name"] for r in s["rows"]] and dir_kind(d) == "run"
    # a directory that only looks like one (a marker of another kind) is not a run
    other = _copy(crashed["a"], tmp_path / "model-marked")
    (other / MARKER_FILE).write_text('{"dmscale": "model"}\n')
    assert not is_run_dir(other)
    with pytest.raises(FileExistsError, match="not a dmscale run directory"):
        pipelines.run(pipelines.load_run_config(other), resume=True)


def test_tampered_or_foreign_checkpoints_are_refused_by_name(crashed: dict[str, Path], tmp_path: Path) -> None:
    from dmscale.recipes.loop import CheckpointError

    ck_name = Path("checkpoints") / "search.pt"
    # a tampered step (it used to skip the search)
    d = _copy(crashed["a"], tmp_path / "step")
    ck = torch.load(d / ck_name, weights_only=True)
    for bad, why in ((999, r"step 999 is not a step of this phase \(1\.\.6\)"), (2, "disagrees")):
        ck["step"] = bad
        torch.save(ck, d / ck_name)
        with pytest.raises(CheckpointError, match=why):
            pipelines.run(pipelines.load_run_config(d), resume=True)
    # the checkpoint of another seed (it used to be mixed in)
    d = _copy(crashed["a"], tmp_path / "seed")
    (d / ck_name).write_bytes((crashed["seed1"] / ck_name).read_bytes())
    with pytest.raises(CheckpointError, match="another seed"):
        pipelines.run(pipelines.load_run_config(d), resume=True)
    # the checkpoint of another architecture, same seed
    d = _copy(crashed["a"], tmp_path / "arch")
    (d / ck_name).write_bytes((crashed["wide"] / ck_name).read_bytes())
    with pytest.raises(CheckpointError, match="another architecture"):
        pipelines.run(pipelines.load_run_config(d), resume=True)
    # corrupt, empty, not a dict
    for content in (b"garbage", b""):
        (d / ck_name).write_bytes(content)
        with pytest.raises(CheckpointError, match="search.pt"):
            pipelines.run(pipelines.load_run_config(d), resume=True)
    torch.save([1, 2, 3], d / ck_name)
    with pytest.raises(CheckpointError, match="does not hold a dict"):
        pipelines.run(pipelines.load_run_config(d), resume=True)
    # the untouched copy resumes to the end
    s = pipelines.run(pipelines.load_run_config(_copy(crashed["a"], tmp_path / "ok")), resume=True)
    assert "found, retrained" in [r["name"] for r in s["rows"]]


def test_corrupt_run_files_are_named(crashed: dict[str, Path], tmp_path: Path) -> None:
    from dmscale.app.cli import main
    d = _copy(crashed["a"], tmp_path / "state")
    (d / "state.json").write_text("{not json")
    with pytest.raises(ConfigError, match="state.json' is corrupted"):
        pipelines.run(pipelines.load_run_config(d), resume=True)
    (d / "state.json").write_text("[]")
    with pytest.raises(ConfigError, match="state.json' is corrupted: expected a JSON dict"):
        pipelines.run(pipelines.load_run_config(d), resume=True)
    d = _copy(crashed["a"], tmp_path / "cfg")
    (d / "config.yaml").write_text("search: [unclosed\n")
    with pytest.raises(ConfigError, match="config.yaml' does not parse"):
        pipelines.load_run_config(d)
    (d / "config.yaml").write_text("- a list\n")
    assert main(["search", "--resume", str(d), "-q"]) == 2


def test_clean_run_dir_refuses_what_dmscale_did_not_create(tmp_path: Path) -> None:
    from dmscale.app.runs import clean_run_dir, lock_run_dir
    from dmscale.serialization.dirs import claim_dir
    from dmscale.serialization.errors import DirLockedError, ForeignDirectoryError

    legacy = tmp_path / "legacy"
    legacy.mkdir()
    (legacy / "config.yaml").write_text("run: {}\n")
    with pytest.raises(ForeignDirectoryError, match="not created by dmscale"):
        clean_run_dir(legacy)
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(ForeignDirectoryError, match="is not a directory"):
        clean_run_dir(f)
    link = tmp_path / "link"
    mine = tmp_path / "mine"
    mine.mkdir()
    claim_dir(mine, "run")
    link.symlink_to(mine)
    with pytest.raises(ForeignDirectoryError, match="symbolic link"):
        clean_run_dir(link)
    with lock_run_dir(mine):
        with pytest.raises(DirLockedError, match="in use"):
            clean_run_dir(mine)
    clean_run_dir(mine)
    assert not mine.exists() and legacy.exists() and f.exists()
    clean_run_dir(tmp_path / "never-existed")  # nothing to do
