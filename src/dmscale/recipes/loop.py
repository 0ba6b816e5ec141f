"""The one training loop of dmscale: plain training, DMS searches (weights + structure) and fine-tuning.

Every procedure that trains (the image pipelines' pretrain / search / retrain phases, the LLM
recipes' searches and fine-tuning, one-shot baselines' retraining, the benchmarks) runs
:func:`train_loop`. One step is::

    lr <- lr(step)                    (weight optimizer; a pure function of the step, or a scheduler)
    loss, metrics <- loss_fn(model, batches(step))          (under autocast for amp="bf16"/"fp16")
    total <- dms.loss(loss) if dms else loss
    zero_grad; backward (GradScaler-scaled for fp16); optimizer steps; dms.step()
    on_step(record); checkpoint(step) every ``checkpoint_every``; progress; after_step(record)

and the loop stops with :class:`NonFiniteError` at the first non-finite loss, weight or structure
ratio, naming the learning rate and the module whose weights went bad. Nothing about a run
directory lives here: the caller's hooks write logs and checkpoints (:func:`loop_state` /
:func:`load_loop_state` give the state to save and restore, RNG included, for an exact resume).
"""

from __future__ import annotations

import contextlib
import math
import random
import time
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
import torch.nn as nn
from dmscale.serialization.checkpoint import CheckpointError  # one class: unreadable or not this run's

__all__ = ["train_loop", "TrainingError", "NonFiniteError", "CheckpointError", "cosine_lr", "make_optimizer",
           "frozen", "seed_all", "rng_state", "set_rng_state", "loop_state", "load_loop_state", "AMP_MODES"]

AMP_MODES = ("bf16", "fp16")

LossFn = Callable[[nn.Module, Any], "torch.Tensor | tuple[torch.Tensor, dict[str, Any]]"]
Hook = Callable[[dict[str, Any]], None]


class TrainingError(RuntimeError):
    """A training phase cannot go on (the run failed, as opposed to bad input)."""


class NonFiniteError(TrainingError, FloatingPointError):
    """A loss, weight or structure ratio became inf/nan; the message names the learning rate / module."""


# ----------------------------------------------------------------------------------------- small pieces
def cosine_lr(base: float, total: int, warmup: int = 0) -> Callable[[int], float]:
    """Linear warmup then cosine decay to 0: ``lr(step)``, a pure function of the step (nothing to save)."""

    def lr(step: int) -> float:
        if warmup > 0 and step < warmup:
            return base * (step + 1) / warmup
        t = (step - warmup) / max(1, total - warmup)
        return base * 0.5 * (1.0 + math.cos(math.pi * min(1.0, t)))

    return lr


def make_optimizer(params: Iterable[nn.Parameter], kind: str = "sgd", lr: float = 0.1, momentum: float = 0.9,
                   weight_decay: float = 0.0, betas: tuple[float, float] = (0.9, 0.999)) -> torch.optim.Optimizer:
    """``sgd`` (Nesterov when momentum > 0), ``adam`` or ``adamw`` over ``params``."""
    params = list(params)
    if kind == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=momentum > 0)
    if kind == "adam":
        return torch.optim.Adam(params, lr=lr, betas=betas, weight_decay=weight_decay)
    if kind == "adamw":
        return torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=weight_decay)
    raise ValueError(f"optimizer must be 'sgd', 'adam' or 'adamw', got {kind!r}")


@contextlib.contextmanager
def frozen(model: nn.Module) -> Iterator[None]:
    """Temporarily set ``requires_grad=False`` on every parameter (restored after)."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, f in flags:
            p.requires_grad_(f)


def seed_all(seed: int) -> None:
    """Seed torch, python and numpy RNGs."""
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))


def rng_state() -> dict[str, Any]:
    """All RNG states as plain tensors/lists (a checkpoint loadable with ``weights_only=True``)."""
    py = random.getstate()
    nps = np.random.get_state()
    return {"torch": torch.get_rng_state(),
            "python": [int(py[0]), list(py[1]), py[2]],
            "numpy": {"name": str(nps[0]), "keys": torch.from_numpy(np.asarray(nps[1], dtype=np.int64)),
                      "pos": int(nps[2]), "has_gauss": int(nps[3]), "gauss": float(nps[4])}}


def set_rng_state(s: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` captured."""
    torch.set_rng_state(s["torch"])
    random.setstate((s["python"][0], tuple(s["python"][1]), s["python"][2]))
    n = s["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))


# ----------------------------------------------------------------------------------------- checkpoint state
def loop_state(model: nn.Module, optimizers: Sequence[torch.optim.Optimizer], dms: Any = None,
               scaler: Any = None) -> dict[str, Any]:
    """Everything an exact resume needs: weights, optimizer states, search state, GradScaler, RNG states."""
    return {"model": model.state_dict(), "optimizers": [o.state_dict() for o in optimizers],
            "dms": dms.state_dict() if dms is not None else None,
            "scaler": scaler.state_dict() if scaler is not None else None, "rng": rng_state()}


def _need(state: Any, key: str, kind: type | tuple[type, ...], where: str) -> Any:
    if not isinstance(state, dict):
        raise CheckpointError(f"{where}: expected a dict, got {type(state).__name__}")
    if key not in state:
        raise CheckpointError(f"{where}: key {key!r} is missing")
    if not isinstance(state[key], kind):
        raise CheckpointError(f"{where}: {key!r} is a {type(state[key]).__name__}")
    return state[key]


def load_loop_state(state: dict[str, Any], model: nn.Module, optimizers: Sequence[torch.optim.Optimizer],
                    dms: Any = None, scaler: Any = None, where: str = "checkpoint") -> None:
    """Check ``state`` against the model / optimizers / search first, then restore all of it (or nothing).

    Raises :class:`CheckpointError` naming the first disagreement: a missing key, a parameter of
    another shape (another architecture), another number of optimizers, other search groups.
    """
    weights = _need(state, "model", dict, where)
    mine = model.state_dict()
    missing = [k for k in mine if k not in weights]
    extra = [k for k in weights if k not in mine]
    if missing or extra:
        raise CheckpointError(f"{where} holds the weights of another architecture: "
                              + (f"missing {missing[:3]}" if missing else "")
                              + (" " if missing and extra else "") + (f"unexpected {extra[:3]}" if extra else ""))
    for k, v in mine.items():
        w = weights[k]
        if not isinstance(w, torch.Tensor) or tuple(w.shape) != tuple(v.shape):
            got = tuple(w.shape) if isinstance(w, torch.Tensor) else type(w).__name__
            raise CheckpointError(f"{where} holds the weights of another architecture: {k} is {got}, "
                                  f"the model has {tuple(v.shape)}")
    opt_states = _need(state, "optimizers", list, where)
    if len(opt_states) != len(optimizers):
        raise CheckpointError(f"{where} holds {len(opt_states)} optimizer state(s), this phase has {len(optimizers)}")
    for i, (o, st) in enumerate(zip(optimizers, opt_states)):
        groups = _need(st, "param_groups", list, f"{where} optimizer {i}")
        if [len(g.get("params", [])) for g in groups] != [len(g["params"]) for g in o.param_groups]:
            raise CheckpointError(f"{where}: optimizer {i} was saved for other parameters")
    if dms is not None:
        ds = _need(state, "dms", dict, where)
        names = [g.name for g in dms.groups]
        if list(ds.get("groups", [])) != names:
            raise CheckpointError(f"{where} holds the search state of other groups "
                                  f"({len(ds.get('groups', []))} saved, {len(names)} in this search)")
    rng = _need(state, "rng", dict, where)
    for k in ("torch", "python", "numpy"):
        _need(rng, k, (torch.Tensor, list, dict), f"{where} rng")
    try:
        model.load_state_dict(weights)
        for o, st in zip(optimizers, opt_states):
            o.load_state_dict(st)
        if dms is not None:
            dms.load_state_dict(state["dms"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        set_rng_state(rng)
    except (KeyError, ValueError, TypeError, RuntimeError, IndexError) as exc:
        raise CheckpointError(f"{where} cannot be restored: {exc}") from exc


# ----------------------------------------------------------------------------------------- non-finite checks
def _module_of(name: str) -> str:
    """'stages.0.conv1.parametrizations.weight.original' -> 'stages.0.conv1'."""
    if ".parametrizations." in name:
        return name.split(".parametrizations.")[0]
    return name.rsplit(".", 1)[0] if "." in name else (name or "model")


def _lr_text(opt: torch.optim.Optimizer | None) -> str:
    if opt is None:
        return ""
    lrs = sorted({float(g["lr"]) for g in opt.param_groups})
    return "learning rate " + ", ".join(f"{v:g}" for v in lrs)


def _params(opt: torch.optim.Optimizer | None) -> list[torch.Tensor]:
    return [p for g in opt.param_groups for p in g["params"]] if opt is not None else []


def _all_finite(params: list[torch.Tensor]) -> bool:
    """One fused inf-norm per device (inf/nan propagate) and one host sync per device."""
    if not params:
        return True
    per_device: dict[torch.device, list[torch.Tensor]] = {}
    for n in torch._foreach_norm([p.detach() for p in params], float("inf")):
        per_device.setdefault(n.device, []).append(n.float())
    return all(bool(torch.isfinite(torch.stack(ns)).all()) for ns in per_device.values())


def _bad_modules(model: nn.Module) -> list[str]:
    out: list[str] = []
    for name, p in model.named_parameters():
        if not bool(torch.isfinite(p.detach()).all()):
            m = _module_of(name)
            if m not in out:
                out.append(m)
    return out


def _has_nonfinite(batch: Any) -> bool:
    if isinstance(batch, torch.Tensor):
        return batch.is_floating_point() and not bool(torch.isfinite(batch).all())
    if isinstance(batch, dict):
        return any(_has_nonfinite(v) for v in batch.values())
    if isinstance(batch, (list, tuple)):
        return any(_has_nonfinite(v) for v in batch)
    return False


def _nonfinite(desc: str, step: int, what: str, model: nn.Module, opt: torch.optim.Optimizer | None,
               batch: Any = None, amp: str | None = None) -> NonFiniteError:
    """An error that says which step, what went non-finite, the learning rate and the modules to blame."""
    bad = _bad_modules(model)
    lr = _lr_text(opt)
    msg = f"{desc}: {what} at step {step}"
    if bad:
        msg += f"; non-finite weights in {', '.join(repr(b) for b in bad[:3])}" + (" ..." if len(bad) > 3 else "")
    elif batch is not None and _has_nonfinite(batch):
        msg += "; the batch itself holds inf/nan values"
    elif amp == "fp16":
        msg += "; the forward pass overflowed float16 (try amp='bf16' or a smaller learning rate)"
    if lr:
        msg += f" ({lr})"
    return NonFiniteError(msg)


# ----------------------------------------------------------------------------------------- the loop
def _autocast(model: nn.Module, amp: str | None) -> contextlib.AbstractContextManager:
    if amp is None:
        return contextlib.nullcontext()
    if amp not in AMP_MODES:
        raise ValueError(f"amp must be None, 'bf16' or 'fp16', got {amp!r}")
    p = next(iter(model.parameters()), None)
    dev = p.device.type if p is not None else "cpu"
    return torch.autocast(dev, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


def _batch_source(batches: Any) -> Callable[[int], Any]:
    if callable(batches):
        return batches
    if isinstance(batches, Iterator):
        return lambda step: next(batches)
    if isinstance(batches, Iterable):
        it = iter(batches)
        return lambda step: next(it)
    raise TypeError(f"batches must be a callable step -> batch or an iterable, got {type(batches).__name__}")


def train_loop(model: nn.Module, batches: Callable[[int], Any] | Iterable[Any], loss_fn: LossFn, steps: int, *,
               start: int = 0, weight_optimizer: torch.optim.Optimizer | None = None,
               structure_optimizer: torch.optim.Optimizer | None = None, dms: Any = None,
               lr: Callable[[int], float] | Any = None, amp: str | None = None, scaler: Any = None,
               on_step: Hook | None = None, checkpoint: Callable[[int], None] | None = None,
               checkpoint_every: int = 0, after_step: Hook | None = None, progress: bool = False,
               desc: str = "train", postfix: Callable[[dict[str, Any]], dict[str, str]] | None = None,
               check_finite: bool = True) -> list[dict[str, Any]]:
    """Run steps ``start .. steps-1``; returns one record per step.

    Args:
        batches: ``batches(step) -> batch`` (a pure function of the step gives an exact resume), or an
            iterable of batches.
        loss_fn: ``loss_fn(model, batch) -> loss`` or ``(loss, metrics)``; metrics (floats) go into the
            record. With ``dms`` the optimised loss is ``dms.loss(loss)``.
        weight_optimizer / structure_optimizer: either may be None (DMS_fast has no weight optimizer,
            plain training no structure optimizer).
        lr: ``lr(step) -> float`` set on every group of the weight optimizer before the step, or an LR
            scheduler stepped after it.
        amp: None, ``"bf16"`` (autocast) or ``"fp16"`` (autocast + ``torch.amp.GradScaler``, attached to
            ``dms`` so importance uses unscaled gradients; pass ``scaler`` to keep its state across resumes).
        on_step: called with each record after the optimizer and ``dms`` steps (write a log line, evaluate;
            it may add keys shown by ``postfix``). ``checkpoint(step)`` runs every ``checkpoint_every``
            steps (not after the last one), then ``after_step(record)``.
        progress: a tqdm bar (imported only then) titled ``desc``; ``postfix(record)`` gives its fields.
        check_finite: stop with :class:`NonFiniteError` at the first non-finite loss, weight or ratio.

    A record holds ``step`` (1-based), ``loss`` (the task loss), ``lr`` (weight optimizer, else None),
    the metrics, ``seconds``, and with ``dms``: ``resource``, ``target``, ``resource_loss``.
    """
    steps, start = int(steps), int(start)
    if not 0 <= start <= steps:
        raise ValueError(f"{desc}: start step {start} is outside 0..{steps}")
    get = _batch_source(batches)
    opts = [o for o in (weight_optimizer, structure_optimizer) if o is not None]
    if amp == "fp16" and scaler is None:
        p = next(iter(model.parameters()), None)
        scaler = torch.amp.GradScaler(p.device.type if p is not None else "cpu")
    if scaler is not None and dms is not None:
        dms.attach_grad_scaler(scaler)
    schedule = lr if callable(lr) and not hasattr(lr, "step") else None
    scheduler = lr if hasattr(lr, "step") else None
    weights = _params(weight_optimizer)
    history: list[dict[str, Any]] = []
    bar: Any = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=steps, initial=start, desc=desc, dynamic_ncols=True, leave=True)
    try:
        for step in range(start, steps):
            t0 = time.perf_counter()
            cur_lr = None
            if schedule is not None and weight_optimizer is not None:
                cur_lr = float(schedule(step))
                for g in weight_optimizer.param_groups:
                    g["lr"] = cur_lr
            elif weight_optimizer is not None:
                cur_lr = float(weight_optimizer.param_groups[0]["lr"])
            batch = get(step)
            with _autocast(model, amp):
                out = loss_fn(model, batch)
            loss, metrics = out if isinstance(out, tuple) else (out, {})
            value = float(loss.detach())
            if check_finite and not math.isfinite(value):
                raise _nonfinite(desc, step + 1, f"the loss is {value}", model, weight_optimizer, batch, amp)
            total = dms.loss(loss) if dms is not None else loss
            for o in opts:
                o.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(total).backward()
                for o in opts:
                    scaler.step(o)
                scaler.update()
            else:
                total.backward()
                for o in opts:
                    o.step()
            if scheduler is not None:
                scheduler.step()
            if check_finite and not _all_finite(weights):
                raise _nonfinite(desc, step + 1, "the weights became non-finite after the optimizer step", model,
                                 weight_optimizer)
            if dms is not None:
                try:
                    dms.step()
                except FloatingPointError as exc:
                    lr_s = _lr_text(structure_optimizer)
                    raise NonFiniteError(f"{desc}: {exc} at step {step + 1}" + (f" (structure {lr_s})" if lr_s
                                                                                  else "")) from exc
            rec: dict[str, Any] = {"step": step + 1, "loss": value, "lr": cur_lr}
            rec.update({k: float(v) if isinstance(v, torch.Tensor) else v for k, v in metrics.items()})
            if dms is not None:
                rec.update({k: dms.last[k] for k in ("resource", "target", "resource_loss") if k in dms.last})
            rec["seconds"] = time.perf_counter() - t0
            if on_step is not None:
                on_step(rec)
            if checkpoint is not None and checkpoint_every > 0 and (step + 1) % checkpoint_every == 0 \
                    and step + 1 < steps:
                checkpoint(step + 1)
            if bar is not None:
                bar.update(1)
                post = postfix(rec) if postfix is not None else _default_postfix(rec)
                bar.set_postfix(post, refresh=False)
            history.append(rec)
            if after_step is not None:
                after_step(rec)
    finally:
        if bar is not None:
            bar.close()
    return history


def _default_postfix(rec: dict[str, Any]) -> dict[str, str]:
    out = {"loss": f"{rec['loss']:.3f}"}
    if "resource" in rec:
        out["res"] = f"{rec['resource']:.3f}/{rec['target']:.3f}"
    return out
