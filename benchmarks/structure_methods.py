"""The width/depth modelling strategies of the DMS paper's Table 2, as mask strategies on one ``dmscale.DMS``.

Every strategy searches the same groups of the same traced model (channels of each coupled
channel group, residual blocks of each stage), with the same resource loss
(``dms.loss``: one-sided ``log(R / R_target)``, the same target schedule and the same
multiplier on its weight), the same structure-only training loop (``dmscale.recipes``' ``Search``,
weights frozen, BN in train mode) and the same number of steps. They differ only in how a
group's mask is produced from what they learn, which is what the paper's Figure 1 compares:

* ``DMS``  the kept ratio r is learned; mask = sigmoid(lam * (rank-normalised importance - (1 - r)))
           (``dmscale``'s differentiable top-k), importance = Taylor moving average.
* ``GET``  gradient-estimate top-k (the ablation variant of the official code): r is learned, the mask
           is the hard top-round(r N) of the same Taylor importance, and r's gradient is the
           straight-through estimate ``dL/dr = sum_i dL/dm_i`` (forward ``keep``, backward as if
           ``m_i = keep_i + r - stop_grad(r)``).
* ``SNS``  single number selection (DNAS / FBNetV2 style): one logit per candidate count (8 evenly
           spaced counts per width group, 0..N blocks per stage); mask = softmax-weighted sum of the
           candidates' prefix masks, the prefix taken in the order of the same Taylor importance
           (more favourable than the official ablation's channel-index order on a pretrained model).
           Deterministic softmax relaxation (no Gumbel noise).
* ``MES``  multiple element selection (Network-Slimming / L0 style): one logit s_i per element,
           mask = sigmoid(s_i), the resource loss on sum(mask) is the sparsity penalty, the kept
           count is implicit (elements with mask >= 0.5). Deterministic, no Gumbel noise.

The kept count a strategy's search ends with is, for all of them, the elements whose mask is
>= 0.5 (the hard count the resource loss sees in its forward value). ``finalize`` writes the
result back into the DMS's native form (an importance order and a kept ratio per group) and
takes the overrides out, so that ``dmscale.budget.project``, BN recalibration and ``export`` treat
every strategy's result identically.

SNS and MES start near the unpruned network (logit 3: the full count has ~74% of an 8-way
softmax; every gate sigmoid(3) = 0.95) so the frozen pretrained weights see their trained
network at the start, as DMS and GET (ratio 1) do. These are comparison methods for the
benchmarks, not library features.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn as nn

from dmscale import DMS
from dmscale.topk import hard_keep

__all__ = ["STRATEGIES", "Strategy", "DMSStrategy", "GETStrategy", "SNSStrategy", "MESStrategy", "make_strategy"]


class Strategy:
    """DMS itself: the ratios of ``dms.space`` are the structure parameters; nothing is overridden."""

    name = "DMS"

    def __init__(self, dms: DMS) -> None:
        self.dms = dms

    def parameters(self) -> list[nn.Parameter]:
        """What the structure optimizer trains."""
        return list(self.dms.structure_parameters())

    def depth_parameters(self) -> list[nn.Parameter]:
        """Parameters frozen with depth when the refine phase starts (DMS freezes its depth ratios itself)."""
        return []

    def install(self) -> None:
        """Put this strategy's mask function in place (before the search)."""

    def _counts(self) -> dict[str, int]:
        """The kept count of every group as the search left it (elements with mask >= 0.5)."""
        sp = self.dms.space
        with torch.no_grad():
            return {g.key: int(sp.keep(g).sum()) for g in self.dms.groups}

    def finalize(self) -> dict[str, Any]:
        """Write the result into the DMS's importance / ratios and remove overrides; returns the kept counts."""
        return {"kept": self._counts()}

    # ------------------------------------------------------------------ helpers for the overrides
    def _override(self, **fns: Any) -> None:
        for name, fn in fns.items():
            object.__setattr__(self.dms.space, name, fn)

    def _restore(self, *names: str) -> None:
        for name in names:
            if name in self.dms.space.__dict__:
                object.__delattr__(self.dms.space, name)

    @torch.no_grad()
    def _set_native(self, counts: dict[str, int], importance: dict[str, torch.Tensor] | None = None) -> None:
        """Kept ratio count/N per group (and optionally a new importance order); checks the kept counts."""
        sp = self.dms.space
        for g in self.dms.groups:
            if importance is not None and g.key in importance:
                sp.importance(g).copy_(importance[g.key].to(sp.importance(g)))
            k = counts[g.key]
            for eps in (0.0, 0.25, -0.25):
                sp.ratio(g).fill_((k + eps) / g.size)
                if int(sp.keep(g).sum()) == k:
                    break
            else:
                raise RuntimeError(f"{self.name}: cannot set {g.name} to {k} of {g.size} elements")


DMSStrategy = Strategy


class GETStrategy(Strategy):
    """Gradient-estimate top-k: hard top-k forward, straight-through gradient to the ratio."""

    name = "GET"

    def install(self) -> None:
        sp = self.dms.space

        def soft_mask(g: Any, ratio: torch.Tensor | None = None) -> torch.Tensor:
            r = sp.ratio(g) if ratio is None else ratio
            k = g.count_from_raw(math.floor(float(r.detach()) * g.size + 0.5))
            keep = hard_keep(sp.importance(g), k, order=sp.order(g)).to(r.dtype)
            return keep + (r - r.detach())

        self._override(soft_mask=soft_mask)

    def finalize(self) -> dict[str, Any]:
        counts = self._counts()
        self._restore("soft_mask")
        self._set_native(counts)
        return {"kept": counts}


def _desc_position(sp: Any, g: Any) -> torch.Tensor:
    """Position of each element in descending importance (0 = most important), ties as the ranks."""
    order = sp.order(g)  # ascending
    pos = torch.empty(g.size, dtype=torch.long, device=order.device)
    pos[order] = torch.arange(g.size - 1, -1, -1, device=order.device)
    return pos


class SNSStrategy(Strategy):
    """Single number selection: a softmax over candidate counts, mask = expected prefix mask."""

    name = "SNS"

    def __init__(self, dms: DMS, n_candidates: int = 8, init_logit: float = 3.0) -> None:
        super().__init__(dms)
        self.logits = nn.ParameterDict()
        self.candidates: dict[str, torch.Tensor] = {}
        dev = next(iter(dms.structure_parameters())).device
        for g in dms.groups:
            if g.kind == "depth":
                cands = list(range(g.size + 1))
            else:
                cands = sorted({max(1, math.ceil(g.size * j / n_candidates)) for j in range(1, n_candidates + 1)})
            self.candidates[g.key] = torch.tensor(cands, dtype=torch.long, device=dev)
            logit = torch.zeros(len(cands), device=dev)
            logit[-1] = init_logit
            self.logits[g.key] = nn.Parameter(logit)

    def parameters(self) -> list[nn.Parameter]:
        return list(self.logits.values())

    def depth_parameters(self) -> list[nn.Parameter]:
        return [self.logits[g.key] for g in self.dms.groups if g.kind == "depth"]

    def probabilities(self, g: Any) -> torch.Tensor:
        return torch.softmax(self.logits[g.key], 0)

    def install(self) -> None:
        sp = self.dms.space

        def soft_mask(g: Any, ratio: torch.Tensor | None = None) -> torch.Tensor:
            if ratio is not None:
                raise RuntimeError("SNS masks do not depend on a ratio (finalize before projecting)")
            p = self.probabilities(g)
            prefix = (_desc_position(sp, g)[:, None] < self.candidates[g.key][None, :]).to(p.dtype)
            return prefix @ p

        self._override(soft_mask=soft_mask)

    def finalize(self) -> dict[str, Any]:
        counts = self._counts()
        with torch.no_grad():
            argmax = {g.name: int(self.candidates[g.key][int(self.probabilities(g).argmax())])
                      for g in self.dms.groups}
        self._restore("soft_mask")
        self._set_native(counts)
        return {"kept": counts, "argmax_counts": argmax}


class MESStrategy(Strategy):
    """Multiple element selection: one sigmoid gate per element; kept = gates >= 0.5."""

    name = "MES"

    def __init__(self, dms: DMS, init_logit: float = 3.0) -> None:
        super().__init__(dms)
        dev = next(iter(dms.structure_parameters())).device
        self.gates = nn.ParameterDict({g.key: nn.Parameter(torch.full((g.size,), float(init_logit), device=dev))
                                       for g in dms.groups})

    def parameters(self) -> list[nn.Parameter]:
        return list(self.gates.values())

    def depth_parameters(self) -> list[nn.Parameter]:
        return [self.gates[g.key] for g in self.dms.groups if g.kind == "depth"]

    def _keep(self, g: Any) -> torch.Tensor:
        s = self.gates[g.key].detach()
        keep = s >= 0
        if g.kind != "depth" and not bool(keep.any()):
            keep[int(s.argmax())] = True  # a width group keeps at least one element (as the DMS clamp)
        return keep

    def install(self) -> None:
        def soft_mask(g: Any, ratio: torch.Tensor | None = None) -> torch.Tensor:
            if ratio is not None:
                raise RuntimeError("MES masks do not depend on a ratio (finalize before projecting)")
            return torch.sigmoid(self.gates[g.key])

        def keep(g: Any, soft: torch.Tensor | None = None) -> torch.Tensor:
            return self._keep(g)

        self._override(soft_mask=soft_mask, keep=keep)

    def finalize(self) -> dict[str, Any]:
        counts = self._counts()
        imp = {g.key: self.gates[g.key].detach().float().clone() for g in self.dms.groups}
        self._restore("soft_mask", "keep")
        self._set_native(counts, imp)
        return {"kept": counts}


STRATEGIES = {"DMS": DMSStrategy, "GET": GETStrategy, "SNS": SNSStrategy, "MES": MESStrategy}


def make_strategy(name: str, dms: DMS) -> Strategy:
    """The strategy ``name`` (one of :data:`STRATEGIES`) on ``dms``."""
    try:
        cls = STRATEGIES[name]
    except KeyError:
        raise ValueError(f"unknown search strategy {name!r}; choose one of {sorted(STRATEGIES)}") from None
    return cls(dms)
