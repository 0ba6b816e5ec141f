"""Run configuration: dataclasses, TOML/YAML loading, ``--set key=value`` overrides and validation.

A run is described by one file plus overrides; every check happens here, before any data is loaded
or any step is trained, and every error names the offending key (``ConfigError: search.target=...``).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import yaml

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

__all__ = ["ConfigError", "RunConfig", "RunSection", "DataConfig", "ModelConfig", "TrainConfig", "SearchConfig",
           "BaselineConfig", "PIPELINES", "default_config", "load_config", "from_dict", "from_file", "read_file",
           "to_dict", "apply_overrides", "validate", "dump_yaml", "flatten", "INT_MAX", "SEED_MAX"]

PIPELINES = ("dms", "dms_p", "dms_fast", "baseline", "pretrain")
DATASETS = ("auto", "digits", "mnist5k", "fashion-mnist", "cifar10")
IMPORTANCE = ("taylor", "fisher", "snip", "l1")
BASELINES = ("uniform", "l1", "taylor")
INT_MAX = 2**31 - 1  # every integer key (steps, sizes, limits) must fit a 32-bit signed int
SEED_MAX = 2**32 - 1  # run.seed is in [0, 2**32 - 1] (numpy's range)
MAX_CONFIG_BYTES = 16 * 1024 * 1024
MAX_SUPERNET_MULT = 16.0
MAX_WIDTH = 65536
MAX_DEPTH = 1024


class ConfigError(ValueError):
    """A bad run configuration (unknown key, wrong type, value out of range, missing path)."""


@dataclass
class RunSection:
    """Where and how the run executes."""

    pipeline: str = "dms"
    seed: int = 0
    out: str = "runs/run"
    threads: int = 0  # torch.set_num_threads; 0 keeps torch's default
    checkpoint_every: int = 50
    eval_every: int = 0  # 0: evaluate only at the end of each phase
    progress: bool = True


@dataclass
class DataConfig:
    """Which dataset, how much of it, batch sizes."""

    name: str = "auto"
    root: str = ""  # directory of the dataset files; "" = the loader's default places
    limit_train: int = 0  # 0 = all
    limit_test: int = 0
    batch_size: int = 128
    eval_batch_size: int = 500


@dataclass
class ModelConfig:
    """The ResNet family (base architecture), the supernet multipliers, an optional pretrained model."""

    family: str = "resnet"
    widths: list[int] = field(default_factory=lambda: [16, 32, 64])
    depths: list[int] = field(default_factory=lambda: [2, 2, 2])
    stem_stride: int = 1
    supernet_width_mult: float = 1.5
    supernet_depth_mult: float = 1.5
    pretrained: str = ""  # dmscale.save directory or a run directory; "" = pretrain the base model in the run


@dataclass
class TrainConfig:
    """Plain SGD training (pretraining the base model, or retraining the found architecture)."""

    steps: int = 1000
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup_steps: int = 0
    label_smoothing: float = 0.0
    reset: bool = False  # retrain only: re-initialize the exported model's weights


@dataclass
class SearchConfig:
    """The DMS search: budget, schedule, optimizers for weights and structure."""

    steps: int = 100
    target: float = 0.5
    resource: str = "flops"  # 'flops' | 'params'
    target_of: str = "base"  # 'base' | 'supernet': what the target fraction is relative to
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup_steps: int = 0
    structure_optimizer: str = "adam"  # 'adam' | 'sgd'
    structure_lr: float = 0.0  # 0 = auto: min(0.1, max(0.005, 2 / steps)) (Adam moves a ratio ~lr per step)
    importance: str = "taylor"
    importance_decay: float = 0.99
    resource_weight: float = 1.0
    decay_fraction: float = 0.8
    divisor: int = 1
    min_ratio: float = 0.0
    prune_depth: bool = True
    label_smoothing: float = 0.0
    bn_recalibrate: int = 20  # batches to re-estimate BatchNorm statistics of the found network (0 = off)


@dataclass
class BaselineConfig:
    """Which baselines ``dmscale baseline`` trains at the same FLOPs (each retrained with ``retrain``)."""

    methods: list[str] = field(default_factory=lambda: list(BASELINES))
    taylor_batches: int = 20


@dataclass
class RunConfig:
    """A whole run: one section per phase."""

    run: RunSection = field(default_factory=RunSection)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    pretrain: TrainConfig = field(default_factory=lambda: TrainConfig(steps=300))
    search: SearchConfig = field(default_factory=SearchConfig)
    retrain: TrainConfig = field(default_factory=TrainConfig)
    baseline: BaselineConfig = field(default_factory=BaselineConfig)


def default_config(pipeline: str = "dms") -> RunConfig:
    """Defaults for a pipeline: DMS_p fine-tunes gently; DMS_fast searches longer and does not retrain."""
    if pipeline not in PIPELINES:
        raise ConfigError(f"run.pipeline={pipeline!r}: choose one of {PIPELINES}")
    cfg = RunConfig()
    cfg.run.pipeline = pipeline
    if pipeline == "dms_p":
        cfg.search.lr = 0.01
        cfg.retrain.lr = 0.02
    elif pipeline == "dms_fast":
        cfg.search.steps = 300
        cfg.search.prune_depth = True
        cfg.retrain.steps = 0
    return cfg


# ----------------------------------------------------------------------------------------- conversion
def to_dict(cfg: RunConfig) -> dict[str, Any]:
    """Plain nested dict of a config (JSON/YAML/TOML serialisable)."""
    return dataclasses.asdict(cfg)


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{'search': {'target': 0.5}}`` -> ``{'search.target': 0.5}``."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(key: str, value: Any, default: Any) -> Any:
    """Convert ``value`` to the type of the field's default, or raise naming the key."""
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{key}={value!r}: expected true or false")
    if isinstance(default, int):
        if isinstance(value, bool):
            raise ConfigError(f"{key}={value!r}: expected an integer")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        num: Any = value
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                try:
                    num = float(value)
                except ValueError:
                    pass
        if isinstance(num, float) and math.isfinite(num) and num.is_integer() and abs(num) < 2**53:
            return int(num)
        why = "expected an integer" + (", not a fraction" if isinstance(num, float) and math.isfinite(num) else "")
        raise ConfigError(f"{key}={value!r}: {why}")
    if isinstance(default, float):
        if isinstance(value, bool):
            raise ConfigError(f"{key}={value!r}: expected a number")
        out: float | None = None
        if isinstance(value, (int, float)):
            try:
                out = float(value)
            except OverflowError:
                raise ConfigError(f"{key}={value!r:.40}: number out of range") from None
        elif isinstance(value, str):
            yaml_special = {".nan": math.nan, ".inf": math.inf, "+.inf": math.inf, "-.inf": -math.inf}
            try:
                out = yaml_special.get(value.strip().lower(), None) or float(value)
            except ValueError:
                pass
        if out is None:
            raise ConfigError(f"{key}={value!r}: expected a number")
        if not math.isfinite(out):
            raise ConfigError(f"{key}={value!r}: must be a finite number")
        return out
    if isinstance(default, str):
        if value is None:
            return ""
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}={value!r}: expected a string")
    if isinstance(default, list):
        if isinstance(value, str):
            value = [v.strip() for v in value.strip("[]").split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}={value!r}: expected a list")
        elem = default[0] if default else ""
        return [_coerce(f"{key}[{i}]", v, elem) for i, v in enumerate(value)]
    raise ConfigError(f"{key}: unsupported field type {_type_name(type(default))}")  # pragma: no cover


def _merge(obj: Any, data: Mapping[str, Any], prefix: str) -> None:
    """Recursively set dataclass fields from a nested mapping; unknown keys raise naming the full key."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a table/mapping, got {type(data).__name__}")
    names = {f.name: f for f in dataclasses.fields(obj)}
    for k, v in data.items():
        key = f"{prefix}{k}"
        if k not in names:
            hint = ""
            import difflib

            close = difflib.get_close_matches(str(k), list(names), n=1)
            if close:
                hint = f" (did you mean {prefix}{close[0]}?)"
            raise ConfigError(f"unknown config key {key!r}{hint}; valid keys here: {sorted(names)}")
        cur = getattr(obj, k)
        if dataclasses.is_dataclass(cur):
            _merge(cur, v, key + ".")
        else:
            setattr(obj, k, _coerce(key, v, cur))


def from_dict(data: Mapping[str, Any], pipeline: str | None = None) -> RunConfig:
    """Build a config from a nested dict on top of the pipeline's defaults (unknown keys are errors)."""
    run = data.get("run") if isinstance(data, Mapping) else None
    pipe = pipeline or (str(run.get("pipeline", "dms")) if isinstance(run, Mapping) else "dms")
    cfg = default_config(pipe)
    _merge(cfg, data, "")
    if pipeline is not None:
        cfg.run.pipeline = pipeline
    return cfg


def read_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Parse a TOML (.toml) or YAML (.yaml/.yml) or JSON (.json) config file into a nested dict.

    Every failure names the file: missing, not a regular file (a FIFO never blocks), binary or not
    UTF-8, not parseable, or not a table at the top level.
    """
    from dmscale.serialization.atomic import read_regular_file

    p = Path(path)
    if p.suffix not in (".toml", ".yaml", ".yml", ".json"):
        raise ConfigError(f"config file {str(p)!r}: use a .toml, .yaml/.yml or .json file")
    raw = read_regular_file(p, what="config file", max_bytes=MAX_CONFIG_BYTES, exc=ConfigError, missing=ConfigError)
    if b"\x00" in raw:
        raise ConfigError(f"config file {str(p)!r} is binary (contains NUL bytes), not a text config")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config file {str(p)!r} is not UTF-8 text (byte {exc.start}): is it a binary file?") from None
    try:
        if p.suffix == ".toml":
            data = tomllib.loads(text)
        elif p.suffix in (".yaml", ".yml"):
            data = yaml.safe_load(text)
            data = {} if data is None else data
        else:
            data = json.loads(text)
    except (tomllib.TOMLDecodeError, yaml.YAMLError, json.JSONDecodeError, RecursionError) as exc:
        raise ConfigError(f"config file {str(p)!r} does not parse: {str(exc)[:300]}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(p)!r}: top level must be a table/mapping, got {type(data).__name__}")
    return data


def from_file(path: str | os.PathLike[str], pipeline: str | None = None) -> RunConfig:
    """:func:`from_dict` of :func:`read_file` (not validated); errors name the file and the key."""
    data = read_file(path)
    try:
        return from_dict(data, pipeline)
    except ConfigError as exc:
        raise ConfigError(f"config file {str(path)!r}: {exc}") from None


def _parse_value(text: str) -> Any:
    """A ``--set`` value: YAML scalar/list syntax (``0.5``, ``true``, ``[8, 16]``, ``fashion-mnist``)."""
    try:
        return yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        return text


def apply_overrides(cfg: RunConfig, overrides: Iterable[str] | Mapping[str, Any]) -> RunConfig:
    """Apply ``key=value`` overrides (``search.target=0.4``) in place, with the same checks as the file."""
    items = overrides.items() if isinstance(overrides, Mapping) else []
    if not isinstance(overrides, Mapping):
        parsed = []
        for ov in overrides:
            if "=" not in ov:
                raise ConfigError(f"override {ov!r}: expected key=value, e.g. search.target=0.4")
            k, v = ov.split("=", 1)
            parsed.append((k.strip(), _parse_value(v)))
        items = parsed
    for key, value in items:
        parts = key.split(".")
        nested: dict[str, Any] = {}
        cur = nested
        for p in parts[:-1]:
            cur = cur.setdefault(p, {})
        cur[parts[-1]] = value
        if len(parts) == 1 and not dataclasses.is_dataclass(getattr(cfg, parts[0], None)):
            raise ConfigError(f"unknown config key {key!r}; keys look like section.name, e.g. search.target")
        _merge(cfg, nested, "")
    return cfg


def _check(cond: bool, key: str, value: Any, why: str) -> None:
    if not cond:
        raise ConfigError(f"{key}={value!r}: {why}")


def _check_types(cfg: RunConfig) -> None:
    """Every key has its field's type: integers are ints (never a fraction or a bool), numbers are finite,
    flags are booleans, lists hold their element type; integers fit ``INT_MAX``."""
    defaults = RunConfig()
    for sec in dataclasses.fields(cfg):
        cur, ref = getattr(cfg, sec.name), getattr(defaults, sec.name)
        if not isinstance(cur, type(ref)):
            raise ConfigError(f"{sec.name}: expected a {type(ref).__name__} section, got {type(cur).__name__}")
        for f in dataclasses.fields(ref):
            key, v, d = f"{sec.name}.{f.name}", getattr(cur, f.name), getattr(ref, f.name)
            _check_value(key, v, d)


def _check_value(key: str, v: Any, d: Any) -> None:
    if isinstance(d, bool):
        _check(type(v) is bool, key, v, "expected true or false")
    elif isinstance(d, int):
        _check(type(v) is int, key, v, "expected an integer")
        if key != "run.seed":
            _check(-INT_MAX - 1 <= v <= INT_MAX, key, v, f"out of range (at most {INT_MAX})")
    elif isinstance(d, float):
        _check(type(v) in (int, float), key, v, "expected a number")
        _check(math.isfinite(v), key, v, "must be a finite number")
    elif isinstance(d, str):
        _check(isinstance(v, str), key, v, "expected a string")
        _check("\x00" not in v, key, v, "must not contain NUL characters")
    elif isinstance(d, list):
        _check(isinstance(v, list), key, v, "expected a list")
        elem = d[0] if d else ""
        for i, x in enumerate(v):
            _check_value(f"{key}[{i}]", x, elem)


def validate(cfg: RunConfig, check_paths: bool = True) -> RunConfig:
    """Type, range and consistency checks; raises ``ConfigError`` naming the key before anything runs."""
    if not isinstance(cfg, RunConfig):
        raise ConfigError(f"expected a RunConfig, got {type(cfg).__name__}")
    _check_types(cfg)
    r, d, m, s = cfg.run, cfg.data, cfg.model, cfg.search
    _check(r.pipeline in PIPELINES, "run.pipeline", r.pipeline, f"choose one of {PIPELINES}")
    _check(bool(r.out), "run.out", r.out, "needs a directory")
    _check(0 <= r.seed <= SEED_MAX, "run.seed", r.seed, f"must be in [0, {SEED_MAX}]")
    if check_paths:
        out = Path(r.out).expanduser()
        _check(not out.exists() or out.is_dir(), "run.out", r.out, "exists and is a file, not a directory")
        from dmscale.serialization.dirs import enclosing_dmscale_dir

        outer = enclosing_dmscale_dir(out.parent, "run") if out.parent != out else None
        _check(outer is None, "run.out", r.out, f"is inside the run directory {str(outer)!r}; choose a path outside it")
    _check(r.checkpoint_every >= 1, "run.checkpoint_every", r.checkpoint_every, "must be >= 1")
    _check(r.eval_every >= 0, "run.eval_every", r.eval_every, "must be >= 0 (0 = end of phase only)")
    _check(r.threads >= 0, "run.threads", r.threads, "must be >= 0 (0 = torch default)")
    _check(d.name in DATASETS, "data.name", d.name, f"choose one of {DATASETS}")
    if d.root and check_paths:
        _check(Path(d.root).expanduser().is_dir(), "data.root", d.root, "directory does not exist")
    for k in ("limit_train", "limit_test"):
        _check(getattr(d, k) >= 0, f"data.{k}", getattr(d, k), "must be >= 0 (0 = all)")
    _check(d.batch_size >= 1, "data.batch_size", d.batch_size, "must be >= 1")
    _check(d.eval_batch_size >= 1, "data.eval_batch_size", d.eval_batch_size, "must be >= 1")
    _check(m.family == "resnet", "model.family", m.family, "only 'resnet' (dmscale.app.zoo) is available")
    _check(len(m.widths) >= 1 and all(1 <= w <= MAX_WIDTH for w in m.widths), "model.widths", m.widths,
           f"positive integers up to {MAX_WIDTH}")
    _check(len(m.depths) == len(m.widths) and all(1 <= x <= MAX_DEPTH for x in m.depths), "model.depths", m.depths,
           f"positive integers up to {MAX_DEPTH}, one per width")
    _check(m.stem_stride in (1, 2, 4), "model.stem_stride", m.stem_stride, "must be 1, 2 or 4")
    for k in ("supernet_width_mult", "supernet_depth_mult"):
        _check(1.0 <= getattr(m, k) <= MAX_SUPERNET_MULT, f"model.{k}", getattr(m, k),
               f"must be in [1, {MAX_SUPERNET_MULT:g}]")
    if m.pretrained and check_paths:
        _check(Path(m.pretrained).expanduser().exists(), "model.pretrained", m.pretrained, "path does not exist")
    for sec in ("pretrain", "retrain"):
        t: TrainConfig = getattr(cfg, sec)
        _check(t.steps >= 0, f"{sec}.steps", t.steps, "must be >= 0")
        _check(t.lr > 0, f"{sec}.lr", t.lr, "must be > 0")
        _check(0 <= t.momentum < 1, f"{sec}.momentum", t.momentum, "must be in [0, 1)")
        _check(t.weight_decay >= 0, f"{sec}.weight_decay", t.weight_decay, "must be >= 0")
        _check(t.warmup_steps >= 0, f"{sec}.warmup_steps", t.warmup_steps, "must be >= 0")
        _check(0 <= t.label_smoothing < 1, f"{sec}.label_smoothing", t.label_smoothing, "must be in [0, 1)")
    _check(s.steps >= 1, "search.steps", s.steps, "must be >= 1")
    _check(0.0 < s.target <= 1.0, "search.target", s.target, "must be a fraction in (0, 1]")
    _check(s.resource in ("flops", "params"), "search.resource", s.resource, "choose 'flops' or 'params'")
    _check(s.target_of in ("base", "supernet"), "search.target_of", s.target_of, "choose 'base' or 'supernet'")
    _check(s.lr > 0, "search.lr", s.lr, "must be > 0")
    _check(0 <= s.momentum < 1, "search.momentum", s.momentum, "must be in [0, 1)")
    _check(s.weight_decay >= 0, "search.weight_decay", s.weight_decay, "must be >= 0")
    _check(s.structure_optimizer in ("adam", "sgd"), "search.structure_optimizer", s.structure_optimizer,
           "choose 'adam' or 'sgd'")
    _check(s.structure_lr >= 0, "search.structure_lr", s.structure_lr, "must be >= 0 (0 = auto)")
    _check(s.importance in IMPORTANCE, "search.importance", s.importance, f"choose one of {IMPORTANCE}")
    _check(0 <= s.importance_decay < 1, "search.importance_decay", s.importance_decay, "must be in [0, 1)")
    _check(s.resource_weight > 0, "search.resource_weight", s.resource_weight, "must be > 0")
    _check(0 < s.decay_fraction <= 1, "search.decay_fraction", s.decay_fraction, "must be in (0, 1]")
    _check(s.divisor >= 1, "search.divisor", s.divisor, "must be >= 1")
    _check(0 <= s.min_ratio < 1, "search.min_ratio", s.min_ratio, "must be in [0, 1)")
    _check(0 <= s.label_smoothing < 1, "search.label_smoothing", s.label_smoothing, "must be in [0, 1)")
    _check(s.bn_recalibrate >= 0, "search.bn_recalibrate", s.bn_recalibrate, "must be >= 0 (0 = off)")
    _check(len(cfg.baseline.methods) >= 1 and all(x in BASELINES for x in cfg.baseline.methods),
           "baseline.methods", cfg.baseline.methods, f"choose from {BASELINES}")
    _check(cfg.baseline.taylor_batches >= 1, "baseline.taylor_batches", cfg.baseline.taylor_batches, "must be >= 1")
    return cfg


def load_config(path: str | os.PathLike[str] | None = None, overrides: Iterable[str] | Mapping[str, Any] = (),
                pipeline: str | None = None, check_paths: bool = True) -> RunConfig:
    """File (optional) + overrides on the pipeline's defaults, validated."""
    cfg = from_file(path, pipeline) if path else from_dict({}, pipeline)
    apply_overrides(cfg, overrides)
    if pipeline is not None:
        cfg.run.pipeline = pipeline
    return validate(cfg, check_paths=check_paths)


def dump_yaml(cfg: RunConfig) -> str:
    """The config as YAML text (what the run directory stores as ``config.yaml``)."""
    return yaml.safe_dump(copy.deepcopy(to_dict(cfg)), sort_keys=False)
