"""The image pipelines (DMS, DMS_p, DMS_fast), pretraining and the baselines, phase by phase in a run directory.

Each phase is a recipe (``dmscale.recipes``: one training loop, ``Search``, one-shot pruning) whose
hooks write the run's log and checkpoints (``dmscale.app.runs``), so that every phase resumes
exactly and a finished phase is skipped. The run directory is locked for the whole pipeline.
"""

from __future__ import annotations

import contextlib
import copy
import json
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.nn as nn

from dmscale.app import zoo
from dmscale.app.config import ConfigError, RunConfig, TrainConfig, latency_target
from dmscale.app.runs import (PHASE_SALT, Batches, Run, clean_run_dir, evaluate, load_run_config, open_run, read_state,
                              resolve_model_dir)
from dmscale.recipes.baselines import one_shot_prune, uniform_width
from dmscale.recipes.bn import recalibrate_bn
from dmscale.recipes.oneshot import oneshot_prune
from dmscale.recipes.loop import (NonFiniteError, cosine_lr, load_loop_state, loop_state, make_optimizer, seed_all,
                                  train_loop)
from dmscale.recipes.pipelines import OverBudgetError, Search
from dmscale.recipes.pipelines import finish as finish_search
from dmscale.schedule import Target
from dmscale.search import DMS
from dmscale.serialization.format import atomic_write_text, save

__all__ = ["Run", "run", "run_dms", "run_dms_p", "run_dms_fast", "run_baselines", "run_pretrain", "evaluate",
           "open_run", "load_run_config", "Batches", "one_shot_prune", "uniform_width_model", "uniform_ratio_model", "resolve_model_dir",
           "PHASE_SALT", "train_phase", "search_phase", "recalibrate_bn", "pretrained_model", "summarize", "finish",
           "clean_run_dir"]

Callback = Callable[[str, int], None]
_LOOP_KEYS = frozenset({"step", "loss", "lr", "seconds", "resource", "target", "resource_loss"})


# ----------------------------------------------------------------------------------------- phase logging
def _forward_kept(dms: DMS) -> dict[str, int]:
    """Kept width of every group in this step's forward (the masker's hard keep; falls back to ``dms.kept()``)."""
    cur = getattr(dms.masker, "current_keep", None)
    if cur and all(g.key in cur for g in dms.groups):
        return {g.name: int(cur[g.key].sum()) for g in dms.groups}
    return {k: v[1] for k, v in dms.kept().items()}


class _PhaseHooks:
    """The loop hooks of one phase: a log.jsonl record per step, periodic evaluation, checkpoints, the
    progress postfix, the user callback."""

    def __init__(self, run: Run, phase: str, total: int, evaluate: Callable[[], float],
                 save: Callable[[int], None], dms: DMS | None = None) -> None:
        self.run, self.phase, self.total, self.evaluate, self.dms = run, phase, total, evaluate, dms
        self.acc_ema: float | None = None
        self.eval_acc: float | None = None
        r = run.cfg.run
        self.kw = {"on_step": self.on_step, "checkpoint": save, "checkpoint_every": r.checkpoint_every,
                   "after_step": lambda rec: run.step_done(phase, rec["step"]), "progress": r.progress,
                   "desc": phase, "postfix": self.postfix}

    def on_step(self, rec: dict[str, Any]) -> None:
        n = rec["step"]
        metrics = {k: v for k, v in rec.items() if k not in _LOOP_KEYS}  # train_acc, ce, kl, a --loss's own
        if self.dms is None:
            out = {"phase": self.phase, "step": n, "loss": rec["loss"], "lr": rec["lr"], **metrics}
        else:
            out = {"phase": self.phase, "step": n, "task_loss": rec["loss"], "resource": rec["resource"],
                   "target": rec["target"], "resource_loss": rec["resource_loss"], "lr": rec["lr"], **metrics,
                   "kept": _forward_kept(self.dms)}
        self.run.log(out)
        acc = rec.get("train_acc")
        if acc is not None:
            self.acc_ema = acc if self.acc_ema is None else 0.9 * self.acc_ema + 0.1 * acc
        every = self.run.cfg.run.eval_every
        if every and n % every == 0 and n < self.total:
            self.eval_acc = self.evaluate()
            self.run.log({"phase": self.phase, "step": n, f"eval_{self.run.metric}": self.eval_acc})

    def postfix(self, rec: dict[str, Any]) -> dict[str, str]:
        post = {"loss": f"{rec['loss']:.3f}"}
        if self.dms is not None:
            post["res"] = f"{rec['resource']:.3f}/{rec['target']:.3f}"
        if self.acc_ema is not None:
            post["acc"] = f"{self.acc_ema:.3f}"
        if self.eval_acc is not None:
            post["test"] = f"{self.eval_acc:.3f}"
        return post


@contextlib.contextmanager
def _config_keys(**keys: Any) -> Iterator[None]:
    """Add the config keys behind a non-finite training step (``retrain.lr=1e+30``) to its error."""
    try:
        yield
    except NonFiniteError as exc:
        raise NonFiniteError(f"{exc}; config: " + ", ".join(f"{k}={v}" for k, v in keys.items())) from exc


def _resume_or_start(run: Run, phase: str, total: int, batches: Batches,
                     restore: Callable[[dict[str, Any], str], None]) -> int:
    """Restore a phase's checkpoint (checked against the run) and return its step, else seed the phase; the log
    keeps exactly the records of the steps done."""
    ck = run.load_ckpt(phase, total, batches)
    if ck is not None:
        restore(ck, f"checkpoint {run.ckpt_path(phase)}")
        start = int(ck["step"])
        run.truncate_log(phase, start)
        return start
    seed_all(run.cfg.run.seed * 10 + PHASE_SALT.get(phase, 9))
    run.reset_phase_log(phase)
    return 0


# ----------------------------------------------------------------------------------------- training
def train_phase(run: Run, phase: str, model: nn.Module, tc: TrainConfig,
                teacher: nn.Module | None = None) -> dict[str, Any]:
    """Train a model with SGD + cosine LR for ``tc.steps`` (resumable; ``teacher``: distil from it with
    ``task.distill``); returns the test metric and timings."""
    done = run.done(phase)
    if done is not None:
        return done
    opt = make_optimizer([p for p in model.parameters() if p.requires_grad], "sgd", tc.lr, tc.momentum,
                         tc.weight_decay)
    batches = run.batches(phase)
    start = _resume_or_start(run, phase, tc.steps, batches, lambda ck, where: load_loop_state(ck, model, [opt],
                                                                                             where=where))
    t0 = time.time()
    model.train()
    hooks = _PhaseHooks(run, phase, tc.steps, lambda: run.eval(model),
                        lambda n: run.save_ckpt(phase, n, tc.steps, loop_state(model, [opt]), batches))
    key = "pretrain" if phase == "pretrain" else "retrain"
    with _config_keys(**{f"{key}.lr": tc.lr}):
        train_loop(model, batches, run.task(tc.label_smoothing, teacher), tc.steps, start=start,
                   weight_optimizer=opt, lr=cosine_lr(tc.lr, tc.steps, tc.warmup_steps), **hooks.kw)
    value = run.eval(model)
    run.log({"phase": phase, "step": tc.steps, f"eval_{run.metric}": value})
    return {run.metric: value, "steps": tc.steps, "seconds": round(time.time() - t0, 1)}


def _finish_model_phase(run: Run, phase: str, model: nn.Module, subdir: str, info: dict[str, Any]) -> dict[str, Any]:
    """Save the model of a finished phase and record its results."""
    model.eval()
    save(model, run.dir / subdir, meta=run.meta(phase))
    info = dict(info)
    info.update(run.measure(model))
    info["describe"] = zoo.describe(model)
    info["dir"] = subdir
    run.mark_done(phase, info)
    return info


def pretrained_model(run: Run) -> tuple[nn.Module, dict[str, Any]]:
    """The pretrained model: ``model.pretrained`` if given; else the user's ``--model`` as given (its weights as they
    are; ``dmscale pretrain`` trains it); else the built-in base model trained in this run (``pretrain``)."""
    m = run.cfg.model
    if m.pretrained or (m.spec and run.cfg.run.pipeline != "pretrain"):
        if m.pretrained:
            try:
                d = resolve_model_dir(m.pretrained)
            except FileNotFoundError as exc:
                raise ConfigError(f"model.pretrained={m.pretrained!r}: {exc}") from exc
            model = run.check_model(run.load(d), f"model.pretrained={m.pretrained!r}")
            source = str(d)
        else:
            model, source = run.base_model(), m.spec
        info = run.done("pretrain")
        if info is None:
            info = {run.metric: run.eval(model), "source": source, "steps": 0}
            info.update(run.measure(model))
            info["describe"] = zoo.describe(model)
            run.mark_done("pretrain", info)
        return model, info
    info = run.done("pretrain")
    if info is not None:
        return run.load(run.dir / info["dir"]), info
    model = run.base_model()
    res = train_phase(run, "pretrain", model, run.cfg.pretrain)
    _finish_model_phase(run, "pretrain", model, "pretrained", res)
    return run.load(run.dir / "pretrained"), run.done("pretrain")


def _teacher(run: Run, model: nn.Module | None = None) -> nn.Module | None:
    """With ``task.distill``: a frozen copy of the unpruned (pretrained) model, in eval mode; else None."""
    if run.cfg.task.distill <= 0:
        return None
    teacher = copy.deepcopy(model) if model is not None else pretrained_model(run)[0]
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher.eval()


# ----------------------------------------------------------------------------------------- search
def _target_fraction(run: Run, ref: dict[str, float], sup: dict[str, float]) -> float:
    """A flops/params target as a fraction of the supernet (what ``Target`` takes)."""
    s = run.cfg.search
    if s.target_of == "supernet":
        return s.target
    frac = s.target * ref[s.resource] / sup[s.resource]
    if frac > 1.0 + 1e-9:
        raise ConfigError(f"search.target={s.target} of the base model's {s.resource} is larger than the "
                          f"supernet itself ({frac:.3f} of it); lower search.target or enlarge the supernet")
    return min(frac, 1.0)


def _model_fingerprint(model: nn.Module) -> str:
    """Class, parameter and buffer names, shapes and dtypes of a model (what a latency table was measured on)."""
    import hashlib

    parts = [type(model).__qualname__] + [f"{n}:{tuple(t.shape)}:{t.dtype}" for n, t in
                                            list(model.named_parameters()) + list(model.named_buffers())]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:24]


def _latency_cache(run: Run, model: nn.Module, target: Target) -> str:
    """The run directory as the latency table's cache (``dmscale-latency.json``), after checking that a table
    already there was measured for this model on this device (else a ``ConfigError`` naming both)."""
    import platform

    from dmscale.latency import CACHE_FILE

    p0 = next(iter(model.parameters()), None)
    device = torch.device(target.device) if target.device else (p0.device if p0 is not None else torch.device("cpu"))
    host = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"{platform.machine()}-{platform.processor() or 'cpu'}"
    ident = {"device": str(device), "host": host, "threads": torch.get_num_threads(), "torch": torch.__version__,
             "batch_size": target.batch_size or int(run.example[0].shape[0]), "model": _model_fingerprint(model)}
    path = run.dir / CACHE_FILE
    old = run.state.get("latency_cache")
    if path.exists() and isinstance(old, dict):
        diff = {k: (old.get(k), v) for k, v in ident.items() if old.get(k) != v}
        if diff:
            what = "; ".join(f"{k}: measured {a!r}, now {b!r}" for k, (a, b) in diff.items())
            hint = " (keep run.threads / --threads as when it was measured)" if "threads" in diff else ""
            raise ConfigError(f"latency cache {path} was measured for another device or model ({what}){hint}; "
                              "a latency target is only valid where it was measured: resume on that machine, or "
                              "start a new run")
    run.state["latency_cache"] = {**ident, "file": CACHE_FILE}
    run.write_state()
    return str(run.dir)


def _search_target(run: Run, model: nn.Module, ref: dict[str, float], sup: dict[str, float]) -> tuple[Target, dict]:
    """The search's ``Target`` and the app's ``DMSConfig`` fields (``latency_cache``: the run directory)."""
    s = run.cfg.search
    if s.resource == "latency":
        target = latency_target(s)
        return target, {"latency_cache": _latency_cache(run, model, target)}
    return Target(**{s.resource: _target_fraction(run, ref, sup)}), {}


_ONESHOT_KEYS = ("exclude", "bounds", "divisor", "min_ratio", "prune_width", "prune_heads", "prune_head_dim",
                 "fold_masks")


def _oneshot_kwargs(run: Run, model: nn.Module) -> dict[str, Any]:
    """``DMS`` options of a one-shot baseline: the search space keys of ``[search]`` (so the baselines prune the
    same groups as the search) and what the run's model needs."""
    kw, exclude = _model_kwargs(run, model)
    cfg = run.cfg.search.dms_config(exclude=exclude)
    kw.update({k: getattr(cfg, k) for k in _ONESHOT_KEYS})
    return kw


def _model_kwargs(run: Run, model: nn.Module) -> tuple[dict[str, Any], list[str]]:
    """``run.dms_kwargs(model)`` without ``exclude``, and ``search.exclude`` plus what the model needs excluded."""
    kw = run.dms_kwargs(model)
    own = list(run.cfg.search.exclude)
    return kw, own + [n for n in kw.pop("exclude", ()) if n not in own]


def search_dms(run: Run, model: nn.Module, target: Target, **app: Any) -> DMS:
    """The ``DMS`` of ``[search]``: its ``DMSConfig`` keys as they are (``SearchConfig.dms_config``), the target,
    and what the run's model needs (keyword inputs; a language model's embeddings excluded)."""
    kw, exclude = _model_kwargs(run, model)
    cfg = run.cfg.search.dms_config(target=target, exclude=exclude, **app)
    return DMS(model, run.example, config=cfg, **kw)


def search_phase(run: Run, model: nn.Module, ref: dict[str, float], freeze_weights: bool,
                 teacher: nn.Module | None = None, enlargement: str | None = None) -> dict[str, Any]:
    """DMS search on ``model`` (weights+structure, or structure only; ``teacher``: distil from it), projection onto
    the budget, export to ``searched/``. A result over budget stops the run (``OverBudgetError``) unless the run
    allows it."""
    done = run.done("search")
    if done is not None:
        return done
    s = run.cfg.search
    sup = run.measure(model)
    target, app = _search_target(run, model, ref, sup)
    try:
        dms = search_dms(run, model, target, **app)
    except ValueError as exc:
        key = "search.latency_device" if s.resource == "latency" and "device" in str(exc) else "search.target"
        raise ConfigError(f"{key}={getattr(s, key.split('.')[1])!r}: {exc}") from exc
    frac = dms.target_fraction
    search = Search(dms, train_weights=not freeze_weights,
                    weight_optimizer=lambda ps: make_optimizer(ps, "sgd", s.lr, s.momentum, s.weight_decay),
                    lr=cosine_lr(s.lr, s.steps, s.warmup_steps), structure_optimizer=s.structure_optimizer,
                    structure_lr=s.structure_lr or None)
    batches = run.batches("search")
    start = _resume_or_start(run, "search", s.steps, batches, search.load_state_dict)
    t0 = time.time()

    def hard_eval() -> float:
        with dms.hard():
            return run.eval(model)

    hooks = _PhaseHooks(run, "search", s.steps, hard_eval,
                        lambda n: run.save_ckpt("search", n, s.steps, search.state_dict(), batches), dms=dms)
    # DMS_fast too: BatchNorm in train mode (batch statistics), weights frozen
    with _config_keys(**{"search.lr": s.lr, "search.structure_lr": search.sopt.param_groups[0]["lr"]}):
        search.run(run.task(s.label_smoothing, teacher), batches, start=start, train_mode=True, **hooks.kw)
    recal = (lambda m: recalibrate_bn(m, run.batches("recalibrate"), s.bn_recalibrate)) if s.bn_recalibrate else None
    small, fin = finish_search(dms, recalibrate=recal)
    value = run.eval(small)
    run.log({"phase": "search", "step": s.steps, f"eval_{run.metric}": value})
    kept = fin["kept"]
    res_frac = fin[f"{s.resource}_frac"]
    if fin["over_budget"] and not run.allow_over_budget:
        run.log({"phase": "search", "step": s.steps, "over_budget": res_frac, "target": frac})
        raise OverBudgetError(f"the search ended over budget: {s.resource} {res_frac:.4f} of the supernet, target "
                              f"{frac:.4f}, even after projecting the widths onto it (depth, divisor or min_ratio "
                              "leave no room); nothing was saved as the result. Search longer, allow more depth "
                              "pruning, or pass --allow-over-budget to keep it")
    info = {f"{run.metric}_hard": value, "steps": s.steps, "seconds": round(time.time() - t0, 1),
            "supernet": {"flops": sup["flops"], "params": sup["params"], "describe": zoo.describe(model),
                         **({"enlargement": enlargement} if enlargement else {})},
            "target_fraction_of_supernet": frac, "resource_fraction_of_supernet": res_frac,
            "over_budget": fin["over_budget"], "projection": fin.get("projection"),
            **({"latency": fin["latency"]} if "latency" in fin else {}),
            "groups": [{"name": g.name, "kind": g.kind, "full": kept[g.name][0], "kept": kept[g.name][1]}
                       for g in dms.groups], "summary": fin["summary"]}
    return _finish_model_phase(run, "search", small, "searched", info)


# ----------------------------------------------------------------------------------------- pipelines
def _ref(run: Run) -> dict[str, float]:
    """Resources of the base architecture (what ``search.target`` is a fraction of, by default)."""
    info = run.state.get("reference")
    if info is None:
        base = run.base_model()
        info = run.measure(base)
        info["describe"] = zoo.describe(base)
        run.state["reference"] = info
        run.write_state()
    return info


def _retrain_and_finish(run: Run, search: dict[str, Any]) -> dict[str, Any]:
    """Retrain (fine-tune) the exported architecture and save ``model/``; writes the report."""
    rt = run.cfg.retrain
    info = run.done("retrain")
    if info is None:
        model = run.load(run.dir / search["dir"])
        if rt.reset:
            run.reinit(model, run.cfg.run.seed * 10 + PHASE_SALT["reset"])
        if rt.steps > 0:
            teacher = _teacher(run) if run.cfg.run.pipeline != "dms" else None
            res = train_phase(run, "retrain", model, rt, teacher)
        else:
            res = {run.metric: search[f"{run.metric}_hard"], "steps": 0, "seconds": 0.0}
        res["reset"] = rt.reset
        info = _finish_model_phase(run, "retrain", model, "model", res)
    return finish(run)


def run_dms(cfg: RunConfig, resume: bool = False, callback: Callback | None = None,
            allow_over_budget: bool = False) -> dict[str, Any]:
    """DMS (default): random-init enlarged supernet, search weights+structure, export, retrain."""
    from dmscale.app.workload import describe_enlargement

    with open_run(cfg, resume, callback, allow_over_budget=allow_over_budget) as run:
        ref = _ref(run)
        search = run.done("search") or search_phase(run, run.supernet(), ref, freeze_weights=False,
                                                    enlargement=describe_enlargement(run.cfg))
        return _retrain_and_finish(run, search)


def _search_pretrained(run: Run, freeze_weights: bool) -> dict[str, Any]:
    """Search from the run's pretrained model, with the pretrained model as the FLOPs reference."""
    done = run.done("search")
    if done is not None:
        return done
    model, pre = pretrained_model(run)
    ref = {"flops": pre["flops"], "params": pre["params"], "describe": pre.get("describe")}
    run.state["reference"] = ref
    return search_phase(run, model, ref, freeze_weights=freeze_weights, teacher=_teacher(run, model))


def run_dms_p(cfg: RunConfig, resume: bool = False, callback: Callback | None = None,
              allow_over_budget: bool = False) -> dict[str, Any]:
    """DMS_p: pretrained model, search weights+structure, export, retrain/fine-tune."""
    with open_run(cfg, resume, callback, allow_over_budget=allow_over_budget) as run:
        return _retrain_and_finish(run, _search_pretrained(run, freeze_weights=False))


def run_dms_fast(cfg: RunConfig, resume: bool = False, callback: Callback | None = None,
                 allow_over_budget: bool = False) -> dict[str, Any]:
    """DMS_fast: pretrained model, weights frozen (BN in train mode), structure only, export, no retraining."""
    with open_run(cfg, resume, callback, allow_over_budget=allow_over_budget) as run:
        search = _search_pretrained(run, freeze_weights=True)
        if run.done("retrain") is None:
            small = run.load(run.dir / search["dir"])
            _finish_model_phase(run, "retrain", small, "model", {run.metric: search[f"{run.metric}_hard"],
                                                                "steps": 0, "seconds": 0.0, "reset": False})
        return finish(run)


def run_pretrain(cfg: RunConfig, resume: bool = False, callback: Callback | None = None,
                 allow_over_budget: bool = False) -> dict[str, Any]:
    """Train the base architecture (the built-in family from scratch, or the user's ``--model`` from its weights):
    a pretrained model for DMS_p / DMS_fast / baselines."""
    with open_run(cfg, resume, callback) as run:
        _ref(run)
        pretrained_model(run)
        return finish(run)


# ----------------------------------------------------------------------------------------- baselines
def uniform_width_model(run: Run, goal: float) -> tuple[nn.Module, float]:
    """The base family at the width multiplier (bisection on ``count``) whose resource is <= goal (absolute)."""
    m = run.cfg.model
    c, n = run.data.input_shape[0], run.data.num_classes

    def build(mult: float) -> nn.Module:
        return zoo.build(m.widths, m.depths, c, n, width_mult=mult, stem_stride=m.stem_stride)

    mult = uniform_width(build, run.example[0], goal, run.cfg.search.resource)
    torch.manual_seed(run.cfg.run.seed * 10 + PHASE_SALT["baseline-uniform"])
    return build(mult), mult


def uniform_ratio_model(run: Run, goal: float) -> tuple[nn.Module, float]:
    """The uniform baseline of a user model (a factory has no width knob): one kept ratio r for every width
    group, set through masks by the one-shot common-ratio search so the resource is <= goal (absolute); the
    export is randomly re-initialised, like the built-in family's uniformly narrower model."""
    base = run.base_model()
    s = run.cfg.search
    frac = min(goal / run.measure(base)[s.resource], 1.0)
    small, info = oneshot_prune(base, run.example, Target(**{s.resource: frac}), "l1", **_oneshot_kwargs(run, base))
    run.reinit(small, run.cfg.run.seed * 10 + PHASE_SALT["baseline-uniform"])
    return small, info["ratio"]


def _baseline_start(run: Run, method: str, goal: float, trained: list[nn.Module]) -> tuple[nn.Module, dict]:
    """The model a baseline retrains from, and its setting (width multiplier or common kept ratio)."""
    s = run.cfg.search
    if method == "uniform":
        if run.cfg.model.spec:
            model, r = uniform_ratio_model(run, goal)
            return model, {"ratio": r}
        model, mult = uniform_width_model(run, goal)
        return model, {"width_mult": mult}
    if not trained:
        trained.append(pretrained_model(run)[0])
    frac = goal / run.measure(trained[0])[s.resource]
    model, info = oneshot_prune(trained[0], run.example, Target(**{s.resource: min(frac, 1.0)}), method,
                                task=run.task(), batches=run.batches("baseline-" + method),
                                n_batches=run.cfg.baseline.taylor_batches, bn_batches=s.bn_recalibrate,
                                **_oneshot_kwargs(run, trained[0]))
    # the one-shot model as it starts retraining (BatchNorm recalibrated with search.bn_recalibrate)
    return model, {"ratio": info["ratio"], "bn_recalibrated": info["bn_recalibrated"],
                   f"{run.metric}_oneshot": run.eval(model)}


def run_baselines(cfg: RunConfig, resume: bool = False, callback: Callback | None = None,
                  allow_over_budget: bool = False) -> dict[str, Any]:
    """Uniform width scaling, one-shot L1 and Taylor pruning at the same budget, each retrained (``retrain``)."""
    with open_run(cfg, resume, callback, attach=True) as run:
        ref = _ref(run)
        s = run.cfg.search
        goal = s.target * ref[s.resource] if s.target_of == "base" else None
        if goal is None:  # relative to the supernet of this run's config
            goal = s.target * run.measure(run.supernet())[s.resource]
        trained: list[nn.Module] = []
        teacher: list[nn.Module | None] = []
        for method in run.cfg.baseline.methods:
            phase = f"baseline-{method}"
            if run.done(phase) is not None:
                continue
            start_dir = run.dir / "baselines" / method / "start"
            if (start_dir / "structure.json").is_file():
                setting = json.loads((start_dir.parent / "setting.json").read_text("utf-8"))
            else:
                model, setting = _baseline_start(run, method, goal, trained)
                save(model, start_dir, meta=run.meta(phase + "-start"))
                atomic_write_text(start_dir.parent / "setting.json", json.dumps(setting) + "\n")
            model = run.load(start_dir)
            if not teacher:
                teacher.append(_teacher(run))
            res = train_phase(run, phase, model, run.cfg.retrain, teacher[0])
            res.update(setting)
            _finish_model_phase(run, phase, model, f"baselines/{method}/model", res)
        return finish(run)


# ----------------------------------------------------------------------------------------- results
def finish(run: Run) -> dict[str, Any]:
    """Collect results into summary.json, write report.md and the plots; returns the summary."""
    from dmscale.app.report import write_report

    summary = summarize(run.dir)
    write_report(run.dir, summary)
    return summary


def _target_summary(cfg: RunConfig) -> dict[str, Any]:
    """The run's budget as the summary shows it: resource and fraction of the base/supernet, or latency seconds."""
    s = cfg.search
    if s.resource == "latency":
        return {"resource": "latency", "seconds": s.target, "device": s.latency_device or "the model's device",
                "batch_size": s.latency_batch_size or 1}
    return {"resource": s.resource, "fraction": s.target, "of": s.target_of}


def summarize(run_dir: str | Path) -> dict[str, Any]:
    """The results of a run directory (from state.json and config.yaml) as one dict; also saved as summary.json.

    Every row holds the run's metric under its key (``summary["metric"]``: ``acc``, ``ppl`` or ``loss``)."""
    from dmscale.app.workload import METRICS

    run_dir = Path(run_dir)
    state = read_state(run_dir / "state.json")
    cfg = load_run_config(run_dir)
    ph = state["phases"]
    key = state.get("metric", "acc")
    label, higher = METRICS.get(key, (key, True))
    out: dict[str, Any] = {"pipeline": cfg.run.pipeline, "dataset": state.get("dataset", {}),
                           "model": cfg.model.spec or f"built-in {cfg.model.family}",
                           "metric": {"key": key, "label": label, "higher_is_better": higher},
                           "target": _target_summary(cfg),
                           "reference": state.get("reference"), "rows": [], "groups": [], "run_dir": str(run_dir)}
    rows = out["rows"]

    def row(name: str, info: dict[str, Any], value: Any, **extra: Any) -> None:
        rows.append({"name": name, "flops": info["flops"], "params": info["params"], key: value,
                     "describe": info.get("describe"), **extra})

    ref = state.get("reference")
    if ref and "pretrain" not in ph:
        row("base (reference)", ref, None)
    if "pretrain" in ph:
        p = ph["pretrain"]
        row("pretrained base", p, p.get(key))
    if "search" in ph:
        sr = ph["search"]
        sup = sr["supernet"]
        if cfg.run.pipeline == "dms":
            row("supernet (full)", sup, None)
        row("found, after search", sr, sr.get(f"{key}_hard"))
        out["groups"] = sr["groups"]
        out["search"] = {k: sr[k] for k in ("steps", "seconds", "target_fraction_of_supernet",
                                            "resource_fraction_of_supernet", "projection", "latency") if k in sr}
        if sup.get("enlargement"):
            out["search"]["enlargement"] = sup["enlargement"]
    if "retrain" in ph:
        rt = ph["retrain"]
        name = "found, retrained" + (" (reset)" if rt.get("reset") else "") if rt.get("steps") else "exported"
        row(name, rt, rt.get(key), dms=True)
    for m in ("uniform", "l1", "taylor"):
        b = ph.get(f"baseline-{m}")
        if b is not None:
            extra = {k: b[k] for k in ("ratio", "width_mult", "bn_recalibrated") if k in b}
            if f"{key}_oneshot" in b:
                extra["before_retrain"] = b[f"{key}_oneshot"]
            row(f"baseline: {m}", b, b.get(key), baseline=m, **extra)
    atomic_write_text(run_dir / "summary.json", json.dumps(out, indent=1) + "\n")
    return out


def run(cfg: RunConfig, resume: bool = False, callback: Callback | None = None,
        allow_over_budget: bool = False) -> dict[str, Any]:
    """Run the pipeline named by ``cfg.run.pipeline`` (``allow_over_budget``: keep a search that ends over budget)."""
    fn = {"dms": run_dms, "dms_p": run_dms_p, "dms_fast": run_dms_fast, "baseline": run_baselines,
          "pretrain": run_pretrain}[cfg.run.pipeline]
    return fn(cfg, resume=resume, callback=callback, allow_over_budget=allow_over_budget)
