"""Search space: one learnable kept-ratio and one importance vector per searchable dimension."""

from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass, field
from typing import Iterable

import torch
import torch.nn as nn

from .schedule import check_float, check_int
from .topk import hard_keep, mask_from_ranks
from .trace.spaces import alignment
from .trace.tracer import BlockRecord, Space, TraceResult

__all__ = ["Group", "GroupBounds", "SearchSpace", "build_search_space", "depth_lambda", "leaf_index"]


def depth_lambda(n_blocks: int) -> float:
    """Sharpness of a stage's block mask: 4N, and 8 for a stage with one removable block.

    As in the official code: with N = 1 the normalised rank is 0.5 and the mask is
    ``sigmoid(lam * (ratio - 0.5))``; 4 would leave it at 0.88 for a fully kept block.
    """
    return 8.0 if n_blocks == 1 else 4.0 * n_blocks


@dataclass
class GroupBounds:
    """Per-group limits: kept ratio in [min_ratio, max_ratio]; exported width a multiple of divisor."""

    min_ratio: float = 0.0
    max_ratio: float = 1.0
    divisor: int = 1

    def __post_init__(self) -> None:
        self.min_ratio = check_float("min_ratio", self.min_ratio, 0.0, 1.0)
        self.max_ratio = check_float("max_ratio", self.max_ratio, 0.0, 1.0)
        if self.min_ratio > self.max_ratio:
            raise ValueError(f"bounds need 0 <= min_ratio <= max_ratio <= 1, got {self.min_ratio}, {self.max_ratio}")
        self.divisor = check_int("divisor", self.divisor, 1)


@dataclass
class Group:
    """A searchable dimension: N elements (channels, heads or blocks) sharing one kept ratio."""

    name: str
    kind: str  # 'width' | 'heads' | 'head_dim' | 'groups' | 'depth'
    size: int
    lam: float
    bounds: GroupBounds
    space: Space | None = None  # width-like groups
    blocks: list[BlockRecord] = field(default_factory=list)  # depth groups
    members: list[str] = field(default_factory=list)  # parameter dims (for the summary)
    index: int = -1

    @property
    def key(self) -> str:
        """Name safe for a ParameterDict key."""
        return f"g{self.index}"

    def min_count(self) -> int:
        """Fewest elements this group may keep."""
        lo = math.ceil(self.bounds.min_ratio * self.size - 1e-9)
        if self.kind != "depth":
            lo = max(lo, 1)
        return self._round(lo) if lo > 0 else 0

    def min_ratio(self) -> float:
        """Lowest kept ratio the clamp allows (at least one element for width groups)."""
        r = self.bounds.min_ratio
        if self.kind != "depth":
            r = max(r, 1.0 / self.size)
        return r

    def _round(self, count: int) -> int:
        d = int(self.bounds.divisor)
        if d <= 1 or self.kind == "depth":
            return max(0, min(count, self.size))
        if self.size <= d:
            return self.size
        r = max(d, int(round(count / d)) * d)
        return min(r, self.size)

    def hard_count(self, soft_mask: torch.Tensor) -> int:
        """Number of kept elements: soft mask >= 0.5, rounded to the divisor."""
        return self.count_from_raw(int((soft_mask.detach() >= 0.5).sum().item()))

    def count_from_raw(self, raw: int) -> int:
        """The kept count for ``raw`` elements at or above the mask threshold (at least one, divisor-rounded)."""
        c = int(raw)
        if self.kind != "depth":
            c = max(c, 1)
        return self._round(c)


class SearchSpace(nn.Module):
    """Holds the groups' ratio parameters and importance buffers (what the search learns)."""

    def __init__(self, groups: list[Group], dtype: torch.dtype = torch.float32,
                 device: torch.device | None = None) -> None:
        super().__init__()
        self.groups = groups
        self._rank_cache: dict[str, tuple] = {}
        self.ratios = nn.ParameterDict()
        for i, g in enumerate(groups):
            g.index = i
            init = min(1.0, g.bounds.max_ratio)
            self.ratios[g.key] = nn.Parameter(torch.tensor(init, dtype=dtype, device=device))
            self.register_buffer(f"imp_{g.key}", torch.zeros(g.size, dtype=torch.float32, device=device))

    def importance(self, g: Group) -> torch.Tensor:
        """The importance vector of group g (a buffer, updated outside autograd)."""
        return getattr(self, f"imp_{g.key}")

    def ratio(self, g: Group) -> torch.Tensor:
        """The learnable kept ratio of group g."""
        return self.ratios[g.key]

    def _sorted(self, g: Group) -> tuple[torch.Tensor, torch.Tensor]:
        """(normalised ranks, ascending order) of g's importance, sorted once per importance update."""
        imp = self.importance(g)
        hit = self._rank_cache.get(g.key)
        if hit is not None and hit[0] == imp._version and hit[1] is imp:
            return hit[2], hit[3]
        order = torch.argsort(imp.detach(), stable=True)
        n = imp.numel()
        ranks = torch.empty(n, dtype=imp.dtype, device=imp.device)
        ranks.scatter_(0, order, torch.arange(n, dtype=imp.dtype, device=imp.device))
        ranks = (ranks + 0.5) / n
        self._rank_cache[g.key] = (imp._version, imp, ranks, order)
        return ranks, order

    def order(self, g: Group) -> torch.Tensor:
        """Indices of g's elements from least to most important (ties by index, as the ranks)."""
        return self._sorted(g)[1]

    def soft_mask(self, g: Group, ratio: torch.Tensor | None = None) -> torch.Tensor:
        """Differentiable mask of group g from its ratio and importance (``differentiable_topk``)."""
        r = self.ratio(g) if ratio is None else ratio
        return mask_from_ranks(self._sorted(g)[0], r, g.lam)

    def keep(self, g: Group, soft: torch.Tensor | None = None) -> torch.Tensor:
        """Boolean mask of the elements the export keeps (the most important ones)."""
        soft = self.soft_mask(g) if soft is None else soft
        return hard_keep(self.importance(g), g.hard_count(soft), order=self.order(g))

    @torch.no_grad()
    def clamp_(self) -> None:
        """Keep every ratio inside its bounds (at least one channel for width groups)."""
        for g in self.groups:
            self.ratio(g).clamp_(g.min_ratio(), g.bounds.max_ratio)


def _match(name: str, patterns: Iterable[str]) -> bool:
    return any(name == p or name.startswith(p + ".") or fnmatch.fnmatchcase(name, p) for p in patterns)


def build_search_space(tr: TraceResult, *, exclude: Iterable[str] = (), bounds: dict[str, GroupBounds] | None = None,
                       default_bounds: GroupBounds | None = None, prune_width: bool = True, prune_heads: bool = True,
                       prune_head_dim: bool = False, prune_depth: bool = True, min_width: int = 2) -> list[Group]:
    """Turn the traced spaces into groups, honouring exclusions, bounds and which dimension kinds to search."""
    exclude = list(exclude)
    bounds = dict(bounds or {})
    default_bounds = default_bounds or GroupBounds()
    # parameters of excluded modules fix their spaces
    for rec in tr.params.values():
        if exclude and _match(rec.module, exclude):
            for s in rec.dims:
                for leaf in s.leaves():
                    leaf.fixed = True
                    leaf.fix_reasons.append(f"module {rec.module} excluded by the user")
    leaves: dict[int, tuple[Space, list[str]]] = {}
    order: list[int] = []
    for rec in tr.params.values():
        for d, s in enumerate(rec.dims):
            for leaf in s.leaves():
                if id(leaf) not in leaves:
                    leaves[id(leaf)] = (leaf, [])
                    order.append(id(leaf))
                leaves[id(leaf)][1].append(f"{rec.name}:{d}")
    groups: list[Group] = []
    used_names: set[str] = set()
    for key in order:
        leaf, members = leaves[key]
        if leaf.fixed or leaf.size < min_width or "act" not in leaf.tags:
            continue
        if "split" in leaf.tags:
            if "conv_groups" in leaf.tags:  # whole groups of a grouped convolution
                kind = "groups"
            elif "group_channels" in leaf.tags:  # channels per group of a grouped convolution
                kind = "width"
            elif "heads" in leaf.tags and "head_dim" not in leaf.tags:
                kind = "heads"
            elif "head_dim" in leaf.tags and "heads" not in leaf.tags:
                kind = "head_dim"
            else:
                continue  # a split factor that is not an attention dim: unprunable
        else:
            kind = "width"
        if (kind in ("width", "groups") and not prune_width) or (kind == "heads" and not prune_heads) or \
                (kind == "head_dim" and not prune_head_dim):
            continue
        base = members[0].split(":")[0].rsplit(".", 1)[0] if "." in members[0] else members[0].split(":")[0]
        name = base + ("" if kind == "width" else f"[{kind}]")
        while name in used_names:
            name = name + "'"
        used_names.add(name)
        b = next((bv for pat, bv in bounds.items() if _match(name, [pat]) or _match(base, [pat])), default_bounds)
        need = alignment(leaf)  # a kernel's alignment (e.g. fused MoE experts): the divisor honours it too
        if need > 1 and b.divisor % need:
            b = GroupBounds(b.min_ratio, b.max_ratio, math.lcm(b.divisor, need))
        lam = float(leaf.size) if kind in ("width", "head_dim") else 4.0 * leaf.size
        groups.append(Group(name, kind, leaf.size, lam, b, space=leaf, members=members))
    if prune_depth:
        by_container: dict[str, list[BlockRecord]] = {}
        for blk in tr.blocks:
            if exclude and (_match(blk.name, exclude) or _match(blk.container, exclude)):
                continue
            by_container.setdefault(blk.container, []).append(blk)
        for cname, blks in by_container.items():
            name = f"{cname or 'model'}[depth]"
            b = next((bv for pat, bv in bounds.items() if _match(name, [pat]) or _match(cname, [pat])),
                     GroupBounds(default_bounds.min_ratio, default_bounds.max_ratio, 1))
            groups.append(Group(name, "depth", len(blks), depth_lambda(len(blks)), b, blocks=blks,
                                members=[bk.name for bk in blks]))
    return groups


def leaf_index(space: Space, leaf: Space) -> torch.Tensor:
    """For each flat position of ``space``, the element of ``leaf`` it belongs to, or -1 (a LongTensor).

    ``space`` may be composite: a concatenation lays its parts end to end, a product is row-major,
    exactly as the masker composes masks (``Masker._compose``). Both are resolved to their union-find
    roots first, so any member of the leaf's class may be passed. In a product, a position belongs
    to the element of the first (outermost) factor that holds the leaf: position ``(i, j)`` of
    ``leaf x other`` is element ``i``; of ``other x leaf`` element ``j``. Only a product of the leaf
    with itself has two candidates; the first factor is taken, so that every element owns the same
    number of positions (taking the larger index, as an older copy did, gave element ``k`` of an
    ``n x n`` product ``2k + 1`` positions and biased L1 importance towards high indices).
    """
    target = leaf.find()
    root = space.find()
    if root is target:
        return torch.arange(root.size)
    if root.kind == "atomic":
        return torch.full((root.size,), -1, dtype=torch.long)
    parts = [leaf_index(c, target) for c in root.children]
    if root.kind == "concat":
        return torch.cat(parts)
    out = parts[0]
    for p in parts[1:]:
        a = out[:, None].expand(-1, p.numel())
        b = p[None, :].expand(out.numel(), -1)
        out = torch.where(a >= 0, a, b).reshape(-1)
    return out
