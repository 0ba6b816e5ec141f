"""Training-framework integrations (top layer): a ``transformers.Trainer`` callback
(:mod:`dmscale.integrations.hf`) and a PyTorch Lightning callback (:mod:`dmscale.integrations.lightning`).

Both do what the three lines of a plain loop do: add the gradient of ``dms.weight * log(R / R_target)``
to the structure parameters once per optimizer step, train those in their own optimizer group
(own learning rate, no weight decay), call ``dms.step()`` after every optimizer step, log the
resource and its target, and at the end project the kept ratios onto the budget, export and save.
Importing this package imports neither ``transformers`` nor ``lightning``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

__all__ = ["structure_lr", "structure_group", "add_param_group_once", "extend_scheduler", "add_resource_grad",
           "finish", "log_values"]


class CallbackState:
    """What both callbacks hold: the search, its options, and the export once training ends."""

    def __init__(self, dms: Any, lr_structure: float | None, save_dir: Any, project: bool,
                 remove_masks: bool) -> None:
        self.dms = dms
        self.lr_structure = lr_structure
        self.save_dir = save_dir
        self.project = project
        self.remove_masks = remove_masks
        self.exported: nn.Module | None = None
        self.projection: Any = None

    def learning_rate(self) -> float:
        """``lr_structure``, or the default for the search's total steps."""
        return self.lr_structure if self.lr_structure is not None else structure_lr(self.dms.schedule.total_steps)


def structure_lr(total_steps: int) -> float:
    """Default learning rate of the kept ratios: ``min(0.1, max(0.005, 2 / steps))`` (the pipelines' rule:
    Adam moves a ratio about ``lr`` per step, so a short run still reaches its target)."""
    return min(0.1, max(0.005, 2.0 / max(1, int(total_steps))))


def structure_group(dms: Any, lr: float) -> dict[str, Any]:
    """An optimizer parameter group for ``dms.structure_parameters()`` (own lr, no weight decay)."""
    if not (math.isfinite(lr) and lr > 0):
        raise ValueError(f"structure learning rate must be a positive finite number, got {lr}")
    return {"params": dms.structure_parameters(), "lr": float(lr), "weight_decay": 0.0, "dmscale": "structure"}


def add_param_group_once(optimizer: Any, dms: Any, lr: float) -> bool:
    """Add the structure group to optimizer unless it is already there; True if added."""
    ids = {id(p) for g in optimizer.param_groups for p in g["params"]}
    params = dms.structure_parameters()
    if all(id(p) in ids for p in params):
        return False
    if any(id(p) in ids for p in params):
        raise ValueError("some structure parameters are already in the optimizer: leave them all out "
                         "(the callback adds its own group)")
    optimizer.add_param_group(structure_group(dms, lr))
    return True


def _constant(_: int) -> float:
    """The structure group's LambdaLR factor: its learning rate stays what the callback set."""
    return 1.0


def extend_scheduler(scheduler: Any, lr: float) -> None:
    """Make an LR scheduler built before the structure group was added carry that group at a constant lr.

    torch schedulers keep one entry per parameter group (``base_lrs``, ``lr_lambdas``, ``min_lrs``) and
    refuse a group added later. LambdaLR (every ``transformers`` schedule) and ReduceLROnPlateau get a
    constant entry; other schedulers (StepLR, ...) scale the group like the others from ``lr``.
    Wrappers (accelerate's ``.scheduler``, SequentialLR / ChainedScheduler) are followed.
    """
    if scheduler is None:
        return
    inner = getattr(scheduler, "scheduler", None)
    if inner is not None and not hasattr(scheduler, "base_lrs"):
        extend_scheduler(inner, lr)
        return
    for child in getattr(scheduler, "_schedulers", None) or []:
        extend_scheduler(child, lr)
    n = len(scheduler.optimizer.param_groups) if hasattr(scheduler, "optimizer") else None
    for attr, val in (("base_lrs", lr), ("_last_lr", lr), ("lr_lambdas", _constant), ("min_lrs", lr)):
        lst = getattr(scheduler, attr, None)
        if isinstance(lst, list) and n is not None and len(lst) == n - 1:
            lst.append(val)


def check_devices(dms: Any, model: nn.Module) -> None:
    """The structure parameters must live where the model's weights are (build DMS after moving the model)."""
    p = next(iter(model.parameters()), None)
    s = next(iter(dms.structure_parameters()), None)
    if p is not None and s is not None and p.device != s.device:
        raise ValueError(f"the model is on {p.device} but the DMS structure parameters are on {s.device}: "
                         "move the model to its device before building dmscale.DMS")


def add_resource_grad(dms: Any) -> dict[str, float]:
    """Backpropagate ``dms.weight * resource_loss`` into the structure parameters (once per optimizer step).

    Adding the task and resource gradients separately equals backpropagating ``dms.loss(task)``
    once per optimizer step, whatever the loss scaling or gradient accumulation of the framework.
    """
    res = dms.resource_loss()
    if res.requires_grad:
        (dms.weight * res).backward()
    return {"resource": dms.last["resource"], "target": dms.last["target"], "resource_loss": float(res.detach()),
            "resource_weight": float(dms.weight)}


def zero_structure_grads(dms: Any) -> None:
    for p in dms.structure_parameters():
        p.grad = None


def finish(dms: Any, save_dir: str | Path | None, *, project: bool = True, check: bool = True,
           remove_masks: bool = False) -> tuple[nn.Module, Any]:
    """Project onto the budget (``dmscale.budget.project``), export, save (when ``save_dir``); (model, projection)."""
    proj = None
    was = dms.model.training
    dms.model.eval()
    try:
        if project:
            proj = dms.land(when="export")  # recorded in dms.projections (and the summary)
        small = dms.export(check=check, project=False)  # projected here, or not at all
    finally:
        dms.model.train(was)
    if save_dir is not None:
        from dmscale.serialization.format import save

        save(small, save_dir)
    if remove_masks:
        dms.remove()
    return small, proj


def log_values(dms: Any) -> dict[str, float]:
    """Resource, target and weight of the last resource-loss evaluation, prefixed ``dms/``."""
    out = {f"dms/{k}": float(v) for k, v in dms.last.items() if k in ("resource", "target", "resource_loss")}
    out["dms/resource_weight"] = float(dms.weight)
    return out


def resource_now(dms: Any) -> float:
    """Hard (exported) resource fraction of the supernet now."""
    with torch.no_grad():
        return float(dms.resource(soft=False)[f"{dms.target.kind}_frac"])
