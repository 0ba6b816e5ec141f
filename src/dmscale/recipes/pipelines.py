"""DMS, DMS_p and DMS_fast as recipes, parameterised by task (image classification, causal LM, a user's loss).

The three differ only in where they start and what the search may change:

=========  ===========================  ======================  ==============================
recipe     starts from                  the search trains        afterwards
=========  ===========================  ======================  ==============================
DMS        an enlarged, random supernet weights + structure      export, retrain (``finetune_steps``)
DMS_p      a pretrained model           weights + structure      export, fine-tune
DMS_fast   a pretrained model           structure only (frozen)  export (no weight update at all)
=========  ===========================  ======================  ==============================

:class:`Search` is one resumable search (the DMS, its optimizers, :func:`train_loop`), used by the
recipes below, by the image pipelines of the app (which add a run directory, logs and
checkpoints through the loop's hooks) and by the LLM recipes. :func:`finish` projects the kept
ratios onto the exact budget (:func:`dmscale.budget.project`), optionally re-estimates BatchNorm
statistics, and exports.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any, Callable, ContextManager

import torch
import torch.nn as nn

from dmscale.budget import Projection, within_budget
from dmscale.latency import measure_export
from dmscale.recipes.bn import batchnorms, recalibrate_bn
from dmscale.recipes.loop import cosine_lr, frozen, load_loop_state, loop_state, make_optimizer, train_loop
from dmscale.recipes.tasks import Task, as_task
from dmscale.schedule import Target
from dmscale.search import DMS

__all__ = ["Search", "OverBudgetError", "finish", "projection_info", "finetune", "dms", "dms_p", "dms_fast", "auto_structure_lr"]

Batches = Callable[[int], Any]


class OverBudgetError(RuntimeError):
    """The exported model is larger than the target (the projection could not reach it)."""


def auto_structure_lr(steps: int) -> float:
    """Structure learning rate by default: Adam moves a ratio about lr per step, so ~2 / steps, in [0.005, 0.1]."""
    return min(0.1, max(0.005, 2.0 / max(1, int(steps))))


class Search:
    """One DMS search: the ``DMS``, a weight optimizer (unless the weights are frozen), a structure optimizer.

    Args:
        dms: the search (a ``dmscale.DMS``; its ``total_steps`` is the number of steps).
        train_weights: False for DMS_fast: no weight optimizer, every weight frozen during :meth:`run`.
        weight_optimizer: an optimizer, or a factory ``f(params) -> optimizer`` (default: SGD lr 0.1).
        lr: the weight learning rate ``lr(step)`` (or a scheduler); default: constant.
        structure_optimizer: ``"adam"`` (default), ``"sgd"`` (momentum 0.9) or an optimizer.
        structure_lr: default :func:`auto_structure_lr`.
        amp: None, ``"bf16"`` or ``"fp16"`` (a GradScaler is kept in ``self.scaler`` and saved in the state).
    """

    def __init__(self, dms: DMS, *, train_weights: bool = True,
                 weight_optimizer: torch.optim.Optimizer | Callable[[list], torch.optim.Optimizer] | None = None,
                 lr: Callable[[int], float] | Any = None, structure_optimizer: str | torch.optim.Optimizer = "adam",
                 structure_lr: float | None = None, amp: str | None = None) -> None:
        self.dms = dms
        self.model = dms.model
        self.train_weights = bool(train_weights)
        self.steps = dms.schedule.total_steps
        self.lr = lr
        self.amp = amp
        self.wopt: torch.optim.Optimizer | None = None
        if self.train_weights:
            params = dms.weight_parameters()
            if isinstance(weight_optimizer, torch.optim.Optimizer):
                self.wopt = weight_optimizer
            elif callable(weight_optimizer):
                self.wopt = weight_optimizer(params)
            else:
                self.wopt = make_optimizer(params, "sgd", lr=0.1)
        if isinstance(structure_optimizer, torch.optim.Optimizer):
            self.sopt = structure_optimizer
        else:
            slr = structure_lr if structure_lr else auto_structure_lr(self.steps)
            if structure_optimizer == "adam":
                self.sopt = torch.optim.Adam(dms.structure_parameters(), lr=slr)
            elif structure_optimizer == "sgd":
                self.sopt = torch.optim.SGD(dms.structure_parameters(), lr=slr, momentum=0.9)
            else:
                raise ValueError(f"structure_optimizer must be 'adam', 'sgd' or an optimizer, got "
                                 f"{structure_optimizer!r}")
        self.scaler = None
        if amp == "fp16":
            p = next(iter(self.model.parameters()), None)
            self.scaler = torch.amp.GradScaler(p.device.type if p is not None else "cpu")

    @property
    def optimizers(self) -> list[torch.optim.Optimizer]:
        """Weight optimizer (if any) then structure optimizer: the order of a saved state."""
        return [o for o in (self.wopt, self.sopt) if o is not None]

    def state_dict(self) -> dict[str, Any]:
        """Model, optimizers, search, GradScaler and RNG states (plain tensors: ``weights_only`` loadable)."""
        return loop_state(self.model, self.optimizers, self.dms, self.scaler)

    def load_state_dict(self, state: dict[str, Any], where: str = "checkpoint") -> None:
        """Restore a :meth:`state_dict` after checking it fits (``CheckpointError`` naming what does not)."""
        load_loop_state(state, self.model, self.optimizers, self.dms, self.scaler, where=where)

    def run(self, task: Task | Callable, batches: Batches, *, start: int = 0, train_mode: bool = True,
            **hooks: Any) -> list[dict[str, Any]]:
        """Search steps ``start .. steps-1`` (:func:`train_loop`; ``hooks``: on_step, checkpoint,
        checkpoint_every, after_step, progress, desc, postfix). ``train_mode``: BatchNorm / dropout in
        training mode during the search (DMS_fast on CNNs keeps BN in train mode with frozen weights)."""
        hooks.setdefault("desc", "search")
        ctx: ContextManager = frozen(self.model) if not self.train_weights else contextlib.nullcontext()
        self.model.train(train_mode)
        with ctx:
            return train_loop(self.model, batches, as_task(task), self.steps, start=start,
                              weight_optimizer=self.wopt, structure_optimizer=self.sopt, dms=self.dms, lr=self.lr,
                              amp=self.amp, scaler=self.scaler, **hooks)


def projection_info(p: Projection) -> dict[str, Any]:
    """A projection as plain data: target, resource before/after (fractions of the supernet), how far it moved the
    resource (``moved``, relative) and the allocation (``shift``: mean |change| / size over the groups; the groups
    changed), whether it landed within tolerance."""
    return {"kind": p.kind, "target": p.target, "before": p.before, "after": p.after, "offset": p.offset,
            "moved": p.moved, "shift": p.shift, "groups_changed": len(p.changes), "tier": p.tier, "ok": p.ok}


def finish(dms: DMS, *, project_budget: bool = True, recalibrate: Callable[[nn.Module], None] | None = None,
           check: bool = True, atol: float = 1e-4, rtol: float = 1e-4,
           ratios: Callable[[DMS], ContextManager] | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """Project onto the exact budget, recalibrate BN of the hard-masked model, export; returns (model, info).

    ``recalibrate(model)`` runs under ``dms.hard()`` (e.g. BatchNorm statistics of the found network;
    ``recipes/bn.py``'s ``recalibrate_bn`` is meant for it). ``ratios(dms)`` is a context manager
    around the export that may change the ratios (the LLM recipes' uniform export). Info: projection
    (:func:`projection_info`), kept, summary, flops_frac, params_frac (latency_frac), target (kind, fraction of
    the supernet), achieved (the target kind's fraction), over_budget; a latency target adds ``latency``
    (target_s, predicted_s, supernet_s, device, batch_size; measured_s and checks when the export was timed:
    under ``ratios``, measured_s is that of the export the ratios give, timed once more).
    """
    info: dict[str, Any] = {}
    if project_budget:
        p = dms.land(when="export", warn=False)  # recorded in dms.projections (and the summary)
        info["projection"] = projection_info(p)
    if recalibrate is not None:
        with dms.hard():
            recalibrate(dms.model)
    ctx = ratios(dms) if ratios is not None else contextlib.nullcontext()
    with ctx:
        with torch.no_grad():
            r = dms.resource(soft=False)
        kind, goal = dms.target.kind, dms.target_fraction
        info.update({"kept": dms.kept(), "summary": dms.summary(),
                     **{f"{k}_frac": float(r[f"{k}_frac"]) for k in dms.resources.kinds()},
                     "target": {"kind": kind, "fraction": goal}, "achieved": float(r[f"{kind}_frac"]),
                     "over_budget": not within_budget(r[f"{kind}_frac"], goal)})
        if kind == "latency":
            info["latency"] = {"target_s": float(dms.target.latency), "predicted_s": float(r["latency"]),
                               "supernet_s": float(dms.resources.full["latency"]),
                               "device": dms.latency_model.device, "batch_size": dms.latency_model.batch_size}
            if dms.latency_checks:  # what the export measured when it was landed (latency.land_measured)
                kept = [c for c in dms.latency_checks if c.get("kept")] or dms.latency_checks
                info["latency"]["measured_s"] = float(kept[-1]["measured_s"])
                info["latency"]["checks"] = len(dms.latency_checks)
                if ratios is not None:  # the ratios changed the landed structure: time the export they give
                    info["latency"]["measured_s"] = float(measure_export(dms))
        exported = dms.export(check=check, atol=atol, rtol=rtol, project=False)  # projected above, or not at all
    return exported, info


def finetune(model: nn.Module, task: Task | Callable, batches: Batches, steps: int, *, lr: float = 1e-3,
             optimizer: str | Callable[[list], torch.optim.Optimizer] = "adamw", weight_decay: float = 0.0,
             momentum: float = 0.9, schedule: str = "constant", warmup: int = 0, amp: str | None = None,
             **hooks: Any) -> list[dict[str, Any]]:
    """Train every trainable weight of ``model`` for ``steps`` (the retrain / fine-tune phase); history.

    ``schedule``: ``constant`` or ``cosine`` (linear ``warmup`` then cosine to 0).
    """
    if steps <= 0:
        return []
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("finetune: every parameter has requires_grad=False")
    opt = optimizer(params) if callable(optimizer) else make_optimizer(params, optimizer, lr, momentum, weight_decay)
    if schedule not in ("constant", "cosine"):
        raise ValueError(f"schedule must be 'constant' or 'cosine', got {schedule!r}")
    sched = cosine_lr(lr, steps, warmup) if schedule == "cosine" else None
    hooks.setdefault("desc", "fine-tune")
    was = model.training
    model.train()
    try:
        return train_loop(model, batches, as_task(task), steps, weight_optimizer=opt, lr=sched, amp=amp, **hooks)
    finally:
        model.train(was)


Builder = Callable[[nn.Module, tuple, Target, int], DMS]


def _search_export(model: nn.Module, task: Task | Callable, batches: Batches, target: Target, steps: int, *,
                   train_weights: bool, lr: float, optimizer: str | Callable, desc: str,
                   lr_schedule: Callable[[int], float] | Any = None, structure_lr: float | None = None,
                   structure_optimizer: str = "adam", amp: str | None = None, train_mode: bool = True,
                   project_budget: bool = True,
                   recalibrate: Callable[[nn.Module], None] | None = None, check: bool = True, atol: float = 1e-4,
                   rtol: float = 1e-4, progress: bool = False, dms_kwargs: dict[str, Any] | None = None,
                   builder: Builder | None = None, example: tuple | None = None,
                   ratios: Callable[[DMS], ContextManager] | None = None, remove: bool = True,
                   callback: Callable[[dict[str, Any]], None] | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """Build the DMS (traced on ``example``, default: the task's example from ``batches(0)``), search, finish
    (project, recalibrate, export); the masks come out unless ``remove=False`` (then ``info['dms']`` holds
    the search, e.g. for another export)."""
    t = as_task(task)
    ex = tuple(example) if example is not None else t.example(batches(0))
    if builder is not None:
        d = builder(model, ex, target, steps)
    else:
        kw = {"example_kwargs": t.example_kwargs(model) or None, "warn": False}
        kw.update(dms_kwargs or {})
        d = DMS(model, ex, target, steps, **kw)
    wopt = optimizer if callable(optimizer) else (lambda ps: make_optimizer(ps, optimizer, lr))
    s = Search(d, train_weights=train_weights, weight_optimizer=wopt, lr=lr_schedule,
               structure_optimizer=structure_optimizer, structure_lr=structure_lr, amp=amp)
    was = model.training
    done = False
    try:
        history = s.run(t, batches, train_mode=train_mode, progress=progress, desc=desc, on_step=callback)
        del s  # the weight optimizer's state is not needed for the export
        model.eval()
        exported, info = finish(d, project_budget=project_budget, recalibrate=recalibrate, check=check, atol=atol,
                                rtol=rtol, ratios=ratios)
        done = True
    finally:
        if remove or not done:
            d.remove()
        model.train(was)
    info["history"] = history
    if not remove:
        info["dms"] = d
    return exported, info


def dms_fast(model: nn.Module, task: Task | Callable, batches: Batches, target: Target, steps: int, *,
             train_mode: bool = True, bn_batches: int = 20, **options: Any) -> tuple[nn.Module, dict[str, Any]]:
    """DMS_fast: learn only the structure of a trained ``model`` (weights frozen), export.

    ``batches(step)`` feeds ``task``; ``train_mode`` keeps BatchNorm in training mode (batch statistics)
    as the method prescribes for CNNs, so the BatchNorm running statistics the search leaves behind are
    those of the shrinking soft supernet: when the model has BatchNorm, they are re-estimated for the found
    network (hard masks) from ``batches(0 .. bn_batches-1)`` before it is exported
    (:func:`dmscale.recipes.bn.recalibrate_bn`; ``bn_batches=0`` turns it off; a ``recalibrate`` callable
    replaces it). Other options (all keyword): ``structure_lr``, ``structure_optimizer``,
    ``amp``, ``project_budget``, ``check``, ``atol``, ``rtol``, ``progress``,
    ``dms_kwargs`` (for ``DMS``), ``example`` (inputs to trace), ``builder(model, example, target, steps)
    -> DMS``, ``ratios``, ``remove``, ``callback(record)``. Returns ``(exported, info)`` with the search
    ``history`` and ``bn_recalibrated`` (batches used; 0 when not).
    """
    if isinstance(bn_batches, bool) or not isinstance(bn_batches, int) or bn_batches < 0:
        raise ValueError(f"bn_batches must be an integer >= 0 (0 = no BatchNorm recalibration), got {bn_batches!r}")
    t0 = time.perf_counter()
    recal = bn_batches if options.get("recalibrate") is None and bn_batches and batchnorms(model) else 0
    if recal:
        options["recalibrate"] = lambda m: recalibrate_bn(m, batches, recal)
    exported, info = _search_export(model, task, batches, target, steps, train_weights=False, lr=0.0,
                                    optimizer="sgd", train_mode=train_mode, desc="DMS_fast", **options)
    info.update({"pipeline": "DMS_fast", "steps": steps, "seconds": time.perf_counter() - t0,
                 "bn_recalibrated": recal})
    return exported, info


def _search_then_finetune(name: str, model: nn.Module, task: Task | Callable, batches: Batches, target: Target,
                          steps: int, finetune_steps: int, finetune_batches: Batches | None, lr: float,
                          finetune_lr: float | None, optimizer: str | Callable,
                          options: dict[str, Any]) -> tuple[nn.Module, dict]:
    t0 = time.perf_counter()
    exported, info = _search_export(model, task, batches, target, steps, train_weights=True, lr=lr,
                                    optimizer=optimizer, desc=f"{name} search", **options)
    for p in exported.parameters():
        p.requires_grad_(True)
    info["finetune"] = finetune(exported, task, finetune_batches or batches, finetune_steps,
                                lr=lr if finetune_lr is None else finetune_lr, optimizer=optimizer,
                                amp=options.get("amp"), progress=options.get("progress", False),
                                desc=f"{name} fine-tune")
    exported.eval()
    info.update({"pipeline": name, "steps": steps, "finetune_steps": finetune_steps,
                 "seconds": time.perf_counter() - t0})
    return exported, info


def dms_p(model: nn.Module, task: Task | Callable, batches: Batches, target: Target, steps: int, *,
          finetune_steps: int = 0, finetune_batches: Batches | None = None, lr: float = 1e-3,
          finetune_lr: float | None = None, optimizer: str | Callable = "adamw",
          **options: Any) -> tuple[nn.Module, dict[str, Any]]:
    """DMS_p: search weights and structure of a pretrained ``model`` (trained in place), export, fine-tune.

    ``optimizer`` (``sgd`` / ``adam`` / ``adamw`` or a factory ``f(params)``) at ``lr`` trains the weights in
    the search and the fine-tuning (``finetune_lr`` if given, ``finetune_batches`` if given);
    ``lr_schedule(step)`` (or a scheduler) varies it during the search. Options as :func:`dms_fast`,
    plus ``train_mode``. Returns ``(exported, info)``; info holds the search
    ``history`` and the ``finetune`` history.
    """
    return _search_then_finetune("DMS_p", model, task, batches, target, steps, finetune_steps, finetune_batches,
                                 lr, finetune_lr, optimizer, options)


def dms(supernet: nn.Module, task: Task | Callable, batches: Batches, target: Target, steps: int, *,
        retrain_steps: int = 0, retrain_batches: Batches | None = None, lr: float = 0.1,
        retrain_lr: float | None = None, optimizer: str | Callable = "sgd",
        **options: Any) -> tuple[nn.Module, dict[str, Any]]:
    """DMS: search weights and structure of an enlarged random-init ``supernet``, export, retrain.

    ``target`` is a fraction of the supernet. Options as :func:`dms_p`. Returns ``(exported, info)``
    (info: ``history``, ``finetune`` = the retraining history).
    """
    return _search_then_finetune("DMS", supernet, task, batches, target, steps, retrain_steps, retrain_batches,
                                 lr, retrain_lr, optimizer, options)
