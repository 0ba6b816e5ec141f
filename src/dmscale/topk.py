"""The differentiable top-k operator of DMS, as a pure function (no module state)."""

from __future__ import annotations

import torch

__all__ = ["rank_normalize", "differentiable_topk", "mask_from_ranks", "hard_keep"]


def rank_normalize(importance: torch.Tensor) -> torch.Tensor:
    """Map importance to evenly spaced ranks in (0, 1): ``(rank + 0.5) / N``.

    Sorting costs O(N log N) time and O(N) memory (the reference builds an N x N
    comparison matrix). Ties are broken by index (stable sort), so all-equal
    importance (e.g. zeros at initialisation) still gives distinct ranks and a
    mask that moves smoothly with the ratio instead of all elements at once.
    The half-step offset makes the number of kept elements ``round(ratio * N)``.
    """
    if importance.dim() != 1:
        raise ValueError(f"importance must be 1-D, got shape {tuple(importance.shape)}")
    n = importance.numel()
    if n == 0:
        raise ValueError("importance is empty: a dimension needs at least one element")
    order = torch.argsort(importance.detach(), stable=True)
    ranks = torch.empty(n, dtype=importance.dtype, device=importance.device)
    # scatter_ rather than ranks[order] = ...: index_put_ can stall for milliseconds in a parallel region
    ranks.scatter_(0, order, torch.arange(n, dtype=importance.dtype, device=importance.device))
    return (ranks + 0.5) / n


def differentiable_topk(importance: torch.Tensor, ratio: torch.Tensor, lam: float | None = None) -> torch.Tensor:
    """Soft top-k mask ``sigmoid(lam * (c' - (1 - ratio)))`` with ``c'`` the normalised rank.

    ``ratio`` is the kept fraction (the paper's ``1 - a``); gradients flow to it
    (``dm/dratio = lam * m * (1 - m)``), not to ``importance``. ``lam`` defaults
    to N, for which only the ~6 elements nearest the threshold are fuzzy.
    An element is kept by the hard mask when ``m >= 0.5``.
    """
    return mask_from_ranks(rank_normalize(importance), ratio, lam)


def mask_from_ranks(ranks: torch.Tensor, ratio: torch.Tensor, lam: float | None = None) -> torch.Tensor:
    """The soft mask from already normalised ranks (lets callers sort once per step)."""
    c = ranks.to(ratio.dtype)
    n = c.numel()
    lam = float(n) if lam is None else float(lam)
    if lam <= 0:
        raise ValueError(f"lam must be positive, got {lam}")
    return torch.sigmoid(lam * (c - (1.0 - ratio)))


def hard_keep(importance: torch.Tensor, count: int, order: torch.Tensor | None = None) -> torch.Tensor:
    """Boolean mask of the ``count`` most important elements (ties broken as in ``rank_normalize``)."""
    n = importance.numel()
    count = max(0, min(int(count), n))
    if order is None:
        order = torch.argsort(importance.detach(), stable=True)
    keep = torch.zeros(n, dtype=torch.bool, device=importance.device)
    if count:
        keep[order[n - count:]] = True
    return keep
