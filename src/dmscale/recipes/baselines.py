"""Baselines at the same budget as a DMS run: uniform width scaling and one-shot L1 / Taylor pruning.

One-shot pruning reuses the core: a ``DMS`` on the trained model gives the groups, the importance (L1 magnitude
or Taylor from a few gradient batches) and the export; every width group gets the same kept ratio r, found by
bisection on the exported resource. Uniform width builds the family at the width multiplier found by bisection
on ``count``.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from dmscale.app import zoo
from dmscale.resources import count
from dmscale.schedule import Target
from dmscale.search import DMS

if TYPE_CHECKING:
    from dmscale.app.pipelines import Run

__all__ = ["bisect_max", "uniform_width_model", "one_shot_prune"]


def bisect_max(f: Callable[[float], float], goal: float, lo: float, hi: float, iters: int = 40) -> float:
    """Largest x in [lo, hi] with f(x) <= goal for a nondecreasing f (lo if none)."""
    if f(hi) <= goal:
        return hi
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        if f(mid) <= goal:
            lo = mid
        else:
            hi = mid
    return lo


def uniform_width_model(run: "Run", goal: float) -> tuple[nn.Module, float]:
    """The base family at the width multiplier (bisection on ``count``) whose resource is <= goal (absolute)."""
    m, kind = run.cfg.model, run.cfg.search.resource
    c, n = run.data.input_shape[0], run.data.num_classes

    def res(mult: float) -> float:
        return count(zoo.build(m.widths, m.depths, c, n, width_mult=mult, stem_stride=m.stem_stride),
                     (run.example,))[kind]

    mult = bisect_max(res, goal, 1e-3, 1.0, iters=25)
    torch.manual_seed(run.cfg.run.seed * 10 + 4)  # PHASE_SALT["baseline-uniform"]
    return zoo.build(m.widths, m.depths, c, n, width_mult=mult, stem_stride=m.stem_stride), mult


def one_shot_prune(model: nn.Module, example: torch.Tensor, fraction: float, method: str, resource: str = "flops",
                   batches: Callable[[int], tuple[torch.Tensor, torch.Tensor]] | None = None,
                   n_batches: int = 20) -> tuple[nn.Module, float]:
    """One-shot L1/Taylor pruning: one kept ratio r for every width group (bisection) so the resource <= fraction."""
    model = copy.deepcopy(model)
    dms = DMS(model, (example,), Target(**{resource: 1.0}), total_steps=1, importance=method, prune_depth=False,
              warn=False)
    if method == "taylor":
        if batches is None:
            raise ValueError("taylor importance needs training batches")
        model.eval()  # gradients only; keep BatchNorm statistics untouched
        for i in range(n_batches):
            xb, yb = batches(i)
            F.cross_entropy(model(xb), yb).backward()
        model.zero_grad(set_to_none=True)
    width = [g for g in dms.groups if g.kind != "depth"]

    @torch.no_grad()
    def res(r: float) -> float:
        for g in width:
            dms.space.ratio(g).fill_(max(r, g.min_ratio()))
        return float(dms.resource(soft=False)[f"{resource}_frac"])

    r = bisect_max(res, fraction, 0.0, 1.0, iters=30)
    res(r)
    small = dms.export()
    return small, r
