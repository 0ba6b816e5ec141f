"""The three DMS pipelines (DMS, DMS_p, DMS_fast), pretraining and the baselines, with resumable run directories.

Run directory layout (see docs/cli.md)::

    config.yaml          the full config used (reload with --config or --resume)
    log.jsonl            one JSON record per step of every phase (+ eval records)
    state.json           finished phases and their results (what a resume skips)
    checkpoints/<phase>.pt   atomic torch.save of plain tensors/dicts (load with weights_only=True)
    pretrained/ searched/ model/ baselines/<m>/   models saved with dmscale.save
    summary.json report.md *.png

Data order is a pure function of (seed, phase, step), so a resumed phase fast-forwards exactly.
"""

from __future__ import annotations

import io
import json
import math
import os
import random
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from dmscale.app import zoo
from dmscale.app.config import ConfigError, RunConfig, TrainConfig, dump_yaml, from_file, validate
from dmscale.app.datasets import ImageData, load_dataset
from dmscale.serialization.atomic import read_json_file
from dmscale.serialization.checkpoint import load_checkpoint
from dmscale.serialization.dirs import claim_dir, lock_dir, remove_dmscale_dir
from dmscale.serialization.format import atomic_write_bytes, atomic_write_text, load, save
from dmscale.resources import count
from dmscale.schedule import Target
from dmscale.search import DMS
from dmscale.recipes.baselines import one_shot_prune, uniform_width_model

__all__ = ["Run", "run", "run_dms", "run_dms_p", "run_dms_fast", "run_baselines", "run_pretrain", "evaluate",
           "open_run", "load_run_config", "Batches", "one_shot_prune", "uniform_width_model", "resolve_model_dir",
           "PHASE_SALT", "train_phase", "search_phase", "recalibrate_bn", "pretrained_model", "summarize", "finish",
           "clean_run_dir"]

Callback = Callable[[str, int], None]
PHASE_SALT = {"pretrain": 1, "search": 2, "retrain": 3, "baseline-uniform": 4, "baseline-l1": 5,
              "baseline-taylor": 6, "reset": 7, "recalibrate": 8, "model": 0}


# ----------------------------------------------------------------------------------------- helpers
def _seed_all(seed: int) -> None:
    """Seed torch, python and numpy RNGs."""
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))


def _rng_state() -> dict[str, Any]:
    """All RNG states as plain tensors/lists (loadable with weights_only=True)."""
    py = random.getstate()
    nps = np.random.get_state()
    return {"torch": torch.get_rng_state(),
            "python": [int(py[0]), list(py[1]), py[2]],
            "numpy": {"name": str(nps[0]), "keys": torch.from_numpy(np.asarray(nps[1], dtype=np.int64)),
                      "pos": int(nps[2]), "has_gauss": int(nps[3]), "gauss": float(nps[4])}}


def _set_rng_state(s: dict[str, Any]) -> None:
    """Restore what ``_rng_state`` captured."""
    torch.set_rng_state(s["torch"])
    random.setstate((s["python"][0], tuple(s["python"][1]), s["python"][2]))
    n = s["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))


def _lr_at(step: int, total: int, base: float, warmup: int) -> float:
    """Linear warmup then cosine decay to 0: a pure function of the step (no scheduler state to save)."""
    if warmup > 0 and step < warmup:
        return base * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return base * 0.5 * (1.0 + math.cos(math.pi * min(1.0, t)))


def _set_threads(n: int) -> int:
    """``torch.set_num_threads(n)``; n=0 is auto: torch's default, or 1 thread when the machine is already busy
    (load average >= cores), because OpenMP threads spin-wait and run several times slower when oversubscribed."""
    if n <= 0:
        try:
            busy = os.getloadavg()[0] >= (os.cpu_count() or 1)
        except OSError:
            busy = False
        if not busy:
            return torch.get_num_threads()
        n = 1
    torch.set_num_threads(n)
    return n


class Batches:
    """Training batches as a pure function of (seed, step): epoch permutations from a seeded generator."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int, seed: int) -> None:
        self.x, self.y = x, y
        self.n = len(x)
        if self.n == 0:
            raise ValueError("the training set is empty")
        self.bs = min(batch_size, self.n)
        self.per_epoch = self.n // self.bs  # drop_last: every epoch has the same number of batches
        self.seed = int(seed)
        self._cache: tuple[int, torch.Tensor] | None = None

    def position(self, step: int) -> tuple[int, int]:
        """(epoch, batch index within the epoch) of a step."""
        return divmod(step, self.per_epoch)

    def perm(self, epoch: int) -> torch.Tensor:
        """The shuffled order of an epoch."""
        if self._cache is None or self._cache[0] != epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._cache = (epoch, torch.randperm(self.n, generator=g))
        return self._cache[1]

    def __call__(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        epoch, i = self.position(step)
        idx = self.perm(epoch)[i * self.bs:(i + 1) * self.bs]
        return self.x[idx], self.y[idx]


@torch.no_grad()
def evaluate(model: nn.Module, data: ImageData, batch_size: int = 500) -> float:
    """Top-1 accuracy on the test split (model in eval mode, restored after)."""
    was = model.training
    model.eval()
    x, y = data.test.tensors
    correct = 0
    try:
        for i in range(0, len(x), batch_size):
            correct += int((model(x[i:i + batch_size]).argmax(1) == y[i:i + batch_size]).sum())
    finally:
        model.train(was)
    return correct / max(1, len(x))


def resolve_model_dir(path: str | Path) -> Path:
    """A dmscale.save directory, or a run directory's final (else searched, else pretrained) model."""
    p = Path(path).expanduser()
    if (p / "structure.json").is_file():
        return p
    for sub in ("model", "searched", "pretrained"):
        if (p / sub / "structure.json").is_file():
            return p / sub
    raise FileNotFoundError(f"{str(p)!r} is neither a saved dmscale model (structure.json) nor a run directory "
                            "with model/, searched/ or pretrained/")


# ----------------------------------------------------------------------------------------- the run
class Run:
    """A run directory: config, JSONL log, checkpoints, finished-phase state, data and example input."""

    def __init__(self, cfg: RunConfig, run_dir: Path, resume: bool, callback: Callback | None = None,
                 attach: bool = False) -> None:
        self.cfg = cfg
        self.dir = run_dir
        self.callback = callback
        self.resume = resume
        if run_dir.exists() and any(run_dir.iterdir()) and not (resume or attach):
            raise FileExistsError(f"run directory {str(run_dir)!r} is not empty; use --resume {run_dir} to continue "
                                  "it or choose another run.out / --out")
        self.lock = lock_dir(run_dir, what="run directory")  # held for the life of the command
        claim_dir(run_dir, "run")
        (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
        if not (run_dir / "config.yaml").exists() or not (resume or attach):
            atomic_write_text(run_dir / "config.yaml", dump_yaml(cfg))
        self.log_path = run_dir / "log.jsonl"
        self.state = self._read_state()
        self.threads = _set_threads(cfg.run.threads)
        d = cfg.data
        t0 = time.time()
        self.data = load_dataset(d.name, root=d.root or None, seed=cfg.run.seed,
                                 limit_train=d.limit_train or None, limit_test=d.limit_test or None)
        self.example = self.data.train.tensors[0][:1].clone()
        self.state.setdefault("dataset", {})
        self.state["dataset"] = {"name": self.data.name, "source": self.data.source,
                                 "selection": self.data.selection, "train": len(self.data.train),
                                 "test": len(self.data.test), "input_shape": list(self.data.input_shape),
                                 "classes": self.data.num_classes, "load_s": round(time.time() - t0, 2)}
        self._write_state()

    # ---------------------------------------------------------------- state & log
    def _read_state(self) -> dict[str, Any]:
        p = self.dir / "state.json"
        return read_state(p) if os.path.lexists(p) else {"phases": {}}

    def _write_state(self) -> None:
        atomic_write_text(self.dir / "state.json", json.dumps(self.state, indent=1) + "\n")

    def done(self, phase: str) -> dict[str, Any] | None:
        """Results of a finished phase, or None."""
        return self.state["phases"].get(phase)

    def mark_done(self, phase: str, info: dict[str, Any]) -> None:
        """Record a finished phase (a resume skips it) and drop its checkpoint."""
        self.state["phases"][phase] = info
        self._write_state()
        ck = self.ckpt_path(phase)
        if ck.exists():
            ck.unlink()

    def log(self, rec: dict[str, Any]) -> None:
        """Append one record to log.jsonl."""
        with open(self.log_path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(rec) + "\n")

    def truncate_log(self, phase: str, step: int) -> None:
        """Drop the records a crashed phase wrote after its last checkpoint (so the log equals an unbroken run)."""
        if not self.log_path.exists():
            return
        keep = []
        for line in self.log_path.read_text("utf-8").splitlines():
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by the crash
            if rec.get("phase") == phase and int(rec.get("step", 0)) > step:
                continue
            keep.append(line)
        atomic_write_text(self.log_path, "".join(k + "\n" for k in keep))

    def reset_phase_log(self, phase: str) -> None:
        """Remove every record of a phase (it restarts from step 0)."""
        self.truncate_log(phase, 0)  # every record has step >= 1

    # ---------------------------------------------------------------- checkpoints
    def ckpt_path(self, phase: str) -> Path:
        """Where a phase's checkpoint lives."""
        return self.dir / "checkpoints" / f"{phase}.pt"

    def save_ckpt(self, phase: str, step: int, model: nn.Module, opts: list[torch.optim.Optimizer],
                  dms: DMS | None, batches: Batches) -> None:
        """Atomically write model, optimizers, search state, RNG states and data position."""
        epoch, idx = batches.position(step)
        obj = {"phase": phase, "step": step, "model": model.state_dict(),
               "optimizers": [o.state_dict() for o in opts], "dms": dms.state_dict() if dms is not None else None,
               "rng": _rng_state(), "data": {"seed": batches.seed, "epoch": epoch, "index": idx,
                                             "batch_size": batches.bs}}
        buf = io.BytesIO()
        torch.save(obj, buf)
        atomic_write_bytes(self.ckpt_path(phase), buf.getvalue())

    def load_ckpt(self, phase: str) -> dict[str, Any] | None:
        """The checkpoint of an interrupted phase (weights_only), or None."""
        p = self.ckpt_path(phase)
        if not p.exists():
            return None
        return load_checkpoint(p, map_location="cpu")

    def batches(self, phase: str) -> Batches:
        """Deterministic batches for a phase."""
        x, y = self.data.train.tensors
        return Batches(x, y, self.cfg.data.batch_size, self.cfg.run.seed * 10 + PHASE_SALT.get(phase, 9))

    def meta(self, kind: str) -> dict[str, Any]:
        """Metadata saved with a model (input shape for ``dmscale info``/``upscale``)."""
        return {"kind": kind, "pipeline": self.cfg.run.pipeline, "dataset": self.data.name,
                "input_shape": list(self.data.input_shape), "num_classes": self.data.num_classes}

    def measure(self, model: nn.Module) -> dict[str, float]:
        """FLOPs (per image, 2 per multiply-add) and params."""
        return count(model, (self.example,))

    def eval(self, model: nn.Module) -> float:
        """Test accuracy."""
        return evaluate(model, self.data, self.cfg.data.eval_batch_size)

    def step_done(self, phase: str, step: int) -> None:
        """User callback after each finished (logged, checkpointed) step."""
        if self.callback is not None:
            self.callback(phase, step)

    # ---------------------------------------------------------------- models
    def base_model(self) -> nn.Module:
        """The base architecture (multiplier 1), seeded."""
        m = self.cfg.model
        torch.manual_seed(self.cfg.run.seed)
        return zoo.build(m.widths, m.depths, self.data.input_shape[0], self.data.num_classes,
                         stem_stride=m.stem_stride)

    def supernet(self) -> nn.Module:
        """The enlarged supernet (base x supernet multipliers), seeded random init."""
        m = self.cfg.model
        torch.manual_seed(self.cfg.run.seed)
        return zoo.build(m.widths, m.depths, self.data.input_shape[0], self.data.num_classes,
                         width_mult=m.supernet_width_mult, depth_mult=m.supernet_depth_mult,
                         stem_stride=m.stem_stride)


def _forward_kept(dms: DMS) -> dict[str, int]:
    """Kept width of every group in this step's forward (the masker's hard keep; falls back to ``dms.kept()``)."""
    cur = getattr(dms.masker, "current_keep", None)
    if cur and all(g.key in cur for g in dms.groups):
        return {g.name: int(cur[g.key].sum()) for g in dms.groups}
    return {k: v[1] for k, v in dms.kept().items()}


def _progress(run: Run, total: int, initial: int, desc: str) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, disable=not run.cfg.run.progress, dynamic_ncols=True,
                leave=True)


def _sgd(params: list[nn.Parameter], lr: float, momentum: float, weight_decay: float) -> torch.optim.SGD:
    return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=momentum > 0)


# ----------------------------------------------------------------------------------------- training
def train_phase(run: Run, phase: str, model: nn.Module, tc: TrainConfig) -> dict[str, Any]:
    """Train a model with SGD + cosine LR for ``tc.steps`` (resumable); returns accuracy and timings."""
    done = run.done(phase)
    if done is not None:
        return done
    opt = _sgd([p for p in model.parameters() if p.requires_grad], tc.lr, tc.momentum, tc.weight_decay)
    batches = run.batches(phase)
    ck = run.load_ckpt(phase)
    start = 0
    if ck is not None:
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizers"][0])
        _set_rng_state(ck["rng"])
        start = int(ck["step"])
        run.truncate_log(phase, start)
    else:
        _seed_all(run.cfg.run.seed * 10 + PHASE_SALT.get(phase, 9))
        run.reset_phase_log(phase)
    t0 = time.time()
    acc_ema = None
    model.train()
    eval_acc = None
    with _progress(run, tc.steps, start, phase) as bar:
        for step in range(start, tc.steps):
            lr = _lr_at(step, tc.steps, tc.lr, tc.warmup_steps)
            for g in opt.param_groups:
                g["lr"] = lr
            xb, yb = batches(step)
            out = model(xb)
            loss = F.cross_entropy(out, yb, label_smoothing=tc.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            acc = float((out.detach().argmax(1) == yb).float().mean())
            acc_ema = acc if acc_ema is None else 0.9 * acc_ema + 0.1 * acc
            rec = {"phase": phase, "step": step + 1, "loss": float(loss.detach()), "lr": lr, "train_acc": acc}
            run.log(rec)
            if run.cfg.run.eval_every and (step + 1) % run.cfg.run.eval_every == 0 and step + 1 < tc.steps:
                eval_acc = run.eval(model)
                run.log({"phase": phase, "step": step + 1, "eval_acc": eval_acc})
            if (step + 1) % run.cfg.run.checkpoint_every == 0 and step + 1 < tc.steps:
                run.save_ckpt(phase, step + 1, model, [opt], None, batches)
            bar.update(1)
            post = {"loss": f"{float(loss.detach()):.3f}", "acc": f"{acc_ema:.3f}"}
            if eval_acc is not None:
                post["test"] = f"{eval_acc:.3f}"
            bar.set_postfix(post, refresh=False)
            run.step_done(phase, step + 1)
    acc = run.eval(model)
    run.log({"phase": phase, "step": tc.steps, "eval_acc": acc})
    return {"acc": acc, "steps": tc.steps, "seconds": round(time.time() - t0, 1)}


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
    """The pretrained model: ``model.pretrained`` if given, else the base model trained in this run (``pretrain``)."""
    m = run.cfg.model
    if m.pretrained:
        try:
            d = resolve_model_dir(m.pretrained)
        except FileNotFoundError as exc:
            raise ConfigError(f"model.pretrained={m.pretrained!r}: {exc}") from exc
        model = load(d)
        x = run.example
        try:
            with torch.no_grad():
                model.eval()(x)
        except Exception as exc:
            raise ConfigError(f"model.pretrained={m.pretrained!r} does not accept this dataset's inputs "
                              f"{tuple(x.shape)}: {exc}") from exc
        info = run.done("pretrain")
        if info is None:
            info = {"acc": run.eval(model), "source": str(d), "steps": 0}
            info.update(run.measure(model))
            info["describe"] = zoo.describe(model)
            run.mark_done("pretrain", info)
        return model, info
    info = run.done("pretrain")
    if info is not None:
        return load(run.dir / info["dir"]), info
    model = run.base_model()
    res = train_phase(run, "pretrain", model, run.cfg.pretrain)
    return load(run.dir / _finish_model_phase(run, "pretrain", model, "pretrained", res)["dir"]), run.done("pretrain")


# ----------------------------------------------------------------------------------------- search
def _target_fraction(run: Run, ref: dict[str, float], sup: dict[str, float]) -> float:
    """The target as a fraction of the supernet (what ``Target`` takes)."""
    s = run.cfg.search
    if s.target_of == "supernet":
        return s.target
    frac = s.target * ref[s.resource] / sup[s.resource]
    if frac > 1.0 + 1e-9:
        raise ConfigError(f"search.target={s.target} of the base model's {s.resource} is larger than the "
                          f"supernet itself ({frac:.3f} of it); lower search.target or enlarge the supernet")
    return min(frac, 1.0)


@torch.no_grad()
def recalibrate_bn(model: nn.Module, batches: Batches, n: int) -> None:
    """Re-estimate BatchNorm running statistics of the (hard-masked) network from ``n`` training batches.

    The search accumulates statistics of the soft, shrinking supernet; the found network's own statistics
    make its accuracy right after the search meaningful (export copies them)."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not bns:
        return
    was = model.training
    moms = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the n batches
    model.train()
    try:
        for i in range(n):
            model(batches(i)[0])
    finally:
        for m, mom in zip(bns, moms):
            m.momentum = mom
        model.train(was)


def search_phase(run: Run, model: nn.Module, ref: dict[str, float], freeze_weights: bool) -> dict[str, Any]:
    """DMS search on ``model`` (weights+structure, or structure only), then export to ``searched/``."""
    done = run.done("search")
    if done is not None:
        return done
    s = run.cfg.search
    sup = run.measure(model)
    frac = _target_fraction(run, ref, sup)
    if freeze_weights:
        for p in model.parameters():
            p.requires_grad_(False)
    try:
        dms = DMS(model, (run.example,), Target(**{s.resource: frac}), total_steps=s.steps, importance=s.importance,
                  importance_decay=s.importance_decay, resource_weight=s.resource_weight,
                  decay_fraction=s.decay_fraction, divisor=s.divisor, min_ratio=s.min_ratio,
                  prune_depth=s.prune_depth, warn=False)
    except ValueError as exc:
        raise ConfigError(f"search.target={s.target}: {exc}") from exc
    opts: list[torch.optim.Optimizer] = []
    wopt = None
    if not freeze_weights:
        wopt = _sgd(dms.weight_parameters(), s.lr, s.momentum, s.weight_decay)
        opts.append(wopt)
    sp = dms.structure_parameters()
    slr = s.structure_lr or min(0.1, max(0.005, 2.0 / s.steps))
    sopt: torch.optim.Optimizer = (torch.optim.Adam(sp, lr=slr) if s.structure_optimizer == "adam"
                                   else torch.optim.SGD(sp, lr=slr, momentum=0.9))
    opts.append(sopt)
    batches = run.batches("search")
    start = 0
    ck = run.load_ckpt("search")
    if ck is not None:
        model.load_state_dict(ck["model"])
        dms.load_state_dict(ck["dms"])
        for o, st in zip(opts, ck["optimizers"]):
            o.load_state_dict(st)
        _set_rng_state(ck["rng"])
        start = int(ck["step"])
        run.truncate_log("search", start)
    else:
        _seed_all(run.cfg.run.seed * 10 + PHASE_SALT["search"])
        run.reset_phase_log("search")
    t0 = time.time()
    model.train()  # DMS_fast too: BatchNorm in train mode (batch statistics), weights frozen
    acc_ema = None
    eval_acc = None
    with _progress(run, s.steps, start, "search") as bar:
        for step in range(start, s.steps):
            lr = _lr_at(step, s.steps, s.lr, s.warmup_steps)
            if wopt is not None:
                for g in wopt.param_groups:
                    g["lr"] = lr
            xb, yb = batches(step)
            out = model(xb)
            task = F.cross_entropy(out, yb, label_smoothing=s.label_smoothing)
            loss = dms.loss(task)
            for o in opts:
                o.zero_grad(set_to_none=True)
            loss.backward()
            for o in opts:
                o.step()
            dms.step()
            acc = float((out.detach().argmax(1) == yb).float().mean())
            acc_ema = acc if acc_ema is None else 0.9 * acc_ema + 0.1 * acc
            kept = _forward_kept(dms)
            run.log({"phase": "search", "step": step + 1, "task_loss": dms.last["task_loss"],
                     "resource": dms.last["resource"], "target": dms.last["target"],
                     "resource_loss": dms.last["resource_loss"], "lr": lr, "train_acc": acc, "kept": kept})
            if run.cfg.run.eval_every and (step + 1) % run.cfg.run.eval_every == 0 and step + 1 < s.steps:
                with dms.hard():
                    eval_acc = run.eval(model)
                run.log({"phase": "search", "step": step + 1, "eval_acc": eval_acc})
            if (step + 1) % run.cfg.run.checkpoint_every == 0 and step + 1 < s.steps:
                run.save_ckpt("search", step + 1, model, opts, dms, batches)
            bar.update(1)
            post = {"loss": f"{dms.last['task_loss']:.3f}",
                    "res": f"{dms.last['resource']:.3f}/{dms.last['target']:.3f}", "acc": f"{acc_ema:.3f}"}
            if eval_acc is not None:
                post["test"] = f"{eval_acc:.3f}"
            bar.set_postfix(post, refresh=False)
            run.step_done("search", step + 1)
    if s.bn_recalibrate:
        with dms.hard():
            recalibrate_bn(model, run.batches("recalibrate"), s.bn_recalibrate)
    with dms.hard():
        acc_hard = run.eval(model)
    run.log({"phase": "search", "step": s.steps, "eval_acc": acc_hard})
    with torch.no_grad():
        r = dms.resource(soft=False)
    kept = dms.kept()
    groups = [{"name": g.name, "kind": g.kind, "full": kept[g.name][0], "kept": kept[g.name][1]} for g in dms.groups]
    small = dms.export()
    info = {"acc_hard": acc_hard, "steps": s.steps, "seconds": round(time.time() - t0, 1),
            "supernet": {"flops": sup["flops"], "params": sup["params"], "describe": zoo.describe(model)},
            "target_fraction_of_supernet": frac, "resource_fraction_of_supernet": float(r[f"{s.resource}_frac"]),
            "groups": groups, "summary": dms.summary()}
    return _finish_model_phase(run, "search", small, "searched", info)


# ----------------------------------------------------------------------------------------- pipelines
def open_run(cfg: RunConfig, resume: bool = False, callback: Callback | None = None, attach: bool = False) -> Run:
    """Create (or reopen with ``resume``) the run directory ``cfg.run.out``."""
    validate(cfg)
    return Run(cfg, Path(cfg.run.out), resume, callback, attach=attach)


def _ref(run: Run) -> dict[str, float]:
    """Resources of the base architecture (what ``search.target`` is a fraction of, by default)."""
    info = run.state.get("reference")
    if info is None:
        base = run.base_model()
        info = run.measure(base)
        info["describe"] = zoo.describe(base)
        run.state["reference"] = info
        run._write_state()
    return info


def _retrain_and_finish(run: Run, search: dict[str, Any]) -> dict[str, Any]:
    """Retrain (fine-tune) the exported architecture and save ``model/``; writes the report."""
    rt = run.cfg.retrain
    info = run.done("retrain")
    if info is None:
        model = load(run.dir / search["dir"])
        if rt.reset:
            zoo.reinitialize(model, run.cfg.run.seed * 10 + PHASE_SALT["reset"])
        if rt.steps > 0:
            res = train_phase(run, "retrain", model, rt)
        else:
            res = {"acc": search["acc_hard"], "steps": 0, "seconds": 0.0}
        res["reset"] = rt.reset
        info = _finish_model_phase(run, "retrain", model, "model", res)
    return finish(run)


def run_dms(cfg: RunConfig, resume: bool = False, callback: Callback | None = None) -> dict[str, Any]:
    """DMS (default): random-init enlarged supernet, search weights+structure, export, retrain."""
    run = open_run(cfg, resume, callback)
    ref = _ref(run)
    search = search_phase(run, run.supernet(), ref, freeze_weights=False)
    return _retrain_and_finish(run, search)


def _search_pretrained(run: Any, freeze_weights: bool) -> dict[str, Any]:
    """Search from the run's pretrained model, with the pretrained model as the FLOPs reference."""
    model, pre = pretrained_model(run)
    ref = {"flops": pre["flops"], "params": pre["params"], "describe": pre.get("describe")}
    run.state["reference"] = ref
    return search_phase(run, model, ref, freeze_weights=freeze_weights)


def run_dms_p(cfg: RunConfig, resume: bool = False, callback: Callback | None = None) -> dict[str, Any]:
    """DMS_p: pretrained model, search weights+structure, export, retrain/fine-tune."""
    run = open_run(cfg, resume, callback)
    return _retrain_and_finish(run, _search_pretrained(run, freeze_weights=False))


def run_dms_fast(cfg: RunConfig, resume: bool = False, callback: Callback | None = None) -> dict[str, Any]:
    """DMS_fast: pretrained model, weights frozen (BN in train mode), structure only, export, no retraining."""
    run = open_run(cfg, resume, callback)
    search = _search_pretrained(run, freeze_weights=True)
    if run.done("retrain") is None:
        small = load(run.dir / search["dir"])
        _finish_model_phase(run, "retrain", small, "model", {"acc": search["acc_hard"], "steps": 0,
                                                            "seconds": 0.0, "reset": False})
    return finish(run)


def run_pretrain(cfg: RunConfig, resume: bool = False, callback: Callback | None = None) -> dict[str, Any]:
    """Train the base architecture from scratch (a pretrained model for DMS_p / DMS_fast / baselines)."""
    run = open_run(cfg, resume, callback)
    _ref(run)
    pretrained_model(run)
    return finish(run)


# ----------------------------------------------------------------------------------------- baselines
def run_baselines(cfg: RunConfig, resume: bool = False, callback: Callback | None = None) -> dict[str, Any]:
    """Uniform width scaling, one-shot L1 and Taylor pruning at the same budget, each retrained (``retrain``)."""
    run = open_run(cfg, resume, callback, attach=True)
    ref = _ref(run)
    s = run.cfg.search
    goal = s.target * ref[s.resource] if s.target_of == "base" else None
    if goal is None:  # relative to the supernet of this run's config
        goal = s.target * run.measure(run.supernet())[s.resource]
    trained = None
    for method in run.cfg.baseline.methods:
        phase = f"baseline-{method}"
        if run.done(phase) is not None:
            continue
        start_dir = run.dir / "baselines" / method / "start"
        if (start_dir / "structure.json").is_file():
            model = load(start_dir)
            setting = json.loads((start_dir.parent / "setting.json").read_text("utf-8"))
        else:
            if method == "uniform":
                model, mult = uniform_width_model(run, goal)
                setting = {"width_mult": mult}
            else:
                if trained is None:
                    trained, _ = pretrained_model(run)
                frac = goal / run.measure(trained)[s.resource]
                model, r = one_shot_prune(trained, run.example, min(frac, 1.0), method, s.resource,
                                          run.batches("baseline-" + method), run.cfg.baseline.taylor_batches)
                setting = {"ratio": r}
            save(model, start_dir, meta=run.meta(phase + "-start"))
            atomic_write_text(start_dir.parent / "setting.json", json.dumps(setting) + "\n")
            model = load(start_dir)
        res = train_phase(run, phase, model, run.cfg.retrain)
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


def summarize(run_dir: str | Path) -> dict[str, Any]:
    """The results of a run directory (from state.json and config.yaml) as one dict; also saved as summary.json."""
    run_dir = Path(run_dir)
    state = read_state(run_dir / "state.json")
    cfg = load_run_config(run_dir)
    ph = state["phases"]
    out: dict[str, Any] = {"pipeline": cfg.run.pipeline, "dataset": state.get("dataset", {}),
                           "target": {"resource": cfg.search.resource, "fraction": cfg.search.target,
                                      "of": cfg.search.target_of},
                           "reference": state.get("reference"), "rows": [], "groups": [], "run_dir": str(run_dir)}
    rows = out["rows"]
    ref = state.get("reference")
    if ref and "pretrain" not in ph:
        rows.append({"name": "base (reference)", "flops": ref["flops"], "params": ref["params"], "acc": None,
                     "describe": ref.get("describe")})
    if "pretrain" in ph:
        p = ph["pretrain"]
        rows.append({"name": "pretrained base", "flops": p["flops"], "params": p["params"], "acc": p.get("acc"),
                     "describe": p.get("describe")})
    if "search" in ph:
        sr = ph["search"]
        sup = sr["supernet"]
        if cfg.run.pipeline == "dms":
            rows.append({"name": "supernet (full)", "flops": sup["flops"], "params": sup["params"], "acc": None,
                         "describe": sup.get("describe")})
        rows.append({"name": "found, after search", "flops": sr["flops"], "params": sr["params"],
                     "acc": sr["acc_hard"], "describe": sr.get("describe")})
        out["groups"] = sr["groups"]
        out["search"] = {k: sr[k] for k in ("steps", "seconds", "target_fraction_of_supernet",
                                            "resource_fraction_of_supernet") if k in sr}
    if "retrain" in ph:
        rt = ph["retrain"]
        label = "found, retrained" + (" (reset)" if rt.get("reset") else "") if rt.get("steps") else "exported"
        rows.append({"name": label, "flops": rt["flops"], "params": rt["params"], "acc": rt["acc"],
                     "describe": rt.get("describe"), "dms": True})
    for m in ("uniform", "l1", "taylor"):
        b = ph.get(f"baseline-{m}")
        if b is not None:
            rows.append({"name": f"baseline: {m}", "flops": b["flops"], "params": b["params"], "acc": b["acc"],
                         "describe": b.get("describe"), "baseline": m})
    atomic_write_text(run_dir / "summary.json", json.dumps(out, indent=1) + "\n")
    return out


def read_state(path: Path) -> dict[str, Any]:
    """A run's ``state.json`` (a regular JSON file with a ``phases`` table); ConfigError naming it otherwise."""
    state = read_json_file(path, what="run state", exc=ConfigError)
    if not isinstance(state.get("phases"), dict):
        raise ConfigError(f"run state {str(path)!r} is corrupted: no 'phases' table")
    return state


def load_run_config(run_dir: str | Path) -> RunConfig:
    """The config a run directory was started with (``config.yaml``)."""
    p = Path(run_dir) / "config.yaml"
    if not os.path.lexists(p):
        raise FileNotFoundError(f"{str(run_dir)!r} is not a run directory (no config.yaml)")
    cfg = from_file(p)
    cfg.run.out = str(run_dir)
    return cfg


def run(cfg: RunConfig, resume: bool = False, callback: Callback | None = None) -> dict[str, Any]:
    """Run the pipeline named by ``cfg.run.pipeline``."""
    fn = {"dms": run_dms, "dms_p": run_dms_p, "dms_fast": run_dms_fast, "baseline": run_baselines,
          "pretrain": run_pretrain}[cfg.run.pipeline]
    return fn(cfg, resume=resume, callback=callback)


def clean_run_dir(path: str | Path) -> None:
    """Delete a run directory dmscale created (its marker); anything else is refused, a locked one too."""
    remove_dmscale_dir(path, "run")
