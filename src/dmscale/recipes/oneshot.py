"""One-shot pruning (the classic baseline): rank elements once, one kept ratio for every layer, export.

The ranking is ``l1`` (L1 norm of the weights each element owns, through composite dims such as
heads x head_dim: :func:`l1_importance`; ``magnitude`` is the same), ``taylor`` ((m * dL/dm)^2 of
each element's mask, moving average over calibration batches, weights frozen, the model in eval
mode) or ``random``. The common ratio is the largest one whose exported (hard) resource meets the
target (:func:`common_ratio`, the one common-ratio search, on :func:`dmscale.budget.bisect_max`).
Masks are made sharp first, so the calibration sees exactly the unpruned model and no soft mask
value is folded into the kept weights.

BN: the unpruned model's BatchNorm statistics no longer describe the pruned network (its inputs lost
channels). When the model has BatchNorm and calibration ``batches`` are given, :func:`oneshot`
re-estimates them on the export from ``bn_batches`` batches (:func:`dmscale.recipes.bn.recalibrate_bn`;
``bn_batches=0`` keeps the unpruned statistics of the kept channels).
"""

from __future__ import annotations

import time
from typing import Any, Callable, Iterable

import torch
import torch.nn as nn

from dmscale.budget import EXACT, bisect_max, hard_fraction
from dmscale.recipes.bn import batchnorms, recalibrate_bn
from dmscale.recipes.loop import frozen
from dmscale.recipes.tasks import Task, as_task
from dmscale.schedule import Target
from dmscale.search import DMS
from dmscale.space import leaf_index

__all__ = ["ONESHOT_METHODS", "oneshot_prune", "oneshot", "rank", "common_ratio", "width_groups", "l1_importance"]

ONESHOT_METHODS = ("l1", "taylor", "random")
_ALIASES = {"magnitude": "l1"}
SHARP = 1e4  # lam = SHARP * size: a mask is exactly 0 or 1 in float32


def _method(method: str) -> str:
    m = _ALIASES.get(method, method)
    if m not in ONESHOT_METHODS:
        raise ValueError(f"method must be one of {ONESHOT_METHODS + tuple(_ALIASES)}, got {method!r}")
    return m


def width_groups(dms: DMS) -> list:
    """The groups a common ratio applies to: every width / heads / head_dim group (not depth)."""
    return [g for g in dms.groups if g.kind != "depth"]


def _raw(module: nn.Module, attr: str) -> torch.Tensor | None:
    """The unmasked tensor of ``module.attr`` (under a dmscale mask parametrization: the original)."""
    par = getattr(module, "parametrizations", None)
    if par is not None and attr in par:
        return par[attr].original
    t = getattr(module, attr, None)
    return t if isinstance(t, torch.Tensor) else None


@torch.no_grad()
def l1_importance(dms: DMS, groups: Iterable | None = None) -> None:
    """Set each element's importance to the L1 norm of all the (unmasked) weights it owns.

    A weight dimension that is a composite space (e.g. a fused qkv output = 3 x heads x head_dim)
    adds each of its slices to the element it belongs to (:func:`dmscale.space.leaf_index`).
    """
    mods = dict(dms.model.named_modules())
    for g in (width_groups(dms) if groups is None else groups):
        if g.space is None:
            continue
        leaf = g.space.find()
        imp = torch.zeros(g.size, dtype=torch.float64)
        for rec in dms.trace.params.values():
            p = None if rec.is_buffer else _raw(mods[rec.module], rec.attr)
            if p is None:
                continue
            for d, sp in enumerate(rec.dims):
                if not any(lf is leaf for lf in sp.leaves()):
                    continue
                idx = leaf_index(sp, leaf)
                per = p.detach().abs().double().movedim(d, 0).reshape(p.shape[d], -1).sum(1).cpu()
                keep = idx >= 0
                imp.index_add_(0, idx[keep], per[keep])
        dms.space.importance(g).copy_(imp.to(dms.space.importance(g)))


@torch.no_grad()
def common_ratio(dms: DMS, fraction: float | None = None, kind: str | None = None, *,
                 groups: Iterable | None = None, iters: int = 40) -> float:
    """Give every group of ``groups`` (default: :func:`width_groups`) one kept ratio r, the largest with
    hard resource <= ``fraction`` (default: the DMS target); sets it and returns r."""
    kind = kind or dms.target.kind
    goal = float(dms.target.fraction if fraction is None else fraction)
    gs = list(width_groups(dms) if groups is None else groups)

    def apply(r: float) -> float:
        for g in gs:
            dms.space.ratio(g).fill_(min(max(r, g.min_ratio()), g.bounds.max_ratio))
        return hard_fraction(dms, kind)

    r = bisect_max(apply, goal * (1 + EXACT), 0.0, 1.0, iters=iters)
    apply(r)
    return r


def rank(dms: DMS, method: str, *, task: Task | Callable | None = None, batches: Callable[[int], Any] | None = None,
         n_batches: int = 20, seed: int = 0, groups: Iterable | None = None, progress: bool = False) -> None:
    """Fill ``dms.space.importance`` of ``groups`` (default: width groups) by ``method``.

    ``taylor`` runs ``n_batches`` backward passes of ``task`` on ``batches(i)``; call it with the masks
    at full keep (as :func:`oneshot` does) so the gradients are those of the unpruned model.
    """
    method = _method(method)
    gs = list(width_groups(dms) if groups is None else groups)
    if method == "l1":
        l1_importance(dms, gs)
    elif method == "random":
        gen = torch.Generator().manual_seed(int(seed))
        with torch.no_grad():
            for g in gs:
                imp = dms.space.importance(g)
                imp.copy_(torch.rand(g.size, generator=gen).to(imp))
    else:
        if task is None or batches is None:
            raise ValueError("taylor ranking needs a task (loss) and calibration batches")
        if dms.importance.method == "l1":
            raise ValueError("taylor ranking needs a DMS built with a gradient importance (importance='taylor')")
        fn = as_task(task)
        with torch.no_grad():
            for g in gs:
                dms.space.importance(g).zero_()
        it: Any = range(int(n_batches))
        if progress:
            from tqdm.auto import tqdm

            it = tqdm(it, desc="Taylor importance", leave=False)
        for i in it:
            loss, _ = fn(dms.model, batches(i))
            loss.backward()
        for p in dms.structure_parameters():
            p.grad = None


def oneshot(dms: DMS, method: str, *, task: Task | Callable | None = None,
            batches: Callable[[int], Any] | None = None, n_batches: int = 20, seed: int = 0,
            check: bool = True, atol: float = 1e-4, rtol: float = 1e-4, progress: bool = False,
            remove: bool = True, bn_batches: int = 20) -> tuple[nn.Module, dict[str, Any]]:
    """Rank, set one common ratio meeting ``dms.target``, export; ``remove`` takes the masks out after.

    ``bn_batches``: when the model has BatchNorm and ``batches`` are given, the export's BatchNorm statistics
    are re-estimated from ``batches(0 .. bn_batches-1)`` (0: off). Returns ``(exported, info)``; info: method,
    ratio, kept, summary, flops_frac, params_frac, bn_recalibrated (batches used, 0 when not), seconds.
    """
    if isinstance(bn_batches, bool) or not isinstance(bn_batches, int) or bn_batches < 0:
        raise ValueError(f"bn_batches must be an integer >= 0 (0 = no BatchNorm recalibration), got {bn_batches!r}")
    t0 = time.perf_counter()
    method = _method(method)
    model = dms.model
    gs = width_groups(dms)
    if not gs:
        raise ValueError("one-shot pruning found no width/head group to prune")
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            for g in gs:
                g.lam = SHARP * g.size
                dms.space.ratio(g).fill_(1.0)  # with sharp masks: exactly the unpruned model
        with frozen(model):
            rank(dms, method, task=task, batches=batches, n_batches=n_batches, seed=seed, groups=gs,
                 progress=progress)
        r = common_ratio(dms, groups=gs)
        with torch.no_grad():
            res = dms.resource(soft=False)
        info: dict[str, Any] = {"method": method, "ratio": r, "kept": dms.kept(), "summary": dms.summary(),
                                "flops_frac": float(res["flops_frac"]), "params_frac": float(res["params_frac"])}
        exported = dms.export(check=check, atol=atol, rtol=rtol)
    finally:
        if remove:
            dms.remove()
        model.train(was)
    info["bn_recalibrated"] = 0
    if bn_batches and batches is not None and batchnorms(exported):
        recalibrate_bn(exported, batches, bn_batches)
        info["bn_recalibrated"] = bn_batches
    exported.eval()
    info["seconds"] = time.perf_counter() - t0
    return exported, info


def oneshot_prune(model: nn.Module, example_inputs: tuple | torch.Tensor, target: Target, method: str = "l1", *,
                  task: Task | Callable | None = None, batches: Callable[[int], Any] | None = None,
                  n_batches: int = 20, example_kwargs: dict | None = None, seed: int = 0, check: bool = True,
                  atol: float = 1e-4, rtol: float = 1e-4, progress: bool = False, bn_batches: int = 20,
                  **dms_kwargs: Any) -> tuple[nn.Module, dict[str, Any]]:
    """One-shot prune ``model`` (left unchanged) to ``target``: width only, one ratio for every layer.

    With ``batches`` and a model with BatchNorm, the export's statistics are re-estimated from ``bn_batches``
    of them (0: off; see :func:`oneshot`). ``dms_kwargs`` go to ``DMS`` (``exclude``, ``divisor``, ``bounds``,
    ``prune_heads``, ...).
    """
    method = _method(method)
    dms_kwargs.setdefault("prune_depth", False)
    dms_kwargs.setdefault("warn", False)
    dms = DMS(model, example_inputs, target, 1, importance="taylor", example_kwargs=example_kwargs, **dms_kwargs)
    return oneshot(dms, method, task=task, batches=batches, n_batches=n_batches, seed=seed, check=check, atol=atol,
                   rtol=rtol, progress=progress, bn_batches=bn_batches)
