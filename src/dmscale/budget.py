"""Land on the budget: bisection on exact (hard) counts, and projection of a search's kept ratios.

``bisect_max`` is the one monotone bisection in dmscale (uniform width multipliers, one-shot
common ratios, projections all use it). ``project`` lands a ``DMS`` on its budget in both
directions (a search that ended below it is grown back, one that ended above it is shrunk):

1. **Common offset.** Every movable width/head ratio moves by one offset, so the searched
   allocation keeps its shape; bisection finds the largest offset whose exported resource (the
   hard count, equal to ``dmscale.count`` of the export) does not exceed the target.
2. **Fine steps.** The offset stops where the next threshold would overshoot, which can be far
   below the target when several groups cross it together (equal ratios: one-shot pruning) or
   when one element is a large step. Single elements (divisor steps) are then added group by
   group, in the order the offset would have added them, skipping those that do not fit.
3. **Exchanges.** On coarse spaces (tiny layers, large divisors) no single element may fit while
   the result is still more than ``tolerance`` below: pairs of groups are moved together (one
   up or down by a few steps, the other to its largest fitting size), the smallest such change
   that lands within tolerance is kept.
4. **Fallbacks.** If the movable groups cannot reach the target at all, frozen attention heads
   are moved too, then depth: removed blocks come back (or kept ones go) until widths can
   compensate the block's discrete step.

The result is never above the target; if nothing within ``tolerance`` below it is found, the
nearest feasible point below is kept and a warning says the space is too coarse.
"""

from __future__ import annotations

import heapq
import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Iterable

import torch

from .topk import hard_keep

if TYPE_CHECKING:
    from .search import DMS
    from .space import Group

__all__ = ["bisect_max", "Projection", "project", "hard_fraction", "within_budget", "EXACT"]

EXACT = 1e-9  # relative slack of "not above the target": float64 summation order only


def within_budget(value: float, goal: float) -> bool:
    """True when a resource fraction is not above ``goal`` (up to the relative slack ``EXACT``).

    Resources are float64 (``dms.resource``) and the projection counts exactly, so the slack only
    covers the order of summation; every "within budget" decision in dmscale uses this function."""
    return float(value) <= float(goal) * (1.0 + EXACT)


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
    """What ``project`` did: resource before/after (fractions of the supernet), target, offset applied.

    ``changes`` maps each group whose kept count changed to ``(before, after)``; ``shift`` is the
    mean over all searchable groups of ``|after - before| / size`` (how far the allocation moved);
    ``fine_steps`` counts single-element and exchange moves after the offset; ``tier`` says which
    groups had to move: ``"width"`` (the free width/head groups), ``"heads"`` (frozen heads too) or
    ``"depth"`` (blocks added back or removed as well).
    """

    kind: str
    target: float
    before: float
    after: float
    offset: float
    tolerance: float = 0.01
    changes: dict[str, tuple[int, int]] = field(default_factory=dict)
    shift: float = 0.0
    fine_steps: int = 0
    tier: str = "width"

    @property
    def moved(self) -> float:
        """Relative change of the resource made by the projection (+ grown, - shrunk)."""
        return self.after / self.before - 1.0 if self.before > 0 else 0.0

    @property
    def error(self) -> float:
        """Relative distance of the result from the target."""
        return self.after / self.target - 1.0

    @property
    def ok(self) -> bool:
        """True when the result is within ``tolerance`` below the target (never above it)."""
        return -self.tolerance - EXACT <= self.error <= EXACT

    def __str__(self) -> str:
        where = "" if self.tier == "width" else f"; moved {self.tier} too"
        return (f"{self.kind} target {self.target:.4f}, search ended at {self.before:.4f}, projected to "
                f"{self.after:.4f} ({self.error:+.2%} of target; projection moved the resource {self.moved:+.2%}, "
                f"{len(self.changes)} group(s), mean width shift {self.shift:.1%}{where})")


@torch.no_grad()
def hard_fraction(dms: "DMS", kind: str) -> float:
    """The exported model's resource as a fraction of the supernet (hard counts)."""
    return float(dms.resource(soft=False)[f"{kind}_frac"])


class _Levels:
    """The kept counts a group can take (bounds, divisor) and a raw count that gives each."""

    def __init__(self, dms: "DMS", g: "Group", current: int) -> None:
        space = dms.space

        def raw_at(r: float) -> int:
            ratio = torch.tensor(r, dtype=space.ratio(g).dtype, device=space.ratio(g).device)
            return int((space.soft_mask(g, ratio) >= 0.5).sum())

        lo, hi = raw_at(g.min_ratio()), raw_at(g.bounds.max_ratio)
        reps: dict[int, list[int]] = {}
        for raw in range(lo, hi + 1):
            reps.setdefault(g.count_from_raw(raw), []).append(raw)
        if current not in reps:  # ratios set outside their bounds by hand: keep that size reachable
            reps[current] = [current]
        self.counts = sorted(reps)
        self.rep = {k: v[len(v) // 2] for k, v in reps.items()}
        self.first_raw = {k: min(v) for k, v in reps.items()}
        self.pos = {k: i for i, k in enumerate(self.counts)}


class _State:
    """Exact hard counts of a DMS's groups and the resource they give, without touching the ratios."""

    def __init__(self, dms: "DMS", kind: str) -> None:
        self.dms = dms
        self.kind = kind
        self.full = float(dms.resources.full[kind])
        sp = dms.space
        self.count: dict[str, int] = {g.key: int(sp.keep(g).sum()) for g in dms.groups}
        self.base = {g.key: float(sp.ratio(g).detach()) for g in dms.groups}
        self.levels = {g.key: _Levels(dms, g, self.count[g.key]) for g in dms.groups}
        self._gates: dict[tuple[str, int], list[float]] = {}
        self.evals = 0

    def gates(self, g: "Group", k: int) -> list[float]:
        key = (g.key, k)
        if key not in self._gates:
            sp = self.dms.space
            keep = hard_keep(sp.importance(g), k, order=sp.order(g))
            self._gates[key] = [float(v) for v in keep]
        return self._gates[key]

    def value(self, count: dict[str, int]) -> float:
        """Resource fraction of the supernet for these counts."""
        kept: dict[int, float] = {}
        gates: dict[str, float] = {}
        for g in self.dms.groups:
            k = count[g.key]
            if g.kind == "depth":
                for b, v in zip(g.blocks, self.gates(g, k)):
                    gates[b.name] = v
            else:
                kept[g.index] = k / g.size
        self.evals += 1
        return self.dms.resources.value(self.kind, kept, gates) / self.full

    def count_at_ratio(self, g: "Group", r: float) -> int:
        sp = self.dms.space
        ratio = torch.tensor(r, dtype=sp.ratio(g).dtype, device=sp.ratio(g).device)
        return g.hard_count(sp.soft_mask(g, ratio))

    def clamp(self, g: "Group", r: float) -> float:
        return min(max(r, g.min_ratio()), g.bounds.max_ratio)


@dataclass
class _Result:
    count: dict[str, int]
    value: float
    offset: float
    ratios: dict[str, float]  # groups whose ratio is base + offset (clamped): keep the exact value
    fine_steps: int
    tier: str


def _search(st: _State, movable: list["Group"], start: dict[str, int], goal: float, tolerance: float,
            iters: int, budget: int, tier: str) -> _Result:
    """Offset bisection, then single-element fill, then pair exchanges over ``movable``."""
    low = goal * (1.0 - tolerance)
    hi_goal = goal * (1.0 + EXACT)
    count = dict(start)
    ratios: dict[str, float] = {}

    def at_offset(off: float) -> dict[str, int]:
        c = dict(count)
        for g in movable:
            c[g.key] = st.count_at_ratio(g, st.clamp(g, st.base[g.key] + off))
        return c

    offset = 0.0
    if movable:
        offset = bisect_max(lambda off: st.value(at_offset(off)), hi_goal, -1.0, 1.0, iters=iters)
        count = at_offset(offset)
        ratios = {g.key: st.clamp(g, st.base[g.key] + offset) for g in movable}
    value = st.value(count)
    fine = 0

    def fill() -> None:
        """Add single levels, in the order a growing offset would reach them, while they fit."""
        nonlocal value, fine
        heap: list[tuple[float, int, str]] = []
        by_key = {g.key: g for g in movable}

        def push(g: "Group") -> None:
            lv = st.levels[g.key]
            i = lv.pos[count[g.key]]
            if i + 1 < len(lv.counts):
                need = (lv.first_raw[lv.counts[i + 1]] - 0.5) / g.size - st.base[g.key]
                heapq.heappush(heap, (need, g.index, g.key))

        for g in movable:
            push(g)
        while heap and value < goal and st.evals < budget:
            _, _, key = heapq.heappop(heap)
            g = by_key[key]
            lv = st.levels[key]
            trial = dict(count)
            trial[key] = lv.counts[lv.pos[count[key]] + 1]
            v = st.value(trial)
            if v <= hi_goal:
                count.update(trial)
                ratios.pop(key, None)
                value = v
                fine += 1
                push(g)

    def best_level(g: "Group", c: dict[str, int]) -> tuple[int, float] | None:
        """Largest level of g (others as in c) whose resource fits; None if even the smallest is over."""
        lv = st.levels[g.key]
        lo_i, hi_i = 0, len(lv.counts) - 1
        trial = dict(c)
        trial[g.key] = lv.counts[lo_i]
        v_lo = st.value(trial)
        if v_lo > hi_goal:
            return None
        trial[g.key] = lv.counts[hi_i]
        v_hi = st.value(trial)
        if v_hi <= hi_goal:
            return lv.counts[hi_i], v_hi
        while hi_i - lo_i > 1:
            mid = (lo_i + hi_i) // 2
            trial[g.key] = lv.counts[mid]
            v = st.value(trial)
            if v <= hi_goal:
                lo_i, v_lo = mid, v
            else:
                hi_i = mid
        return lv.counts[lo_i], v_lo

    def exchange() -> bool:
        """One pair move (g by d levels, h to its best fitting level) that raises the resource most cheaply."""
        nonlocal value, fine
        best: tuple[float, float, dict[str, int]] | None = None  # (distortion, -value, counts)
        max_d = max((len(st.levels[g.key].counts) for g in movable), default=0)
        for d in range(1, max_d):
            for g in movable:
                lv = st.levels[g.key]
                i = lv.pos[count[g.key]]
                for j in (i + d, i - d):
                    if not 0 <= j < len(lv.counts):
                        continue
                    moved = dict(count)
                    moved[g.key] = lv.counts[j]
                    for h in movable:
                        if h is g or st.evals >= budget:
                            continue
                        got = best_level(h, moved)
                        if got is None or got[0] == count[h.key]:
                            continue
                        k_h, v = got
                        if v <= value:
                            continue
                        dist = d / g.size + abs(k_h - count[h.key]) / h.size
                        trial = dict(moved)
                        trial[h.key] = k_h
                        cand = (0.0 if v >= low else 1.0, dist if v >= low else -v, trial)
                        if best is None or cand[:2] < best[:2]:
                            best = cand
            if (best is not None and best[0] == 0.0) or st.evals >= budget:
                break  # the smallest exchange that lands within tolerance
        if best is None:
            return False
        trial = best[2]
        for k in list(ratios):
            if trial[k] != count[k]:
                ratios.pop(k)
        count.update(trial)
        value = st.value(count)
        fine += 1
        return True

    fill()
    while value < low and len(movable) >= 2 and st.evals < budget:
        if not exchange():
            break
        fill()
    return _Result(count, value, offset, ratios, fine, tier)


def _extreme(st: _State, movable: list["Group"], count: dict[str, int], top: bool) -> dict[str, int]:
    c = dict(count)
    for g in movable:
        lv = st.levels[g.key]
        c[g.key] = lv.counts[-1] if top else lv.counts[0]
    return c


def _adjust_depth(st: _State, widths: list["Group"], count: dict[str, int], goal: float,
                  tolerance: float) -> dict[str, int]:
    """Add back removed blocks (or remove kept ones) until the widths can reach the goal."""
    c = dict(count)
    depth = [g for g in st.dms.groups if g.kind == "depth"]
    low = goal * (1.0 - tolerance)
    while st.value(_extreme(st, widths, c, top=True)) < low:
        opts = []
        for g in depth:
            lv = st.levels[g.key]
            i = lv.pos[c[g.key]]
            if i + 1 < len(lv.counts):
                trial = dict(c)
                trial[g.key] = lv.counts[i + 1]
                opts.append((st.value(_extreme(st, widths, trial, top=True)), g.index, trial))
        if not opts:
            break
        c = min(opts, key=lambda o: o[:2])[2]  # the smallest block that helps: least overshoot of the shape
    while st.value(_extreme(st, widths, c, top=False)) > goal * (1.0 + EXACT):
        opts = []
        for g in depth:
            lv = st.levels[g.key]
            i = lv.pos[c[g.key]]
            if i > 0:
                trial = dict(c)
                trial[g.key] = lv.counts[i - 1]
                opts.append((st.value(_extreme(st, widths, trial, top=False)), g.index, trial))
        if not opts:
            break
        c = min(opts, key=lambda o: o[:2])[2]  # the largest saving: as few blocks removed as possible
    return c


@torch.no_grad()
def _apply(dms: "DMS", st: _State, res: _Result) -> None:
    """Write the result into the ratios: exact offset values where kept, level centres elsewhere."""
    for g in dms.groups:
        k = res.count[g.key]
        if g.key in res.ratios:
            r = res.ratios[g.key]
        elif k == st.count[g.key]:
            continue
        else:
            r = st.levels[g.key].rep[k] / g.size
        dms.space.ratio(g).fill_(r)
        got = int(dms.space.keep(g).sum())
        if got != k:  # float edge at a threshold: nudge inside the level
            for eps in (0.25, -0.25, 0.4, -0.4):
                dms.space.ratio(g).fill_((st.levels[g.key].rep[k] + eps) / g.size)
                if int(dms.space.keep(g).sum()) == k:
                    break
            else:
                raise RuntimeError(f"projection could not set {g.name} to {k} of {g.size} elements (got {got})")


@torch.no_grad()
def project(dms: "DMS", fraction: float | None = None, kind: str | None = None, *,
            groups: Iterable["Group"] | None = None, tolerance: float = 0.01, iters: int = 50,
            warn: bool = True, fallback: bool = True, max_evals: int = 5000) -> Projection:
    """Move the kept ratios so the exported resource lands in ``[fraction * (1 - tolerance), fraction]``.

    ``fraction`` defaults to the search target (``dms.target_fraction``), ``kind`` to the target's
    kind. ``groups`` are the ones moved by the common offset and the fine steps; the default is
    every width / head_dim group, and heads unless the search is refining (heads are frozen with
    depth then). With ``fallback`` the other heads and then depth move too when ``groups`` cannot
    reach the target. A result already within tolerance is left as it is. The ratios are changed
    in place; a warning (``warn``) says when no point within tolerance was found.
    """
    from .schedule import check_float

    kind = kind or dms.target.kind
    if kind not in dms.resources.kinds():
        raise ValueError(f"cannot project on {kind!r}: this search computes {dms.resources.kinds()}")
    goal = check_float("fraction", dms.target_fraction if fraction is None else fraction, 0.0, lo_open=True)
    tolerance = check_float("tolerance", tolerance, 0.0, 1.0, hi_open=True)
    st = _State(dms, kind)
    before = st.value(st.count)
    if groups is None:
        first = [g for g in dms.groups if g.kind != "depth" and not (g.kind == "heads" and dms.refining)]
    else:
        first = [g for g in groups if g.kind != "depth"]
    names = [g.name for g in dms.groups]

    def projection(res: _Result | None) -> Projection:
        count = st.count if res is None else res.count
        changes = {g.name: (st.count[g.key], count[g.key]) for g in dms.groups if count[g.key] != st.count[g.key]}
        shift = sum(abs(count[g.key] - st.count[g.key]) / g.size for g in dms.groups) / max(1, len(names))
        after = before if res is None else res.value
        return Projection(kind, goal, before, after, 0.0 if res is None else res.offset, tolerance, changes,
                          shift, 0 if res is None else res.fine_steps, "width" if res is None else res.tier)

    if goal * (1.0 - tolerance) <= before and within_budget(before, goal):
        return projection(None)
    tiers = [("width", first)]
    if fallback:
        every = [g for g in dms.groups if g.kind != "depth"]
        if len(every) > len(first):
            tiers.append(("heads", every))
        if any(g.kind == "depth" for g in dms.groups):
            tiers.append(("depth", every))
    best: _Result | None = None
    hi_goal, low = goal * (1.0 + EXACT), goal * (1.0 - tolerance)
    for n, (tier, movable) in enumerate(tiers):
        start = dict(st.count)
        if tier == "depth":
            start = _adjust_depth(st, movable, start, goal, tolerance)
        elif n + 1 < len(tiers) and (st.value(_extreme(st, movable, start, top=True)) < low or
                                     st.value(_extreme(st, movable, start, top=False)) > hi_goal):
            continue  # these groups cannot reach the band at all: the next tier moves more
        res = _search(st, movable, start, goal, tolerance, iters, st.evals + max_evals, tier)
        feasible = res.value <= hi_goal
        if best is None or (feasible and (res.value > best.value + 1e-12 or best.value > hi_goal)):
            best = res
        if feasible and res.value >= low:
            break
    if best is None:  # every tier skipped: cannot happen (the last one always runs); keep the ratios
        return projection(None)
    _apply(dms, st, best)
    out = projection(best)
    masks = hard_fraction(dms, kind)  # through the masks (float64); out.after is the projection's own count
    if abs(masks - out.after) > EXACT * max(1.0, abs(out.after)):
        raise RuntimeError(f"projection bookkeeping disagrees with the masks: {out.after} vs {masks}")
    if warn and not out.ok:
        warnings.warn(f"dmscale: the budget cannot be met within {tolerance:.0%}: {out}. The search space is too "
                      "coarse or bounded (layer sizes, divisor, min_ratio/max_ratio, depth); the nearest feasible "
                      "point below the target is kept.", stacklevel=2)
    return out
