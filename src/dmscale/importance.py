"""Element importance for the top-k ranking: Taylor with a moving average (default) and alternatives.

Importance is not learned by gradient descent: it is updated from a backward hook on each
group's mask, so it sees ``dL_task/dm`` (the resource loss uses separate mask tensors).
"""

from __future__ import annotations

import torch

from .space import Group, SearchSpace

__all__ = ["METHODS", "ImportanceTracker"]

METHODS = ("taylor", "fisher", "snip", "l1")


class ImportanceTracker:
    """Updates ``space.importance(g)`` in place: ``c <- decay*c + (1-decay)*score(m, g)``."""

    def __init__(self, space: SearchSpace, method: str = "taylor", decay: float = 0.99,
                 l1_sources: dict[str, list[tuple[torch.Tensor, int, torch.Tensor | None]]] | None = None) -> None:
        if method not in METHODS:
            raise ValueError(f"importance must be one of {METHODS}, got {method!r}")
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"importance decay must be in [0, 1), got {decay}")
        self.space = space
        self.method = method
        self.decay = decay
        self.skipped = 0  # non-finite updates ignored
        self.updates = 0
        self.l1_sources = l1_sources or {}
        self.reducer = None  # optional callable(tensor) -> tensor (all-reduce mean under data parallelism)
        self.grad_scale = None  # optional callable() -> float (the AMP GradScaler's current scale)

    def attach(self, g: Group, m: torch.Tensor) -> None:
        """Register the backward hook that turns dL/dm into an importance update."""
        if self.method == "l1" and self.l1_sources.get(g.key):
            return  # magnitude importance comes from the weights, not from gradients

        def hook(grad: torch.Tensor) -> None:
            self.update(g, m.detach(), grad.detach())
        m.register_hook(hook)

    @torch.no_grad()
    def update(self, g: Group, m: torch.Tensor, grad: torch.Tensor) -> None:
        """One moving-average step from the mask and its task-loss gradient."""
        grad = grad.float()
        if self.grad_scale is not None:  # fp16 GradScaler: importance uses unscaled gradients
            grad = grad / float(self.grad_scale())
        if self.reducer is not None:  # data parallel: the global-batch gradient, same on every rank
            grad = self.reducer(grad)
        m = m.float()
        if self.method in ("taylor", "l1"):
            score = (m * grad) ** 2
        elif self.method == "fisher":
            score = grad ** 2
        else:  # snip
            score = (m * grad).abs()
        if not bool(torch.isfinite(score).all()):
            self.skipped += 1
            return
        imp = self.space.importance(g)
        imp.mul_(self.decay).add_(score.to(imp.device), alpha=1.0 - self.decay)
        self.updates += 1

    @torch.no_grad()
    def refresh_l1(self) -> None:
        """L1-magnitude importance: sum of |w| over the weight slices each channel owns."""
        if self.method != "l1":
            return
        for g in self.space.groups:
            srcs = self.l1_sources.get(g.key)
            if not srcs:
                continue
            imp = self.space.importance(g)
            tot = torch.zeros(g.size, dtype=torch.float32, device=imp.device)
            for p, d, idx in srcs:
                w = p.detach().abs().float().movedim(d, 0).reshape(p.shape[d], -1).sum(1).to(imp.device)
                if idx is None:
                    tot += w
                else:  # a composite dim (e.g. heads x head_dim): add each slice to its element
                    keep = idx >= 0
                    tot.index_add_(0, idx[keep].to(imp.device), w[keep.to(w.device)])
            imp.copy_(tot)
