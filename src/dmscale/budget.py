"""Land on the budget: bisection on exact (hard) counts, and projection of a search's kept ratios.

``bisect_max`` is the one monotone bisection in dmscale (uniform width multipliers, one-shot
common ratios, projections all use it). ``project`` moves every width/head ratio of a ``DMS``
by one common offset, so the searched allocation keeps its shape, until the exported model's
resource (the hard count, equal to ``dmscale.count`` of the export) is the largest one that does
not exceed the target. It works in both directions: a search that ended below its budget is
grown back to it, one that ended above it is shrunk.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterable

import torch

if TYPE_CHECKING:
    from .search import DMS
    from .space import Group

__all__ = ["bisect_max", "Projection", "project", "hard_fraction"]


def bisect_max(f: Callable[[float], float], goal: float, lo: float, hi: float, iters: int = 40) -> float:
    """Largest x in [lo, hi] with ``f(x) <= goal`` for a nondecreasing f (``lo`` if none)."""
    if f(hi) <= goal:
        return hi
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        if f(mid) <= goal:
            lo = mid
        else:
            hi = mid
    return lo


@dataclass
class Projection:
    """What ``project`` did: resource before/after (fractions of the supernet), target, offset applied."""

    kind: str
    target: float
    before: float
    after: float
    offset: float

    @property
    def moved(self) -> float:
        """Relative change of the resource made by the projection (+ grown, - shrunk)."""
        return self.after / self.before - 1.0 if self.before > 0 else 0.0

    @property
    def error(self) -> float:
        """Relative distance of the result from the target."""
        return self.after / self.target - 1.0

    def __str__(self) -> str:
        return (f"{self.kind} target {self.target:.4f}, search ended at {self.before:.4f}, projected to "
                f"{self.after:.4f} ({self.error:+.2%} of target; projection moved the resource {self.moved:+.2%})")


@torch.no_grad()
def hard_fraction(dms: "DMS", kind: str) -> float:
    """The exported model's resource as a fraction of the supernet (hard counts)."""
    return float(dms.resource(soft=False)[f"{kind}_frac"])


@torch.no_grad()
def project(dms: "DMS", fraction: float | None = None, kind: str | None = None, *,
            groups: Iterable["Group"] | None = None, tolerance: float = 0.01, iters: int = 50,
            warn: bool = True) -> Projection:
    """Shift the kept ratios of ``groups`` (default: every width/head group) by one common offset.

    The offset is the largest one whose hard resource is <= ``fraction`` (default: the search
    target). Depth is left as searched. If even the largest offset stays more than ``tolerance``
    below the target (the search space is too coarse or bounded), or the smallest one is over it,
    the nearest feasible point is kept and a warning says so.
    """
    kind = kind or dms.target.kind
    goal = float(dms.target.fraction if fraction is None else fraction)
    gs = [g for g in (dms.groups if groups is None else groups) if g.kind != "depth"]
    before = hard_fraction(dms, kind)
    if not gs:
        return Projection(kind, goal, before, before, 0.0)
    base = {g.key: dms.space.ratio(g).detach().clone() for g in gs}

    def apply(offset: float) -> float:
        for g in gs:
            dms.space.ratio(g).copy_(torch.clamp(base[g.key] + offset, g.min_ratio(), g.bounds.max_ratio))
        return hard_fraction(dms, kind)

    offset = bisect_max(apply, goal * (1 + 1e-9), -1.0, 1.0, iters=iters)
    after = apply(offset)
    res = Projection(kind, goal, before, after, offset)
    if warn and (after > goal * (1 + 1e-9) or res.error < -tolerance):
        warnings.warn(f"dmscale: the budget cannot be met within {tolerance:.0%}: {res}. The search space is too "
                      "coarse or bounded (divisor, min_ratio/max_ratio, depth); the nearest feasible point is kept.",
                      stacklevel=2)
    return res
