"""The ``dmscale`` command line: search / prune / fast / pretrain / baseline / demo / info / report / upscale.

The training commands run on the built-in ResNet family and image sets, or on the user's ``--model``
(``module:factory``, a ``dmscale.save`` directory, ``hf:``) and ``--data`` (image folder, ``.npz``, text),
with the loss by the data, ``--loss module:function`` and ``--distill`` (see :mod:`dmscale.app.workload`)."""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Sequence

import torch

from dmscale.app.config import SEED_MAX, ConfigError, RunConfig, apply_overrides, from_dict, read_file, validate

__all__ = ["main", "build_parser", "parse_target", "DEMO", "DEMO_QUICK"]

# the demo: DMS on the best offline image dataset, budget 0.5x the base model's FLOPs (~6 min on 2 cores)
DEMO: dict[str, Any] = {
    "run.out": "runs/demo", "run.checkpoint_every": 100, "run.eval_every": 500,
    "data.name": "auto", "data.limit_train": 15000, "data.limit_test": 5000, "data.batch_size": 128,
    "model.widths": [16, 32, 64], "model.depths": [2, 2, 2], "model.stem_stride": 2,
    "model.supernet_width_mult": 1.5, "model.supernet_depth_mult": 1.5,
    "search.steps": 200, "search.target": 0.5, "retrain.steps": 2000, "retrain.reset": False,
    "pretrain.steps": 2000,
}
# ~1 minute: smaller data, fewer steps
DEMO_QUICK: dict[str, Any] = {
    "run.out": "runs/demo-quick", "data.limit_train": 4000, "data.limit_test": 1000,
    "search.steps": 40, "retrain.steps": 300, "pretrain.steps": 300,
}

PIPELINE_OF = {"search": "dms", "prune": "dms_p", "fast": "dms_fast", "pretrain": "pretrain", "baseline": "baseline",
               "demo": "dms"}
RESUME_SAFE = {"run.progress", "run.threads"}
_CURRENT_RUN: list[str] = []  # run directory of the command in progress (for the Ctrl-C hint)


def _add_run_flags(p: argparse.ArgumentParser, pretrained: bool = False, user_model: bool = True) -> None:
    """Flags shared by the training subcommands (each one is a shortcut for a --set)."""
    p.add_argument("-c", "--config", help="TOML/YAML run config (see configs/ and docs/cli.md)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set search.target=0.4 (repeatable)")
    p.add_argument("--out", help="run directory (run.out)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run from its last checkpoint")
    p.add_argument("--seed", type=int, help="run.seed")
    p.add_argument("--data", help="data.name: a built-in set (auto, digits, mnist5k, fashion-mnist, cifar10), an "
                   "image folder (one subfolder per class), an .npz file, or a text file for a language model")
    p.add_argument("--data-root", help="data.root: directory holding the dataset files")
    p.add_argument("--limit-train", type=int, help="data.limit_train: subsample the training set")
    p.add_argument("--target", metavar="[KIND=]VALUE", help="search.target (and search.resource): a fraction (0, 1] "
                   "of the FLOPs (0.5), flops=0.5, params=0.5, or latency=SECONDS per forward (measured on this "
                   "machine, see search.latency_device / latency_batch_size)")
    p.add_argument("--bn-recalibrate", type=int, metavar="N", help="search.bn_recalibrate: re-estimate BatchNorm "
                   "statistics of the found (and one-shot pruned) network from N training batches before it is "
                   "evaluated and saved; 0 = off (default 20)")
    p.add_argument("--steps", type=int, help="search.steps")
    p.add_argument("--retrain-steps", type=int, help="retrain.steps")
    p.add_argument("--reset", action="store_true", help="retrain.reset: re-initialize the exported weights")
    p.add_argument("--threads", type=int, help="run.threads (torch.set_num_threads)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    if pretrained:
        p.add_argument("--pretrained", help="model.pretrained: a dmscale.save directory or a run directory")
    if user_model:
        p.add_argument("--model", help="model.spec: your model instead of the built-in ResNet family: "
                       "package.module:factory, a dmscale.save directory, or hf:NAME_OR_PATH")
        p.add_argument("--model-kwargs", metavar="JSON", help="model.kwargs: a JSON object for the factory (or for "
                       "from_pretrained with hf:), e.g. '{\"width\": 64}'")
        p.add_argument("--trust", action="append", default=[], metavar="PACKAGE",
                       help="model.trust: a package a saved model's classes may come from (repeatable)")
        p.add_argument("--loss", metavar="MODULE:FUNCTION", help="task.loss: fn(model, batch) -> loss or (loss, "
                       "metrics) instead of the loss by the data (cross-entropy, next-token loss)")
        p.add_argument("--distill", type=float, metavar="W", help="task.distill: add W * KL(unpruned || pruned) "
                       "(prune, fast, baseline)")
    p.add_argument("--allow-over-budget", action="store_true",
                   help="keep a search that ends over budget (by default the run fails with exit code 1)")


_TARGET_KINDS = ("flops", "params", "latency")


def parse_target(text: str) -> dict[str, Any]:
    """``--target``: ``0.5`` (search.target), or ``KIND=VALUE`` with KIND flops, params or latency (seconds), which
    also sets search.resource."""
    kind, sep, value = text.partition("=")
    if not sep:
        kind, value = "", text
    kind = kind.strip().lower()
    if sep and kind not in _TARGET_KINDS:
        raise ConfigError(f"--target {text!r}: unknown resource {kind!r}; use flops=F, params=F (fractions) or "
                          "latency=SECONDS")
    try:
        v = float(value)
    except ValueError:
        raise ConfigError(f"--target {text!r}: {value.strip()!r} is not a number; e.g. --target 0.5, "
                          "--target params=0.5 or --target latency=0.002") from None
    return {"search.target": v, **({"search.resource": kind} if kind else {})}


def _flag_overrides(a: argparse.Namespace) -> dict[str, Any]:
    """The shortcut flags as config overrides."""
    m = {"out": "run.out", "seed": "run.seed", "data": "data.name", "data_root": "data.root",
         "limit_train": "data.limit_train", "steps": "search.steps", "bn_recalibrate": "search.bn_recalibrate",
         "retrain_steps": "retrain.steps", "threads": "run.threads", "pretrained": "model.pretrained",
         "model": "model.spec", "loss": "task.loss", "distill": "task.distill"}
    out = {key: getattr(a, attr) for attr, key in m.items() if getattr(a, attr, None) is not None}
    if getattr(a, "target", None) is not None:
        out.update(parse_target(a.target))
    if getattr(a, "model_kwargs", None) is not None:
        from dmscale.app.models import ModelSpecError, parse_model_kwargs

        try:
            out["model.kwargs"] = parse_model_kwargs(a.model_kwargs)
        except ModelSpecError as exc:
            raise ConfigError(str(exc)) from None
    if getattr(a, "trust", None):
        out["model.trust"] = list(a.trust)
    if getattr(a, "reset", False):
        out["retrain.reset"] = True
    if getattr(a, "quiet", False):
        out["run.progress"] = False
    return out


def _overrides(a: argparse.Namespace) -> list[str] | dict[str, Any]:
    ov: dict[str, Any] = {}
    for item in a.overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key=value, e.g. --set search.target=0.4")
        k, v = item.split("=", 1)
        ov[k.strip()] = v
    ov.update(_flag_overrides(a))
    return ov


def _resume_config(a: argparse.Namespace, pipeline: str) -> RunConfig:
    """The saved config of ``--resume RUN_DIR`` (only progress/threads may change)."""
    from dmscale.app.pipelines import load_run_config

    cfg = load_run_config(a.resume)
    if cfg.run.pipeline != pipeline:
        raise ConfigError(f"--resume {a.resume}: that run is pipeline {cfg.run.pipeline!r}, not {pipeline!r}; "
                          f"resume it with the matching subcommand")
    ov = _overrides(a)
    ov.pop("run.out", None)
    bad = sorted(set(ov) - RESUME_SAFE)
    if a.config or bad:
        raise ConfigError(f"--resume continues the saved config of {a.resume}; these cannot change: "
                          f"{bad or ['--config']}")
    apply_overrides(cfg, ov)
    validate(cfg)
    _CURRENT_RUN[:] = [cfg.run.out]
    return cfg


def _config(a: argparse.Namespace, pipeline: str, base: dict[str, Any] | None = None) -> RunConfig:
    """Config from defaults (+ ``base`` preset) + file + overrides, validated."""
    if getattr(a, "resume", None):
        return _resume_config(a, pipeline)
    data = read_file(a.config) if getattr(a, "config", None) else {}
    cfg = from_dict(data, pipeline)
    if base:
        # the preset only fills keys the file does not set
        from dmscale.app.config import flatten

        given = set(flatten(data))
        apply_overrides(cfg, {k: v for k, v in base.items() if k not in given})
    apply_overrides(cfg, _overrides(a))
    cfg.run.pipeline = pipeline
    validate(cfg)
    _CURRENT_RUN[:] = [cfg.run.out]
    return cfg


def _print_result(summary: dict[str, Any], started: float) -> None:
    from dmscale.app.report import render

    print()
    print(render(summary))
    print()
    print(f"run directory: {summary['run_dir']} (report.md, summary.json, log.jsonl, plots, model/); "
          f"wall time {time.time() - started:.0f} s")


def _model_note(cfg: RunConfig) -> str:
    """What a pipeline makes of the user's --model (printed before it runs)."""
    from dmscale.app.workload import describe_enlargement

    m = cfg.model
    if cfg.run.pipeline == "dms":
        return (f"model {m.spec}: DMS searches from random init; supernet: {describe_enlargement(cfg)}. "
                "To start from the model's weights use dmscale prune or fast")
    if cfg.run.pipeline == "pretrain":
        return f"model {m.spec}: trained from its weights as built/loaded with [pretrain]"
    src = f"the weights of --pretrained {m.pretrained}" if m.pretrained else "its weights as built/loaded"
    return f"model {m.spec}: starts from {src}"


def cmd_pipeline(a: argparse.Namespace) -> int:
    """search / prune / fast / pretrain / baseline: one pipeline from a config."""
    from dmscale.app import pipelines

    pipeline = PIPELINE_OF[a.command]
    if a.command == "baseline" and a.resume:
        a.out, a.resume = a.resume, None  # baselines continue in place: finished methods are skipped
    if a.command == "baseline" and not a.config and a.out and (Path(a.out) / "config.yaml").exists():
        # compare against an existing run: reuse its config (data, target, retrain budget)
        cfg = pipelines.load_run_config(a.out)
        apply_overrides(cfg, _overrides(a))
        if a.methods:
            cfg.baseline.methods = [m.strip() for m in a.methods.split(",") if m.strip()]
        validate(cfg)
        _CURRENT_RUN[:] = [cfg.run.out]
        t0 = time.time()
        _print_result(pipelines.run_baselines(cfg, resume=False), t0)
        return 0
    cfg = _config(a, pipeline)
    if a.command == "baseline" and a.methods:
        cfg.baseline.methods = [m.strip() for m in a.methods.split(",") if m.strip()]
        validate(cfg)
    t0 = time.time()
    print(f"dmscale {a.command}: pipeline {pipeline}, run directory {cfg.run.out}", flush=True)
    if cfg.model.spec and not a.resume:
        print(_model_note(cfg), flush=True)
    summary = pipelines.run(cfg, resume=bool(a.resume), allow_over_budget=a.allow_over_budget)
    _print_result(summary, t0)
    return 0


def cmd_demo(a: argparse.Namespace) -> int:
    """The default DMS pipeline end to end on the best offline dataset; prints the table."""
    from dmscale.app import pipelines
    from dmscale.app.datasets import availability_report

    preset = dict(DEMO)
    if a.quick:
        preset.update(DEMO_QUICK)
    cfg = _config(a, "dms", preset)
    if not a.resume and Path(cfg.run.out).exists() and (Path(cfg.run.out) / "config.yaml").exists():
        if a.fresh:
            pipelines.clean_run_dir(cfg.run.out)
        else:
            raise ConfigError(f"run.out={cfg.run.out!r} already holds a run; pass --fresh to replace it, "
                              f"--resume {cfg.run.out} to continue it, or --out DIR")
    print("dmscale demo: DMS (enlarged supernet -> search -> export -> retrain)")
    print(availability_report(cfg.data.root or None), flush=True)
    t0 = time.time()
    summary = pipelines.run(cfg, resume=bool(a.resume), allow_over_budget=a.allow_over_budget)
    print(f"\nusing dataset {summary['dataset'].get('name')}: {summary['dataset'].get('selection')}")
    if a.baselines:
        summary = pipelines.run_baselines(cfg, resume=True)
    _print_result(summary, t0)
    return 0


def cmd_report(a: argparse.Namespace) -> int:
    """Rebuild summary.json, report.md and plots of a run directory and print the tables."""
    from dmscale.app.pipelines import summarize
    from dmscale.app.report import render, write_report
    from dmscale.app.runs import is_run_dir, lock_run_dir

    if not is_run_dir(a.run_dir):
        raise FileNotFoundError(f"{a.run_dir!r} is not a run directory (no .dmscale run marker, no config.yaml and "
                                "state.json)")
    with lock_run_dir(a.run_dir):  # it rewrites summary.json / report.md: not while a command runs there
        s = summarize(a.run_dir)
        write_report(a.run_dir, s)
    print(render(s))
    return 0


_MAX_INPUT_ELEMENTS = 1 << 26


def _input_dims(dims: Any, what: str) -> list[int]:
    """Positive integer dimensions of one input (C,H,W), bounded so a typo cannot allocate gigabytes."""
    if not (isinstance(dims, list) and dims and all(type(v) is int and v >= 1 for v in dims)):
        raise ConfigError(f"{what}: expected positive integers such as 3,32,32")
    if math.prod(dims) > _MAX_INPUT_ELEMENTS:
        raise ConfigError(f"{what}: {math.prod(dims):,} elements per input is more than {_MAX_INPUT_ELEMENTS:,}")
    return dims


def _example_input(model_dir: Path, shape: str | None) -> torch.Tensor | None:
    from dmscale.serialization.format import read_structure

    meta = read_structure(model_dir).get("meta") or {}
    if shape:
        try:
            dims = [int(v) for v in shape.split(",")]
        except ValueError:
            raise ConfigError(f"--input-shape {shape!r}: expected C,H,W integers, e.g. 3,32,32") from None
        return torch.randn(1, *_input_dims(dims, f"--input-shape {shape!r}"))
    if meta.get("input_shape"):
        return torch.randn(1, *_input_dims(meta["input_shape"], f"{model_dir}/structure.json meta.input_shape"))
    return None


def _trust(a: argparse.Namespace) -> list[str]:
    """The ``--trust`` packages, checked (a package that would allow arbitrary code is refused)."""
    from dmscale.serialization.allowlist import Allowlist

    try:
        Allowlist(a.trust)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"--trust: {exc}") from None
    return list(a.trust)


def _check_accepts(model: torch.nn.Module, x: torch.Tensor, shape: str | None, model_dir: Path) -> None:
    """Run the model once on ``x``; an input it cannot take is a ConfigError naming the flag and the shape."""
    was = model.training
    try:
        with torch.no_grad():
            model.eval()(x)
    except Exception as exc:
        src = f"--input-shape {shape!r}" if shape else f"the input shape saved with {str(model_dir)!r}"
        msg = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"{src}: the model does not accept an input of shape {tuple(x.shape)}: {msg}") from None
    finally:
        model.train(was)


def cmd_info(a: argparse.Namespace) -> int:
    """Groups found, FLOPs/params and structure of a saved model or a run directory."""
    from dmscale.serialization.format import load, read_structure
    from dmscale.app.pipelines import resolve_model_dir
    from dmscale.app.report import format_table, render
    from dmscale.resources import count
    from dmscale.search import DMS
    from dmscale.schedule import Target
    from dmscale.app.zoo import describe

    path = Path(a.path)
    if (path / "summary.json").is_file():
        print(render(json.loads((path / "summary.json").read_text("utf-8"))))
        print()
    model_dir = resolve_model_dir(path)
    model = load(model_dir, trust=_trust(a))
    meta = read_structure(model_dir).get("meta") or {}
    x = _example_input(model_dir, a.input_shape)
    if x is not None:
        _check_accepts(model, x, a.input_shape, model_dir)
    print(f"model: {model_dir} ({type(model).__name__}; {meta.get('kind', '')} {meta.get('dataset', '')})")
    nparams = sum(p.numel() for p in model.parameters())
    if x is None:
        print(f"params {nparams:,}; FLOPs and groups need an input: pass --input-shape C,H,W")
    else:
        c = count(model, (x,))
        print(f"FLOPs {c['flops']:,.0f} per input {tuple(x.shape[1:])} (2 per multiply-add); params {c['params']:,.0f}")
        dms = DMS(model, (x,), Target(flops=1.0), total_steps=1, warn=False)
        rows = [["group", "kind", "size", "members"]]
        for g in dms.groups:
            rows.append([g.name, g.kind, str(g.size), str(len(g.members))])
        print(f"\nsearchable groups ({len(dms.groups)}):")
        print(format_table(rows))
        dms.remove()
    d = describe(model)
    if d["stages"]:
        print("\nstructure: stem " + str(d["stem"]) + "; " + "; ".join(
            f"stage {i}: {s['blocks']} blocks, inner {s['inner']}, out {s['out'][0] if s['out'] else '-'}"
            for i, s in enumerate(d["stages"])))
    else:
        print("\nstructure:")
        for name, m in model.named_modules():
            if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
                print(f"  {name}: {m}")
    return 0


def cmd_upscale(a: argparse.Namespace) -> int:
    """Widen a saved model, a run's exported model or a Hugging Face model directory x width and save it."""
    from dmscale.serialization.format import load, read_structure, save
    from dmscale.app.pipelines import resolve_model_dir
    from dmscale.app.runs import check_output_path
    from dmscale.mup.upscale import upscale

    if not math.isfinite(a.width) or a.width != int(a.width) or not 1 <= a.width <= 64:
        raise ConfigError(f"--width {a.width}: must be a positive integer factor (at most 64)")
    if not math.isfinite(a.noise) or a.noise < 0:
        raise ConfigError(f"--noise {a.noise}: must be a finite number >= 0")
    if not 0 <= a.seed <= SEED_MAX:
        raise ConfigError(f"--seed {a.seed}: must be in [0, {SEED_MAX}]")
    check_output_path(a.out)
    kw = dict(width=int(a.width), noise=a.noise_form, sigma=a.noise, seed=a.seed, attention=a.attention)
    hf_dir = Path(a.model).expanduser()
    if (hf_dir / "config.json").is_file() and not (hf_dir / "structure.json").is_file():
        out = Path(a.out)
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            raise ConfigError(f"--out {str(out)!r} exists and is not empty; choose a new directory")
        model = _load_hf_dir(hf_dir)
        big = upscale(model, **kw)
        big.save_pretrained(out)
    else:
        src = resolve_model_dir(a.model)
        model = load(src, trust=_trust(a))
        meta = dict(read_structure(src).get("meta") or {})
        x = _example_input(src, a.input_shape)
        if x is not None:
            _check_accepts(model, x, a.input_shape, src)
        big = upscale(model, example_inputs=x, **kw)
        meta.update({"kind": "upscaled", "upscaled_from": str(src), "width": int(a.width), "noise": a.noise,
                     "noise_form": a.noise_form, "attention": a.attention})
        save(big, a.out, meta=meta)
    n0 = sum(p.numel() for p in model.parameters())
    n1 = sum(p.numel() for p in big.parameters())
    print(f"upscaled x{int(a.width)} (noise {a.noise_form} {a.noise}): {n0:,} -> {n1:,} parameters, saved to {a.out}")
    return 0


def _load_hf_dir(path: Path) -> torch.nn.Module:
    """A Hugging Face model directory (config.json + weights) as its config's architecture; no remote code."""
    import transformers

    cfg = transformers.AutoConfig.from_pretrained(path, local_files_only=True)
    arch = (getattr(cfg, "architectures", None) or [None])[0]
    cls = getattr(transformers, arch, None) if isinstance(arch, str) else None
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        raise ConfigError(f"{str(path)!r}: config.json names architecture {arch!r}, not a transformers model class")
    return cls.from_pretrained(path, local_files_only=True)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with all subcommands."""
    ap = argparse.ArgumentParser(prog="dmscale", description="Differentiable Model Scaling: search, prune, "
                                 "baselines, reports. See docs/cli.md.")
    ap.add_argument("--debug", action="store_true",
                    help="print the full traceback of an error (accepted anywhere on the command line)")
    sub = ap.add_subparsers(dest="command", required=True)
    helps = {
        "search": "DMS (default): random-init enlarged supernet -> search weights+structure -> export -> retrain",
        "prune": "DMS_p: pretrained model -> search weights+structure -> export -> retrain/fine-tune",
        "fast": "DMS_fast: pretrained model, frozen weights (BN train mode), structure only -> export",
        "pretrain": "train the base architecture (a pretrained model for prune/fast/baseline)",
        "baseline": "uniform width, one-shot L1 and Taylor pruning to the same budget, each retrained",
    }
    for name, h in helps.items():
        p = sub.add_parser(name, help=h, description=h)
        _add_run_flags(p, pretrained=name in ("prune", "fast", "baseline"))
        if name == "baseline":
            p.add_argument("--methods", help="comma list of uniform,l1,taylor (baseline.methods)")
        p.set_defaults(func=cmd_pipeline)
    p = sub.add_parser("demo", help="DMS end to end on the best offline dataset (a few minutes; --quick about 1)")
    _add_run_flags(p, user_model=False)
    p.add_argument("--quick", action="store_true", help="about one minute: less data, fewer steps")
    p.add_argument("--baselines", action="store_true", help="also train the baselines and compare")
    p.add_argument("--fresh", action="store_true", help="replace an earlier demo run in the same run directory")
    p.set_defaults(func=cmd_demo)
    p = sub.add_parser("info", help="groups, FLOPs/params and structure of a saved model or run directory")
    p.add_argument("path", help="a dmscale.save directory or a run directory")
    p.add_argument("--input-shape", help="C,H,W of one input when the model has no saved input shape")
    p.add_argument("--trust", action="append", default=[], metavar="PACKAGE",
                   help="also load model classes from this package (dmscale.load(..., trust=[...])); repeatable")
    p.set_defaults(func=cmd_info)
    p = sub.add_parser("report", help="rebuild report.md, summary.json and the plots of a run directory")
    p.add_argument("run_dir")
    p.set_defaults(func=cmd_report)
    p = sub.add_parser("upscale", help="widen a saved model x width (function-preserving) and save it")
    p.add_argument("model", help="a dmscale.save directory, a run directory (its model/) or a Hugging Face "
                   "model directory (config.json; saved with save_pretrained)")
    p.add_argument("--width", type=float, default=2, help="integer width factor (default 2)")
    p.add_argument("--noise", type=float, default=1e-3, help="symmetry-breaking noise scale sigma (default 1e-3)")
    p.add_argument("--noise-form", default="auto", choices=["auto", "mlp", "relative", "init"],
                   help="noise form (default auto: init for transformers, relative for BatchNorm convnets, else mlp)")
    p.add_argument("--attention", default="duplicate_heads", choices=["duplicate_heads", "grow_head_dim"],
                   help="widen attention by duplicating heads (default) or growing the head dim (muP 1/d scale)")
    p.add_argument("--seed", type=int, default=0, help="noise seed")
    p.add_argument("--input-shape", help="C,H,W of one input when the model has no saved input shape")
    p.add_argument("--out", required=True, help="output directory (dmscale.save, or save_pretrained for a HF model)")
    p.add_argument("--trust", action="append", default=[], metavar="PACKAGE",
                   help="also load model classes from this package (dmscale.load(..., trust=[...])); repeatable")
    p.set_defaults(func=cmd_upscale)
    # listed for --help; main() hands their arguments to dmscale.eval
    sub.add_parser("eval-ppl", help="perplexity of a language model on a text file (sliding window)", add_help=False)
    sub.add_parser("eval-mc", help="zero-shot multiple-choice accuracy of a language model on a JSONL file",
                   add_help=False)
    sub.add_parser("prune-llm", help="prune a causal LM to a budget on a calibration text (see docs/llm.md)",
                   add_help=False)
    return ap


_PASSTHROUGH = {
    "eval-ppl": ("dmscale.eval.perplexity", "eval_ppl_main"),
    "eval-mc": ("dmscale.eval.multiple_choice", "eval_mc_main"),
    "prune-llm": ("dmscale.app.prune_llm", "prune_llm_main"),
}


def _error_exit(exc: BaseException) -> tuple[int, str]:
    """(exit code, message) of an error: 2 for bad input (config, files, paths, locks), 1 for a failed run."""
    from dmscale.recipes.loop import TrainingError
    from dmscale.recipes.pipelines import OverBudgetError
    from dmscale.serialization.checkpoint import CheckpointError
    from dmscale.app.models import ModelSpecError
    from dmscale.serialization.errors import DirLockedError, ForeignDirectoryError, LoadError

    msg = str(exc).strip() or type(exc).__name__
    if isinstance(exc, (ConfigError, LoadError, CheckpointError, ForeignDirectoryError, DirLockedError,
                        ModelSpecError)):
        return 2, msg
    if isinstance(exc, (TrainingError, OverBudgetError)):  # the run failed: non-finite training, over budget
        return 1, msg
    if isinstance(exc, (FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError, PermissionError)):
        return 2, msg
    return 1, f"{type(exc).__name__}: {msg}"


def _run(args: list[str], state: dict[str, Any]) -> int:
    if args and args[0] in _PASSTHROUGH:  # language-model evaluation has its own argument parser
        import importlib

        mod, fn = _PASSTHROUGH[args[0]]
        state["command"] = args[0]
        return int(getattr(importlib.import_module(mod), fn)(args[1:]) or 0)
    a = build_parser().parse_args(args)
    state["args"] = a
    state["command"] = a.command
    return int(a.func(a) or 0)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``dmscale`` script.

    Errors end as one line ``dmscale: error: <what, which file/key/value>`` with exit code 2 for bad
    input (config, files, paths, a locked run directory), 1 for a run that failed, 130 on Ctrl-C;
    ``--debug`` (anywhere on the command line) also prints the traceback.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args
    args = [x for x in args if x != "--debug"]
    state: dict[str, Any] = {}
    try:
        return _run(args, state)
    except KeyboardInterrupt:
        a = state.get("args")
        command = state.get("command")
        if a is None or command not in PIPELINE_OF:
            print("\ndmscale: interrupted", file=sys.stderr)
            return 130
        out = (_CURRENT_RUN or [getattr(a, "resume", None) or "RUN_DIR"])[0]
        how = f"--out {out}" if command == "baseline" else f"--resume {out}"
        print(f"\ndmscale: interrupted; continue from the last checkpoint with: dmscale {command} {how}",
              file=sys.stderr)
        return 130
    except Exception as exc:
        code, msg = _error_exit(exc)
        if debug:
            traceback.print_exc()
        print(f"dmscale: error: {msg}", file=sys.stderr)
        if code == 1 and not debug:
            print("dmscale: run again with --debug for the full traceback", file=sys.stderr)
        return code


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
