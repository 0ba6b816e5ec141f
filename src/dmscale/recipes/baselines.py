"""Baselines at the same budget as a DMS run: uniform width scaling and one-shot L1 / Taylor pruning.

One-shot pruning is :func:`dmscale.recipes.oneshot.oneshot_prune` (one ranking, one common ratio);
:func:`one_shot_prune` is its image-classification form. Uniform width builds a model family at
the width multiplier found by :func:`dmscale.budget.bisect_max` on ``dmscale.count``
(:func:`uniform_width`); the app's ``uniform_width_model(run, goal)`` applies it to the run's zoo.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn

from dmscale.budget import bisect_max  # re-exported: it lived here before 0.2
from dmscale.recipes.oneshot import oneshot_prune
from dmscale.recipes.tasks import ImageClassification
from dmscale.resources import count
from dmscale.schedule import Target

__all__ = ["bisect_max", "uniform_width", "one_shot_prune"]


def uniform_width(build: Callable[[float], nn.Module], example: torch.Tensor, goal: float, kind: str = "flops",
                  lo: float = 1e-3, hi: float = 1.0, iters: int = 25) -> float:
    """The largest width multiplier in [lo, hi] whose ``build(mult)`` has ``count(...)[kind] <= goal`` (absolute)."""
    return bisect_max(lambda mult: count(build(mult), (example,))[kind], goal, lo, hi, iters=iters)


def one_shot_prune(model: nn.Module, example: torch.Tensor, fraction: float, method: str, resource: str = "flops",
                   batches: Callable[[int], tuple[torch.Tensor, torch.Tensor]] | None = None,
                   n_batches: int = 20, bn_batches: int = 20) -> tuple[nn.Module, float]:
    """One-shot L1/Taylor pruning of an image classifier (left unchanged): one kept ratio r for every width
    group so that the resource <= ``fraction`` of the model's; returns (pruned model, r). With ``batches``, the
    pruned model's BatchNorm statistics are re-estimated from ``bn_batches`` of them (0: off)."""
    if method == "taylor" and batches is None:
        raise ValueError("taylor importance needs training batches")
    small, info = oneshot_prune(model, (example,), Target(**{resource: fraction}), method, task=ImageClassification(),
                                batches=batches, n_batches=n_batches, bn_batches=bn_batches)
    return small, info["ratio"]
