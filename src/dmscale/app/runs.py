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

import contextlib
import json
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import torch
import torch.nn as nn

from dmscale.app import zoo
from dmscale.app.config import ConfigError, RunConfig, dump_yaml, from_file, supernet_mults, validate
from dmscale.app.workload import (build_user_model, evaluate_accuracy, evaluate_loss, evaluate_perplexity, make_task,
                                  random_init, text_windows, trusted_packages, user_supernet)
from dmscale.recipes.loop import CheckpointError
from dmscale.recipes.tasks import Task
from dmscale.resources import count
from dmscale.serialization.atomic import read_json_file
from dmscale.serialization.checkpoint import load_checkpoint, save_checkpoint
from dmscale.serialization.dirs import (LOCK_FILE, MARKER_FILE, DirLock, claim_dir, is_dmscale_dir, lock_dir,
                                        remove_dmscale_dir)
from dmscale.serialization.errors import ForeignDirectoryError, LoadError
from dmscale.serialization.format import atomic_write_text, load

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


_NEW_RUN_ENTRIES = ("config.yaml", "state.json", "log.jsonl", MARKER_FILE, LOCK_FILE)


def _discard_new_run(run_dir: Path, keep_dir: bool) -> None:
    """Remove what opening a new run wrote (its lock held) when its data or model turned out bad, so the same
    command can be run again once fixed; the directory itself too unless it existed before (empty)."""
    ck = run_dir / "checkpoints"
    with contextlib.suppress(OSError):
        if ck.is_dir() and not ck.is_symlink() and not any(ck.iterdir()):
            ck.rmdir()
    for name in _NEW_RUN_ENTRIES:
        with contextlib.suppress(OSError):
            (run_dir / name).unlink()
    if not keep_dir:
        with contextlib.suppress(OSError):
            run_dir.rmdir()  # only when empty: anything else that appeared stays


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
    """Training batches as a pure function of (seed, step): epoch permutations from a seeded generator.

    A batch is ``(x, y)``, or ``x`` alone when ``y`` is None (token windows of a language model)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor | None, batch_size: int, seed: int) -> None:
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

    def __call__(self, step: int) -> Any:
        epoch, i = self.position(step)
        idx = self.perm(epoch)[i * self.bs:(i + 1) * self.bs]
        return self.x[idx] if self.y is None else (self.x[idx], self.y[idx])


def evaluate(model: nn.Module, data: "ImageData", batch_size: int = 500) -> float:
    """Top-1 accuracy on the test split (model in eval mode, restored after)."""
    x, y = data.test.tensors
    return evaluate_accuracy(model, x, y, batch_size)


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
        existed = os.path.lexists(run_dir)
        self._lock = lock_run_dir(run_dir)  # held for the life of the command; creates the directory
        try:
            claim_dir(run_dir, RUN_KIND)  # a new run, or one of dmscale < 0.2 (no marker yet)
            self._open()
        except BaseException as exc:
            if not existing and isinstance(exc, (ConfigError, LoadError)):
                _discard_new_run(run_dir, keep_dir=existed)  # bad --data / --model: nothing ran, leave no run behind
            self._lock.release()
            raise

    def _open(self) -> None:
        from dmscale.app.models import ModelSpecError, model_kind

        cfg, run_dir = self.cfg, self.dir
        (run_dir / "checkpoints").mkdir(exist_ok=True)
        if not (run_dir / "config.yaml").exists() or not (self.resume or self.attach):
            atomic_write_text(run_dir / "config.yaml", dump_yaml(cfg))
        self.log_path = run_dir / "log.jsonl"
        self.state = self._read_state()
        self.threads = set_threads(cfg.run.threads)
        self._base: nn.Module | None = None  # the user's model as built/loaded (one load per command)
        try:
            self.model_kind = model_kind(cfg.model.spec) if cfg.model.spec else "builtin"  # factory | dmscale | hf
        except ModelSpecError as exc:
            raise ConfigError(f"model.spec: {exc}") from None
        self._trust: list[str] | None = None
        t0 = time.time()
        self._load_data()
        self.state["dataset"]["load_s"] = round(time.time() - t0, 2)
        self.state["metric"] = self.metric
        if cfg.model.spec:
            self._user_base()  # a model that cannot be built or cannot take the data stops here, before any phase
        self.write_state()

    def _tokenizer(self) -> Any:
        """``data.tokenizer``, else the tokenizer saved with the ``hf:`` / saved model (bytes when it has none)."""
        from dmscale.eval.perplexity import load_tokenizer

        d, m = self.cfg.data, self.cfg.model
        if d.tokenizer:
            return load_tokenizer(d.tokenizer)
        if self.model_kind in ("builtin", "factory"):
            return load_tokenizer("bytes")
        name = m.spec[3:] if m.spec.startswith("hf:") else m.spec  # a directory, or a hub name (the local cache)
        src = Path(name).expanduser()
        return load_tokenizer(None, src if src.is_dir() else name, m.kwargs.get("gguf_file"))

    def _load_data(self) -> None:
        """Load ``data.name`` (built-in set, image folder, ``.npz``, text); errors name the key and the flag."""
        from dmscale.app.datasets import TextData, data_kind, load_data

        cfg, d = self.cfg, self.cfg.data
        try:
            kind = data_kind(d.name)[0]
            tok = self._tokenizer() if kind == "text" else None
            data = load_data(d.name, root=d.root or None, seed=cfg.run.seed, limit_train=d.limit_train or None,
                             limit_test=d.limit_test or None, size=d.size or None, channels=d.channels or None,
                             tokenizer=tok, heldout_fraction=d.heldout_fraction)
        except ConfigError:
            raise
        except (OSError, ValueError, TypeError, ImportError, RuntimeError) as exc:
            raise ConfigError(f"data.name={d.name!r} (--data): {exc}") from None
        self.data = data
        if isinstance(data, TextData):
            self.kind = "text"
            windows = text_windows(data.train, d.seq_len, f"the training text of {d.name}")
            if d.limit_train and d.limit_train < len(windows):
                g = torch.Generator().manual_seed(cfg.run.seed)
                windows = windows[torch.randperm(len(windows), generator=g)[:d.limit_train].sort().values]
            held = data.heldout
            if d.limit_test:
                held = held[:d.limit_test * d.seq_len]
            if held.numel() < 2:
                raise ConfigError(f"data.heldout_fraction={d.heldout_fraction}: the held-out text of {d.name} has "
                                  f"{held.numel()} tokens; the perplexity needs at least 2")
            self.train_x, self.train_y, self.heldout = windows, None, held
            self.example = (windows[:1, :min(d.seq_len, 64)].clone(),)
            self.state["dataset"] = {"name": data.name, "kind": "text", "source": data.source,
                                     "selection": data.selection, "train": len(windows), "test": int(held.numel()),
                                     "seq_len": d.seq_len, "train_tokens": int(data.train.numel()),
                                     "tokenizer": type(getattr(data.tokenizer, "tok", data.tokenizer)).__name__}
        else:
            self.kind = "image"
            self.train_x, self.train_y = data.train.tensors
            self.example = (self.train_x[:1].clone(),)
            self.state["dataset"] = {"name": data.name, "kind": "image", "source": data.source,
                                     "selection": data.selection, "train": len(data.train),
                                     "test": len(data.test), "input_shape": list(data.input_shape),
                                     "classes": data.num_classes}
        self.metric = "loss" if cfg.task.loss else ("ppl" if self.kind == "text" else "acc")

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
        return Batches(self.train_x, self.train_y, self.cfg.data.batch_size,
                       self.cfg.run.seed * 10 + PHASE_SALT.get(phase, 9))

    def meta(self, kind: str) -> dict[str, Any]:
        """Metadata saved with a model (input shape for ``dmscale info``/``upscale``)."""
        out: dict[str, Any] = {"kind": kind, "pipeline": self.cfg.run.pipeline, "dataset": self.data.name}
        if self.cfg.model.spec:
            out["model_spec"] = self.cfg.model.spec
        if self.kind == "image":
            out.update({"input_shape": list(self.data.input_shape), "num_classes": self.data.num_classes})
        else:
            out["seq_len"] = self.cfg.data.seq_len
        return out

    def example_kwargs(self, model: nn.Module) -> dict[str, Any]:
        """Keyword arguments of the traced / counted call (``use_cache=False`` for a Hugging Face language model)."""
        return {"use_cache": False} if self.kind == "text" and getattr(model, "config", None) is not None else {}

    def dms_kwargs(self, model: nn.Module) -> dict[str, Any]:
        """What a ``DMS`` on this run's model needs besides the search config: the call's keyword arguments and,
        for a language model, its embeddings and LM head left unpruned (as ``prune-llm`` does)."""
        kw: dict[str, Any] = {"example_kwargs": self.example_kwargs(model) or None}
        if self.kind == "text":
            from dmscale.recipes.llm import embedding_module_names

            kw["exclude"] = embedding_module_names(model)
        return kw

    def measure(self, model: nn.Module) -> dict[str, float]:
        """FLOPs (per example, 2 per multiply-add) and params."""
        return count(model, self.example, self.example_kwargs(model))

    def task(self, label_smoothing: float = 0.0, teacher: nn.Module | None = None) -> Task:
        """The loss of a phase (see :mod:`dmscale.app.workload`)."""
        return make_task(self.cfg, self.kind, label_smoothing=label_smoothing, teacher=teacher)

    def eval(self, model: nn.Module) -> float:
        """The run's metric on the test split: accuracy, held-out perplexity, or the ``--loss`` mean."""
        bs = self.cfg.data.eval_batch_size
        if self.metric == "acc":
            return evaluate(model, self.data, bs)
        if self.metric == "ppl":
            return evaluate_perplexity(model, self.heldout, self.cfg.data.seq_len)
        if self.kind == "text":
            held = text_windows(self.heldout, min(self.cfg.data.seq_len, self.heldout.numel()), "the held-out text")
            batches: list[Any] = [held[i:i + bs] for i in range(0, len(held), bs)]
        else:
            x, y = self.data.test.tensors
            batches = [(x[i:i + bs], y[i:i + bs]) for i in range(0, len(x), bs)]
        return evaluate_loss(model, self.task(), batches)

    def step_done(self, phase: str, step: int) -> None:
        """User callback after each finished (logged, checkpointed) step."""
        if self.callback is not None:
            self.callback(phase, step)

    # ---------------------------------------------------------------- models
    def check_model(self, model: nn.Module, what: str) -> nn.Module:
        """Run the task's loss once on a training batch: a model that cannot take this data, or a ``--loss``
        that does not return a scalar, stops here with a :class:`ConfigError` naming both."""
        was = model.training
        batch = self.batches("check")(0)
        try:
            with torch.no_grad():
                model.eval()
                self.task().loss(model, batch)
        except ConfigError:
            raise
        except Exception as exc:
            shape = tuple(batch.shape if isinstance(batch, torch.Tensor) else batch[0].shape)
            msg = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ""
            raise ConfigError(f"{what} cannot train on --data {self.cfg.data.name} (data.name; a batch of inputs "
                              f"{shape}): {type(exc).__name__}: {msg}") from None
        finally:
            model.train(was)
        return model

    def _model_name(self) -> str:
        return f"--model {self.cfg.model.spec}" if self.cfg.model.spec else "the built-in ResNet family"

    def _user_base(self) -> nn.Module:
        """The user's model as given (built once per command; a fresh deep copy for each caller)."""
        import copy

        if self._base is None:
            self._base = build_user_model(self.cfg, self.kind, self.cfg.run.seed)
            self.check_model(self._base, self._model_name())
        return copy.deepcopy(self._base)

    def base_model(self) -> nn.Module:
        """The base architecture: the built-in family at multiplier 1 (seeded), or the user's ``--model``."""
        m = self.cfg.model
        if m.spec:
            return self._user_base()
        if self.kind != "image":
            raise ConfigError(f"data.name={self.cfg.data.name!r}: the built-in ResNet family takes images; give a "
                              "language model with --model")
        torch.manual_seed(self.cfg.run.seed)
        return self.check_model(zoo.build(m.widths, m.depths, self.data.input_shape[0], self.data.num_classes,
                                          stem_stride=m.stem_stride), self._model_name())

    def supernet(self) -> nn.Module:
        """The enlarged supernet of ``dmscale search``, random init: the built-in family x the supernet multipliers,
        or the user's model enlarged as :func:`dmscale.app.workload.describe_enlargement` says."""
        m = self.cfg.model
        if m.spec:
            net = user_supernet(self.cfg, self.kind, self._user_base(), self.example, self.cfg.run.seed)
            return self.check_model(net, f"the supernet of {self._model_name()}")
        w, d = supernet_mults(m)
        torch.manual_seed(self.cfg.run.seed)
        return zoo.build(m.widths, m.depths, self.data.input_shape[0], self.data.num_classes,
                         width_mult=w, depth_mult=d, stem_stride=m.stem_stride)

    def trust(self) -> list[str]:
        """Packages the run's own saved models may take classes from (:func:`~dmscale.app.workload.trusted_packages`)."""
        if self._trust is None:
            factory = self.model_kind == "factory"
            self._trust = trusted_packages(self.cfg, self._user_base() if factory else None)
        return self._trust

    def load(self, path: str | os.PathLike[str]) -> nn.Module:
        """A model this run saved (``dmscale.load`` with :meth:`trust`)."""
        return load(path, trust=self.trust() or None)

    def reinit(self, model: nn.Module, seed: int) -> nn.Module:
        """Random re-initialisation (``--reset``, the uniform baseline), reproducible from ``seed``."""
        return random_init(model, seed)


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
