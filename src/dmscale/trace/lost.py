"""No silent loss: the dimensions a search could have pruned but that a trace had to fix.

A dimension *could have been searched* when a parameter lives in it, it flows through the
model's activations, it has at least two elements, it is not a spatial dim of a convolution or
pooling output (tokens made from patches, e.g. a position embedding's rows), and (for a factor of a split dimension) it is
an attention head / head-dim, a convolution group factor, or a factor a reshape folded into a fixed dim
(the batch: ``(B, H, T, D) -> (B * H, T, D)``). It is *lost* when the trace fixed it
for any reason other than being a model input or output or an embedding's vocabulary: an op
without a rule, a reduction over channels, slicing, a norm dmscale does not model, a folded factor
no attention op read as heads (:func:`fix_folded`), and so on.
``DMS`` names every lost dimension in one warning and in ``summary()``.
"""

from __future__ import annotations

import math
from typing import Iterable

from .records import LostDim, ParamRecord
from .spaces import Space, fix

__all__ = ["lost_dimensions", "fix_folded", "INHERENT_REASONS", "SEARCHABLE_SPLIT_TAGS", "FOLDED"]

# fixes that are part of the model's contract, not a loss
INHERENT_REASONS = ("model input", "model output", "embedding rows (vocabulary)")
# a factor of a split dimension is searchable when it carries one of these tags
SEARCHABLE_SPLIT_TAGS = ("heads", "head_dim", "conv_groups", "group_channels")
FOLDED = "folded:"  # tag prefix: a reshape folded this split factor into a fixed dim (the module after it)


def _folded_in(leaf: Space) -> str | None:
    return next((t[len(FOLDED):] for t in sorted(leaf.tags) if t.startswith(FOLDED)), None)


def _searchable_shape(leaf: Space, min_size: int) -> bool:
    if leaf.size < min_size or "act" not in leaf.tags or "spatial" in leaf.tags:
        return False  # too small, never in an activation, or a spatial / token position dim
    if "split" in leaf.tags:
        if "heads" in leaf.tags and "head_dim" in leaf.tags:
            return False
        return any(t in leaf.tags for t in SEARCHABLE_SPLIT_TAGS) or _folded_in(leaf) is not None
    return True


def fix_folded(params: dict[str, ParamRecord] | Iterable[ParamRecord]) -> None:
    """Fix, with a reason naming the module, every parameter's split factor that a reshape folded into a fixed
    dim (the batch) and that no attention op then tagged as heads: it cannot be searched, and without the
    reason it would stay an anonymous factor, neither a group nor a lost dimension."""
    recs = list(params.values()) if isinstance(params, dict) else list(params)
    for rec in recs:
        for s in rec.dims:
            for leaf in s.leaves():
                where = _folded_in(leaf)
                if where is not None and not leaf.fixed and not any(t in leaf.tags for t in SEARCHABLE_SPLIT_TAGS):
                    fix(leaf, f"folded into the batch dim by a reshape in {where}, and no attention op read it as "
                              "heads")


def lost_dimensions(params: dict[str, ParamRecord] | Iterable[ParamRecord], min_size: int = 2) -> list[LostDim]:
    """Every fixed dimension that could have been searched (see the module docstring), in parameter order."""
    recs = list(params.values()) if isinstance(params, dict) else list(params)
    leaves: dict[int, tuple[Space, list[str], dict[str, int]]] = {}
    for rec in recs:
        numel = math.prod(s.find().size for s in rec.dims)
        for d, s in enumerate(rec.dims):
            for leaf in s.leaves():
                entry = leaves.setdefault(id(leaf), (leaf, [], {}))
                entry[1].append(f"{rec.name}:{d}")
                if not rec.is_buffer:
                    entry[2][rec.name] = numel
    out: list[LostDim] = []
    used: set[str] = set()
    for leaf, members, sizes in leaves.values():
        if not leaf.fixed or not _searchable_shape(leaf, min_size):
            continue
        reasons = [r for r in leaf.fix_reasons if r]
        if any(r.startswith(inh) for r in reasons for inh in INHERENT_REASONS):
            continue
        first = members[0].split(":")[0]
        name = first.rsplit(".", 1)[0] if "." in first else first
        while name in used:
            name += "'"
        used.add(name)
        out.append(LostDim(name, leaf.size, sum(sizes.values()), reasons[:3], members))
    return out
