"""Run configuration: dataclasses, TOML/YAML loading, ``--set key=value`` overrides and validation.

A run is described by one file plus overrides; every check happens here, before any data is loaded
or any step is trained, and every error names the offending key (``ConfigError: search.target=...``).
"""

from __future__ import annotations

import collections.abc
import copy
import dataclasses
import json
import math
import os
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import yaml

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

__all__ = ["ConfigError", "RunConfig", "RunSection", "DataConfig", "ModelConfig", "TrainConfig", "SearchConfig",
           "BaselineConfig", "TaskConfig", "DMS_KEYS", "DMS_APP_FIELDS", "latency_target", "supernet_mults", "PIPELINES", "default_config", "load_config", "from_dict", "from_file", "read_file",
           "to_dict", "apply_overrides", "validate", "dump_yaml", "flatten", "INT_MAX", "SEED_MAX"]

PIPELINES = ("dms", "dms_p", "dms_fast", "baseline", "pretrain")
DATASETS = ("auto", "digits", "mnist5k", "fashion-mnist", "cifar10")
RESOURCES = ("flops", "params", "latency")
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
    """Which data (a built-in set, an image folder, an ``.npz`` file, a text file), how much of it, batch sizes."""

    name: str = "auto"  # anything dmscale.app.datasets.load_data reads (--data)
    root: str = ""  # directory of the built-in dataset files; "" = the loader's default places
    limit_train: int = 0  # 0 = all (text: training windows)
    limit_test: int = 0
    batch_size: int = 128
    eval_batch_size: int = 500
    size: int = 0  # image folders: resize every image to size x size (0 = the most common size)
    channels: int = 0  # image folders: 1 or 3 (0 = grayscale when every image is, else RGB)
    tokenizer: str = ""  # text: "" = the hf: model's tokenizer, else bytes; "bytes"; a tokenizer directory
    seq_len: int = 128  # text: tokens per training window (and perplexity window)
    heldout_fraction: float = 0.1  # text: the last fraction of the file, held out for the perplexity


@dataclass
class ModelConfig:
    """The model: the built-in ResNet family (base architecture) or a user's model (``spec``), the supernet
    enlargement, an optional pretrained model."""

    spec: str = ""  # --model: "" = the built-in family; pkg.module:factory, a dmscale.save directory, hf:NAME_OR_PATH
    kwargs: dict = field(default_factory=dict)  # --model-kwargs: factory / from_pretrained keyword arguments
    trust: list[str] = field(default_factory=list)  # --trust: packages a saved model's classes may come from
    supernet_kwargs: dict = field(default_factory=dict)  # search on a factory: kwargs of the enlarged supernet
    family: str = "resnet"
    widths: list[int] = field(default_factory=lambda: [16, 32, 64])
    depths: list[int] = field(default_factory=lambda: [2, 2, 2])
    stem_stride: int = 1
    supernet_width_mult: float = 0.0  # 0 = auto: 1.5 for the built-in family, 1 (no enlargement) for a user model
    supernet_depth_mult: float = 0.0  # 0 = auto: 1.5 for the built-in family, 1 for a user model
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
class _SearchKeys:
    """The ``[search]`` keys that are not ``DMSConfig`` fields: length, budget, optimizers, BN recalibration."""

    steps: int = 100  # DMSConfig.total_steps
    target: float = 0.5  # a fraction in (0, 1] of flops/params; seconds for resource = 'latency'
    resource: str = "flops"  # 'flops' | 'params' | 'latency'
    target_of: str = "base"  # 'base' | 'supernet': what a flops/params fraction is relative to
    latency_device: str = ""  # resource = 'latency': torch device to measure on ("" = where the model is)
    latency_batch_size: int = 0  # resource = 'latency': batch of the timed forward (0 = one example)
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup_steps: int = 0
    structure_optimizer: str = "adam"  # 'adam' | 'sgd'
    structure_lr: float = 0.0  # 0 = auto: min(0.1, max(0.005, 2 / steps)) (Adam moves a ratio ~lr per step)
    label_smoothing: float = 0.0
    bn_recalibrate: int = 20  # batches to re-estimate BatchNorm statistics of the found network (0 = off)


# DMSConfig fields the app sets itself (not config keys), and where they come from
DMS_APP_FIELDS = {"target": "search.target / search.resource", "total_steps": "search.steps",
                  "latency_cache": "the run directory", "latency_timer": "a Python callable (library only)"}
# app defaults that differ from DMSConfig's: lost dimensions go to the summary instead of a warning
_DMS_APP_DEFAULTS = {"warn": False}


def _prototype(tp: Any) -> Any:
    """An empty value of a DMSConfig field's type: what the config coerces a value to (lists hold an element)."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType) and len(args) == 1:
        return _prototype(args[0])
    if tp in (bool, int, float, str):
        return tp()
    if origin is dict or tp is dict:
        return {}
    if origin in (list, tuple, collections.abc.Sequence):
        return [_prototype(args[0])] if args else [""]
    raise TypeError(f"DMSConfig field type {tp!r} has no config form: add the field to DMS_APP_FIELDS "
                    "(dmscale.app.config)")


def _dms_fields() -> tuple[list[tuple[str, Any, Any]], dict[str, Any], dict[str, bool]]:
    """The DMSConfig fields as ``[search]`` keys: (name, type, field) list, element prototypes of list keys,
    and which keys mean ``None`` (DMSConfig's default) when empty."""
    from dmscale.search import DMSConfig

    hints = typing.get_type_hints(DMSConfig)
    out, protos, none_if_empty = [], {}, {}
    for f in dataclasses.fields(DMSConfig):
        if f.name in DMS_APP_FIELDS:
            continue
        proto = _prototype(hints[f.name])
        default = _DMS_APP_DEFAULTS.get(f.name, f.default)
        none_if_empty[f.name] = default is None
        if default is None:
            default = type(proto)()
        elif isinstance(default, tuple):
            default = list(default)
        if isinstance(proto, list):
            protos[f"search.{f.name}"] = proto
        value = default
        fld = field(default_factory=lambda v=value: copy.deepcopy(v)) if isinstance(value, (list, dict)) else \
            field(default=value)
        out.append((f.name, type(proto), fld))
    return out, protos, none_if_empty


_DMS_FIELDS, _LIST_PROTOTYPES, _NONE_IF_EMPTY = _dms_fields()
DMS_KEYS = tuple(name for name, _, _ in _DMS_FIELDS)  # [search] keys that are DMSConfig fields


def _dms_config(self: Any, **app: Any) -> Any:
    """The ``dmscale.DMSConfig`` of these keys (an empty list/table for a field whose default is None means None),
    plus the app's own fields ``app`` (``target``, ``total_steps`` (default ``steps``), ``latency_cache``, ...)."""
    from dmscale.search import DMSConfig

    kw: dict[str, Any] = {}
    for name in DMS_KEYS:
        v = copy.deepcopy(getattr(self, name))
        kw[name] = None if _NONE_IF_EMPTY[name] and not v else v
    kw["total_steps"] = self.steps
    kw.update(app)
    return DMSConfig(**kw)


SearchConfig = dataclasses.make_dataclass(
    "SearchConfig", _DMS_FIELDS, bases=(_SearchKeys,), namespace={"dms_config": _dms_config})
SearchConfig.__module__ = __name__
SearchConfig.__doc__ = ("The DMS search: the pipeline's keys (length, budget, optimizers, BN recalibration) and every "
                        "``dmscale.DMSConfig`` field except those in ``DMS_APP_FIELDS``; ``dms_config()`` builds the "
                        "``DMSConfig``, which validates them.")


@dataclass
class BaselineConfig:
    """Which baselines ``dmscale baseline`` trains at the same FLOPs (each retrained with ``retrain``)."""

    methods: list[str] = field(default_factory=lambda: list(BASELINES))
    taylor_batches: int = 20


@dataclass
class TaskConfig:
    """The loss: by the data (classification cross-entropy, causal-LM next-token loss), or a user's function;
    optional distillation from the unpruned model."""

    loss: str = ""  # --loss pkg.module:function, fn(model, batch) -> loss or (loss, metrics); "" = by the data
    distill: float = 0.0  # --distill W: loss + W * KL(unpruned || pruned) (prune, fast, baseline)
    temperature: float = 1.0


@dataclass
class RunConfig:
    """A whole run: one section per phase."""

    run: RunSection = field(default_factory=RunSection)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
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
    if isinstance(default, dict):
        if isinstance(value, str):
            try:
                value = json.loads(value) if value.strip() else {}
            except json.JSONDecodeError as exc:
                raise ConfigError(f"{key}={value!r}: not a JSON object ({exc.msg}), e.g. '{{\"width\": 64}}'") from None
        if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
            raise ConfigError(f"{key}={value!r}: expected a table / JSON object with string keys")
        return dict(value)
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
            setattr(obj, k, _coerce(key, v, _LIST_PROTOTYPES.get(key, cur)))


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
            _check_value(key, v, _LIST_PROTOTYPES.get(key, d))


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
    elif isinstance(d, dict):
        _check(isinstance(v, dict) and all(isinstance(k, str) for k in v), key, v, "expected a table with string keys")
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
    data_kind = _check_data(d, check_paths)
    _check(d.size >= 0, "data.size", d.size, "must be >= 0 (0 = the most common image size)")
    _check(d.channels in (0, 1, 3), "data.channels", d.channels, "must be 0 (auto), 1 or 3")
    _check(d.seq_len >= 2, "data.seq_len", d.seq_len, "must be >= 2 tokens")
    _check(0 < d.heldout_fraction < 1, "data.heldout_fraction", d.heldout_fraction,
           "must be in (0, 1): the held-out text measures the perplexity")
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
        v = getattr(m, k)
        _check(v == 0 or 1.0 <= v <= MAX_SUPERNET_MULT, f"model.{k}", v,
               f"must be 0 (auto) or in [1, {MAX_SUPERNET_MULT:g}]")
    _check_user_model(cfg, data_kind, check_paths)
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
    _check(s.resource in RESOURCES, "search.resource", s.resource, f"choose one of {RESOURCES}")
    if s.resource == "latency":
        _check(s.target > 0, "search.target", s.target, "a latency target is seconds per forward: must be > 0")
        _check(s.latency_batch_size >= 0, "search.latency_batch_size", s.latency_batch_size,
               "must be >= 0 (0 = one example)")
        _check(r.pipeline != "baseline", "search.resource", s.resource, "the baselines prune to a flops or params "
               "fraction; run them with search.resource = flops or params")
        try:
            latency_target(s)
        except ValueError as exc:
            raise ConfigError(f"search.latency_device={s.latency_device!r}: {exc}") from None
    else:
        _check(0.0 < s.target <= 1.0, "search.target", s.target, "must be a fraction in (0, 1]")
        _check(not s.latency_device, "search.latency_device", s.latency_device, "applies to search.resource = latency")
        _check(not s.latency_batch_size, "search.latency_batch_size", s.latency_batch_size,
               "applies to search.resource = latency")
    _check(s.target_of in ("base", "supernet"), "search.target_of", s.target_of, "choose 'base' or 'supernet'")
    _check(s.lr > 0, "search.lr", s.lr, "must be > 0")
    _check(0 <= s.momentum < 1, "search.momentum", s.momentum, "must be in [0, 1)")
    _check(s.weight_decay >= 0, "search.weight_decay", s.weight_decay, "must be >= 0")
    _check(s.warmup_steps >= 0, "search.warmup_steps", s.warmup_steps, "must be >= 0")
    _check(s.structure_optimizer in ("adam", "sgd"), "search.structure_optimizer", s.structure_optimizer,
           "choose 'adam' or 'sgd'")
    _check(s.structure_lr >= 0, "search.structure_lr", s.structure_lr, "must be >= 0 (0 = auto)")
    _check(0 <= s.label_smoothing < 1, "search.label_smoothing", s.label_smoothing, "must be in [0, 1)")
    _check(s.bn_recalibrate >= 0, "search.bn_recalibrate", s.bn_recalibrate, "must be >= 0 (0 = off)")
    _check_dms_keys(s)
    _check(len(cfg.baseline.methods) >= 1 and all(x in BASELINES for x in cfg.baseline.methods),
           "baseline.methods", cfg.baseline.methods, f"choose from {BASELINES}")
    _check(cfg.baseline.taylor_batches >= 1, "baseline.taylor_batches", cfg.baseline.taylor_batches, "must be >= 1")
    _check_task(cfg)
    return cfg


def _check_dms_keys(s: Any) -> None:
    """The DMSConfig keys of ``[search]``, checked by ``DMSConfig`` itself; the error names the key."""
    try:
        s.dms_config()
    except (ValueError, TypeError) as exc:
        msg = str(exc)
        first = [k for k in DMS_KEYS if msg.startswith(k)]
        named = first or [k for k in DMS_KEYS if f" {k}=" in msg or f" {k} " in msg]
        key = max(named, key=len) if named else None
        if key is None:
            raise ConfigError(f"search: {msg}") from None
        raise ConfigError(f"search.{key}={getattr(s, key)!r}: {msg}") from None


def latency_target(s: Any) -> Any:
    """``Target(latency=search.target, device=search.latency_device, batch_size=search.latency_batch_size)``."""
    from dmscale.schedule import Target

    return Target(latency=s.target, device=s.latency_device or None, batch_size=s.latency_batch_size or None)


def _check_data(d: DataConfig, check_paths: bool) -> str | None:
    """``data.name`` is a built-in set or names data that exists; returns its kind (None when not checked)."""
    _check(bool(d.name.strip()), "data.name", d.name, f"needs a dataset: one of {DATASETS}, an image folder, an "
           ".npz file or a text file")
    if d.name in DATASETS:
        return "builtin"
    if not check_paths:
        return None
    from dmscale.app.datasets import data_kind

    try:
        return data_kind(d.name)[0]
    except (OSError, ValueError) as exc:
        raise ConfigError(f"data.name={d.name!r} (--data): {exc}") from None


def _check_user_model(cfg: RunConfig, data_kind: str | None, check_paths: bool) -> None:
    """``model.spec`` and what goes with it: kwargs, trust, the supernet enlargement of a user model."""
    m = cfg.model
    kind = None
    _check(data_kind != "text" or bool(m.spec), "data.name", cfg.data.name, "text needs a language model: give one "
           "with --model (model.spec); the built-in ResNet family classifies images")
    if m.spec:
        from dmscale.app.models import ModelSpecError, model_kind

        _check("\x00" not in m.spec, "model.spec", m.spec, "must not contain NUL characters")
        if check_paths or m.spec.startswith("hf:"):
            try:
                kind = model_kind(m.spec)
            except ModelSpecError as exc:
                raise ConfigError(f"model.spec: {exc}") from None
    if m.trust:
        from dmscale.serialization.allowlist import Allowlist

        try:
            Allowlist(m.trust)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"model.trust={m.trust!r} (--trust): {exc}") from None
    if m.kwargs:
        _check(bool(m.spec), "model.kwargs", m.kwargs, "applies to a --model (model.spec), not to the built-in family "
               "(use model.widths / model.depths)")
        _check(kind != "dmscale", "model.kwargs", m.kwargs, f"applies to 'module:factory' and 'hf:' models, not to "
               f"the saved directory model.spec={m.spec!r}")
    if m.supernet_kwargs:
        _check(kind == "factory" or (kind is None and bool(m.spec)), "model.supernet_kwargs", m.supernet_kwargs,
               "applies to a 'module:factory' model.spec (the factory builds the enlarged supernet)")
    if not m.spec:
        return
    w, dm = m.supernet_width_mult, m.supernet_depth_mult
    _check(w == 0 or float(w).is_integer(), "model.supernet_width_mult", w,
           "a user model is widened by dmscale.upscale, which takes an integer factor: 0/1 (no enlargement), 2, 3, ...")
    _check(dm in (0, 1), "model.supernet_depth_mult", dm, "dmscale cannot add blocks to a user model; leave it 0 and "
           "give a deeper supernet with model.supernet_kwargs (your factory's depth argument)")
    _check(not (m.supernet_kwargs and w > 1), "model.supernet_width_mult", w,
           "give either model.supernet_kwargs or an upscale factor, not both")
    _check(not m.pretrained or cfg.run.pipeline != "dms", "model.pretrained", m.pretrained,
           "search (DMS) starts from random init; use prune or fast to start from pretrained weights")


def _check_task(cfg: RunConfig) -> None:
    t = cfg.task
    if t.loss:
        from dmscale.app.models import _FACTORY

        _check(_FACTORY.match(t.loss) is not None, "task.loss", t.loss,
               "expected 'package.module:function' (--loss), a function fn(model, batch) -> loss")
    _check(t.distill >= 0, "task.distill", t.distill, "must be >= 0 (0 = off)")
    _check(t.temperature > 0, "task.temperature", t.temperature, "must be > 0")
    if t.distill > 0:
        _check(cfg.run.pipeline in ("dms_p", "dms_fast", "baseline"), "task.distill", t.distill,
               f"distillation needs a trained teacher (the unpruned model): prune, fast or baseline, not pipeline "
               f"{cfg.run.pipeline!r}")
        _check(not t.loss, "task.distill", t.distill, f"applies to the built-in losses; task.loss={t.loss!r} "
               "(--loss) computes its own loss (distil inside it)")


def supernet_mults(m: ModelConfig) -> tuple[float, float]:
    """The effective (width, depth) multipliers of the supernet: 0 (auto) is 1.5 for the built-in family and
    1 (no enlargement) for a user model."""
    auto = 1.0 if m.spec else 1.5
    return (m.supernet_width_mult or auto, m.supernet_depth_mult or auto)


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
