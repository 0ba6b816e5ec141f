"""Run directories: layout, marker, lock, state, JSONL log and checkpoints of a pipeline run.

Layout (see docs/cli.md)::

    .dmscale             marker ``{"dmscale": "run"}``: dmscale created this directory (only such a directory is
                         ever replaced or deleted; ``dmscale.serialization.dirs``)
    .dmscale.lock        fcntl lock held for the life of a command (a second command fails at once, naming its PID)
    config.yaml          the full config used (reload with --config or --resume)
    log.jsonl            one JSON record per step of every phase (+ eval records)
    state.json           finished phases and their results (what a resume skips)
    checkpoints/<phase>.pt   atomic checkpoints of plain tensors/dicts (loaded with weights_only=True)
    pretrained/ searched/ model/ baselines/<m>/   models saved with dmscale.save
    summary.json report.md *.png

Runs of dmscale < 0.2 have no marker; a directory with ``config.yaml`` and ``state.json`` is one of
them (:func:`is_run_dir`): it resumes, and gets its marker then.

Data order is a pure function of (seed, phase, step), so a resumed phase fast-forwards exactly;
a checkpoint is only restored after it is checked against the run (phase, seed, step, data
position, architecture, optimizer and search state).

Directory safety is ``dmscale.serialization.dirs`` (marker kind ``"run"``, :func:`lock_dir`,
:func:`remove_dmscale_dir`); this module adds what is particular to runs: :func:`is_run_dir` (with
the marker-less layout), :func:`check_output_path`, :func:`clean_run_dir`, :func:`read_state`.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import torch
import torch.nn as nn

from dmscale.app import zoo
from dmscale.app.config import ConfigError, RunConfig, dump_yaml, from_file, validate
from dmscale.recipes.loop import CheckpointError
from dmscale.resources import count
from dmscale.serialization.atomic import read_json_file
from dmscale.serialization.checkpoint import load_checkpoint, save_checkpoint
from dmscale.serialization.dirs import (LOCK_FILE, MARKER_FILE, DirLock, claim_dir, is_dmscale_dir, lock_dir,
                                        remove_dmscale_dir)
from dmscale.serialization.errors import ForeignDirectoryError
from dmscale.serialization.format import atomic_write_text

if TYPE_CHECKING:
    from dmscale.app.datasets import ImageData

__all__ = ["Run", "open_run", "load_run_config", "read_state", "clean_run_dir", "resolve_model_dir", "Batches",
           "evaluate", "PHASE_SALT", "RUN_KIND", "is_run_dir", "enclosing_run_dir", "lock_run_dir",
           "check_output_path"]

Callback = Callable[[str, int], None]
PHASE_SALT = {"pretrain": 1, "search": 2, "retrain": 3, "baseline-uniform": 4, "baseline-l1": 5,
              "baseline-taylor": 6, "reset": 7, "recalibrate": 8, "model": 0}
RUN_KIND = "run"  # the kind in a run directory's marker file


# ----------------------------------------------------------------------------------------- directory safety
def is_run_dir(path: str | os.PathLike[str]) -> bool:
    """A directory dmscale made for a run: the ``run`` marker, or (runs of dmscale < 0.2: no marker at all)
    ``config.yaml`` with ``state.json``. Never follows a symlink."""
    p = Path(path)
    if is_dmscale_dir(p, RUN_KIND):
        return True
    return (not p.is_symlink() and p.is_dir() and not os.path.lexists(p / MARKER_FILE)
            and (p / "config.yaml").is_file() and (p / "state.json").is_file())


def enclosing_run_dir(path: str | os.PathLike[str]) -> Path | None:
    """``path`` itself or its nearest ancestor that is a run directory (:func:`is_run_dir`), else None."""
    p = Path(path).expanduser().absolute()
    return next((d for d in (p, *p.parents) if is_run_dir(d)), None)


def check_output_path(path: str | os.PathLike[str], own_run: str | os.PathLike[str] | None = None,
                      what: str = "--out") -> None:
    """Refuse (:class:`ConfigError` naming ``what``) an output path that is, or lies inside, a run directory
    other than ``own_run``.

    A run's directories (``model/``, ``searched/``, ...) are written by that run's own pipeline only:
    ``dmscale upscale R --out R/model`` would overwrite the run's result and leave it inconsistent.
    """
    p = Path(path).expanduser().absolute()
    own = Path(own_run).expanduser().absolute() if own_run is not None else None
    for d in (p, *p.parents):
        if own is not None and d == own:
            return
        if is_run_dir(d):
            if d == p:
                raise ConfigError(f"{what} {path}: that is the run directory {d}; write the output somewhere else")
            raise ConfigError(f"{what} {path}: that is inside the run directory {d}, which only its own pipeline "
                              "writes; choose a path outside it")


def lock_run_dir(path: str | os.PathLike[str]) -> DirLock:
    """The run directory's lock for one command: another command, in another process or this one, fails at once
    (:class:`~dmscale.serialization.errors.DirLockedError` naming the holder's PID)."""
    return lock_dir(path, what="run directory", reentrant=False)


def clean_run_dir(path: str | os.PathLike[str]) -> None:
    """Delete a run directory for ``--fresh``: only one dmscale created (its marker) and no command is using."""
    remove_dmscale_dir(path, RUN_KIND)


def read_state(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A run's ``state.json`` (a regular JSON file with a ``phases`` table); :class:`ConfigError` naming it otherwise."""
    state = read_json_file(path, what="run state", exc=ConfigError)
    if not isinstance(state.get("phases"), dict):
        raise ConfigError(f"run state {str(path)!r} is corrupted: no 'phases' table")
    return state


# ----------------------------------------------------------------------------------------- data and models
def set_threads(n: int) -> int:
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
def evaluate(model: nn.Module, data: "ImageData", batch_size: int = 500) -> float:
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
    """A run directory held for one command: config, JSONL log, checkpoints, finished-phase state, data.

    Use as a context manager (or call :meth:`close`): the directory's lock is held until then.
    """

    def __init__(self, cfg: RunConfig, run_dir: Path, resume: bool, callback: Callback | None = None,
                 attach: bool = False, allow_over_budget: bool = False) -> None:
        self.cfg = cfg
        self.dir = run_dir
        self.callback = callback
        self.resume = resume
        self.attach = attach
        self.allow_over_budget = bool(allow_over_budget)
        if os.path.lexists(run_dir) and (run_dir.is_symlink() or not run_dir.is_dir()):
            raise ForeignDirectoryError(f"run.out={str(run_dir)!r} exists and is not a directory")
        outer = enclosing_run_dir(Path(run_dir).absolute().parent)
        if outer is not None:
            raise ConfigError(f"run.out={str(run_dir)!r} is inside the run directory {outer}, which only its own "
                              "pipeline writes; choose a directory outside it")
        existing = run_dir.is_dir() and any(p.name not in (LOCK_FILE, MARKER_FILE) for p in run_dir.iterdir())
        if existing and not (resume or attach):
            raise FileExistsError(f"run directory {str(run_dir)!r} is not empty; use --resume {run_dir} to continue "
                                  "it or choose another run.out / --out")
        if existing and not is_run_dir(run_dir):
            raise ForeignDirectoryError(f"{run_dir} is not a dmscale run directory (no {MARKER_FILE} run marker, no "
                                        "config.yaml + state.json); refusing to write into it; choose another --out")
        self._lock = lock_run_dir(run_dir)  # held for the life of the command; creates the directory
        try:
            claim_dir(run_dir, RUN_KIND)  # a new run, or one of dmscale < 0.2 (no marker yet)
            self._open()
        except BaseException:
            self._lock.release()
            raise

    def _open(self) -> None:
        from dmscale.app.datasets import load_dataset

        cfg, run_dir = self.cfg, self.dir
        (run_dir / "checkpoints").mkdir(exist_ok=True)
        if not (run_dir / "config.yaml").exists() or not (self.resume or self.attach):
            atomic_write_text(run_dir / "config.yaml", dump_yaml(cfg))
        self.log_path = run_dir / "log.jsonl"
        self.state = self._read_state()
        self.threads = set_threads(cfg.run.threads)
        d = cfg.data
        t0 = time.time()
        self.data = load_dataset(d.name, root=d.root or None, seed=cfg.run.seed,
                                 limit_train=d.limit_train or None, limit_test=d.limit_test or None)
        self.example = self.data.train.tensors[0][:1].clone()
        self.state["dataset"] = {"name": self.data.name, "source": self.data.source,
                                 "selection": self.data.selection, "train": len(self.data.train),
                                 "test": len(self.data.test), "input_shape": list(self.data.input_shape),
                                 "classes": self.data.num_classes, "load_s": round(time.time() - t0, 2)}
        self.write_state()

    def close(self) -> None:
        """Release the run directory's lock."""
        self._lock.release()

    def __enter__(self) -> "Run":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ---------------------------------------------------------------- state & log
    def _read_state(self) -> dict[str, Any]:
        p = self.dir / "state.json"
        return read_state(p) if os.path.lexists(p) else {"phases": {}}

    def write_state(self) -> None:
        """Write state.json atomically."""
        atomic_write_text(self.dir / "state.json", json.dumps(self.state, indent=1) + "\n")

    def done(self, phase: str) -> dict[str, Any] | None:
        """Results of a finished phase, or None."""
        return self.state["phases"].get(phase)

    def mark_done(self, phase: str, info: dict[str, Any]) -> None:
        """Record a finished phase (a resume skips it) and drop its checkpoint."""
        self.state["phases"][phase] = info
        self.write_state()
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

    def save_ckpt(self, phase: str, step: int, total: int, state: dict[str, Any], batches: Batches) -> None:
        """Atomically write a phase's loop state (``Search.state_dict()`` / ``loop_state``) with its identity:
        phase, step, total steps, seed and data position."""
        epoch, idx = batches.position(step)
        obj = dict(state)
        obj.update({"phase": phase, "step": step,
                    "run": {"seed": self.cfg.run.seed, "pipeline": self.cfg.run.pipeline, "total_steps": total},
                    "data": {"seed": batches.seed, "epoch": epoch, "index": idx, "batch_size": batches.bs}})
        save_checkpoint(self.ckpt_path(phase), obj)

    def load_ckpt(self, phase: str, total: int, batches: Batches) -> dict[str, Any] | None:
        """The checkpoint of an interrupted phase, checked against this run, or None.

        Raises :class:`CheckpointError` naming the file and the disagreement: not a checkpoint, another
        phase, a step outside 1..total or inconsistent with the saved data position, another seed or
        batch size. (Weights, optimizers and search groups are checked when they are restored.)
        """
        p = self.ckpt_path(phase)
        if not p.exists():
            return None
        try:
            ck = load_checkpoint(p)  # names the file: corrupt, empty, not a dict, not a regular file
        except OSError as exc:
            raise CheckpointError(f"checkpoint {str(p)!r} cannot be read: {exc.strerror or exc}") from exc
        where = f"checkpoint {p}"
        if ck.get("phase") != phase:
            raise CheckpointError(f"{where} belongs to phase {ck.get('phase')!r}, not {phase!r}")
        step = ck.get("step")
        if isinstance(step, bool) or not isinstance(step, int) or not 1 <= step <= total:
            raise CheckpointError(f"{where}: step {step!r} is not a step of this phase (1..{total})")
        data = ck.get("data")
        if not isinstance(data, dict):
            raise CheckpointError(f"{where}: key 'data' (seed and data position) is missing")
        run_info = ck.get("run") if isinstance(ck.get("run"), dict) else {}
        seed = run_info.get("seed", self.cfg.run.seed)
        if data.get("seed") != batches.seed or seed != self.cfg.run.seed:
            raise CheckpointError(f"{where} was written by a run with another seed (data seed {data.get('seed')}, "
                                  f"this run's is {batches.seed}); it would mix two runs")
        if data.get("batch_size") != batches.bs:
            raise CheckpointError(f"{where} was written with batch size {data.get('batch_size')}, this run uses "
                                  f"{batches.bs}")
        if (data.get("epoch"), data.get("index")) != batches.position(step):
            raise CheckpointError(f"{where}: step {step} disagrees with the saved data position "
                                  f"(epoch {data.get('epoch')}, batch {data.get('index')})")
        dms = ck.get("dms")
        if isinstance(dms, dict) and dms.get("step") != step:
            raise CheckpointError(f"{where}: step {step} disagrees with the search state's step {dms.get('step')}")
        return ck

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


def open_run(cfg: RunConfig, resume: bool = False, callback: Callback | None = None, attach: bool = False,
             allow_over_budget: bool = False) -> Run:
    """Create (or reopen with ``resume`` / ``attach``) the run directory ``cfg.run.out`` and lock it."""
    validate(cfg)
    return Run(cfg, Path(cfg.run.out), resume, callback, attach=attach, allow_over_budget=allow_over_budget)


def load_run_config(run_dir: str | Path) -> RunConfig:
    """The config a run directory was started with (``config.yaml``); errors name the file and the key."""
    p = Path(run_dir) / "config.yaml"
    if not os.path.lexists(p):
        raise FileNotFoundError(f"{str(run_dir)!r} is not a run directory (no config.yaml)")
    cfg = from_file(p)
    cfg.run.out = str(run_dir)
    return cfg
