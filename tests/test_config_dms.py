"""The ``[search]`` section is ``dmscale.DMSConfig``: every field is a key, validated by DMSConfig, and reaches the DMS
the app builds without a hand mapping."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from dmscale.app import pipelines
from dmscale.app.config import (DMS_APP_FIELDS, DMS_KEYS, ConfigError, SearchConfig, dump_yaml, from_dict,
                                load_config, read_file)
from dmscale.search import DMSConfig

TINY = ["data.name=digits", "data.limit_train=128", "data.limit_test=64", "data.batch_size=32",
        "data.eval_batch_size=64", "model.widths=[4,8]", "model.depths=[1,2]", "search.steps=4",
        "retrain.steps=0", "run.checkpoint_every=2", "run.threads=1", "run.progress=false"]


@pytest.fixture(autouse=True)
def _restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def test_every_dmsconfig_field_is_a_search_key_or_set_by_the_app() -> None:
    names = {f.name for f in dataclasses.fields(DMSConfig)}
    assert names == set(DMS_KEYS) | set(DMS_APP_FIELDS)
    keys = {f.name for f in dataclasses.fields(SearchConfig)}
    assert set(DMS_KEYS) <= keys and not (set(DMS_APP_FIELDS) - {"target"}) & keys  # search.target: the budget
    # the defaults are DMSConfig's (the app only turns the unsupported-op warning into the summary)
    got = SearchConfig().dms_config()
    for f in dataclasses.fields(DMSConfig):
        if f.name not in DMS_APP_FIELDS and f.name != "warn":
            want = DMSConfig().__getattribute__(f.name)
            assert getattr(got, f.name) == want, f.name
    assert got.warn is False and got.total_steps == SearchConfig().steps


def test_yaml_keys_reach_the_dms(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    f = tmp_path / "c.yaml"
    f.write_text("search:\n  tolerance: 0.03\n  recover_below: 0.2\n  adaptive_weight: 0.5\n  fold_masks: false\n"
                 "  importance: l1\n  divisor: 2\n  exclude: [head]\n  bounds: {'stem*': {max_ratio: 0.75}}\n")
    cfg = load_config(f, TINY + [f"run.out={tmp_path / 'run'}"], pipeline="dms")
    seen = []
    real = pipelines.search_dms

    def spy(run, model, target, **app):
        dms = real(run, model, target, **app)
        seen.append(dms)
        return dms

    monkeypatch.setattr(pipelines, "search_dms", spy)
    pipelines.run(cfg)
    c = seen[0].config
    assert (c.tolerance, c.recover_below, c.adaptive_weight, c.fold_masks, c.importance, c.divisor) == \
        (0.03, 0.2, 0.5, False, "l1", 2)
    assert c.exclude == ("head",) and c.bounds["stem*"].max_ratio == 0.75 and c.total_steps == 4
    assert c.target.flops is not None and c.latency_cache is None
    # the saved config keeps them; a resume reads them back
    saved = pipelines.load_run_config(tmp_path / "run")
    assert saved.search.tolerance == 0.03 and saved.search.bounds == {"stem*": {"max_ratio": 0.75}}


def test_depth_blocks_lists_and_empty_means_automatic() -> None:
    cfg = from_dict({"search": {"depth_blocks": [["a", "b"], ["c"]], "depth_containers": []}})
    d = cfg.search.dms_config()
    assert d.depth_blocks == (("a", "b"), ("c",)) and d.depth_containers is None and d.bounds is None
    assert from_dict({"search": {"depth_blocks": ["a,b"]}}).search.depth_blocks == [["a", "b"]]  # --set syntax
    with pytest.raises(ConfigError, match=r"search\.depth_blocks\[0\].*expected a list"):
        from_dict({"search": {"depth_blocks": [{"a": 1}]}})


@pytest.mark.parametrize("key, hint", [("tolerence", "tolerance"), ("recover_bellow", "recover_below"),
                                       ("prune_head", "prune_heads"), ("latency_repeat", "latency_repeats")])
def test_a_typo_gets_a_suggestion(tmp_path: Path, key: str, hint: str) -> None:
    f = tmp_path / "c.toml"
    f.write_text(f"[search]\n{key} = 1\n")
    with pytest.raises(ConfigError, match=rf"search\.{key}.*did you mean search\.{hint}\?"):
        load_config(f)
    with pytest.raises(ConfigError, match=rf"did you mean search\.{hint}\?"):
        load_config(None, [f"search.{key}=1"])


@pytest.mark.parametrize("override, key", [
    ("search.tolerance=0.9", "search.tolerance"),
    ("search.recover_below=0.005", "search.recover_below"),
    ("search.importance=taylr", "search.importance"),
    ("search.importance_decay=1.0", "search.importance_decay"),
    ("search.adaptive_weight=-1", "search.adaptive_weight"),
    ("search.divisor=0", "search.divisor"),
    ("search.latency_repeats=0", "search.latency_repeats"),
    ("search.bounds={\"x\": {\"min_ratio\": 2}}", "search.bounds"),
    ("search.bounds={\"x\": {\"keep\": 2}}", "search.bounds"),
    ("search.fold_masks=maybe", "search.fold_masks"),
])
def test_a_bad_dms_value_names_its_key(override: str, key: str) -> None:
    with pytest.raises(ConfigError, match=rf"^{key.replace('.', r'[.]')}"):
        load_config(None, [override])


def test_the_app_owned_fields_are_not_keys() -> None:
    for k in DMS_APP_FIELDS:
        if k in ("target",):
            continue
        with pytest.raises(ConfigError, match=rf"unknown config key 'search\.{k}'"):
            load_config(None, [f"search.{k}=1"])


def test_example_configs_and_a_dump_round_trip(tmp_path: Path) -> None:
    cfg = load_config(None, ["search.tolerance=0.02", "search.depth_blocks=[[a],[b]]"], check_paths=False)
    f = tmp_path / "c.yaml"
    f.write_text(dump_yaml(cfg))
    again = from_dict(read_file(f))
    assert again.search == cfg.search


def test_every_search_key_is_documented() -> None:
    text = (Path(__file__).resolve().parents[1] / "docs" / "cli.md").read_text()
    missing = [f.name for f in dataclasses.fields(SearchConfig) if f"`{f.name}`" not in text]
    assert not missing, f"docs/cli.md does not document search keys {missing}"


def test_baselines_prune_the_search_space_of_the_config(tmp_path: Path) -> None:
    """search.divisor / bounds reach the one-shot baselines too (the same groups, the same rounding)."""
    out = tmp_path / "run"
    s = pipelines.run(load_config(None, TINY + [f"run.out={out}", "pretrain.steps=2", "search.divisor=2",
                                                "baseline.methods=[l1]"], pipeline="baseline"))
    import dmscale

    model = dmscale.load(out / "baselines" / "l1" / "model")
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert all(m.out_channels % 2 == 0 for m in convs[:-1]) and s["rows"][-1]["baseline"] == "l1"
