"""Helpers for searching under ``torch.distributed`` (DDP / FSDP data parallelism).

``DMS`` sets itself up when a process group is initialized at construction: importance
updates and ratio gradients are all-reduced (mean), so ranks that start equal stay equal.
These helpers make the start equal after a rank-local change (e.g. a checkpoint loaded on
rank 0 only) and check that the ranks agree.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

if TYPE_CHECKING:
    from .search import DMS

__all__ = ["broadcast_search_state", "check_in_sync", "search_state_in_sync"]


def _initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


@torch.no_grad()
def broadcast_search_state(dms: "DMS", src: int = 0) -> None:
    """Copy rank ``src``'s ratios, importance and step counters to every rank (no-op without a group)."""
    if not _initialized():
        return
    for t in list(dms.space.ratios.values()) + [dms.space.importance(g) for g in dms.groups]:
        dist.broadcast(t.data, src=src)
    meta = [dms.step_count, dms.weight, dms._refine_started, dms.nonfinite_steps]
    obj = [meta]
    dist.broadcast_object_list(obj, src=src)
    dms.step_count, dms.weight, refine, dms.nonfinite_steps = obj[0]
    if refine != dms._refine_started:
        dms.load_state_dict({**dms.state_dict(), "refine_started": refine})


@torch.no_grad()
def check_in_sync(*tensor_dicts: dict[str, torch.Tensor]) -> bool:
    """True when every rank holds bitwise identical tensors in ``tensor_dicts`` (True without a group)."""
    if not _initialized():
        return True
    flat = [t.detach().float().reshape(-1) for d in tensor_dicts for _, t in sorted(d.items())]
    if not flat:
        return True
    v = torch.cat(flat)
    lo, hi = v.clone(), v.clone()
    dist.all_reduce(lo, op=dist.ReduceOp.MIN)
    dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    return bool(torch.equal(lo, hi))


def search_state_in_sync(dms: "DMS") -> bool:
    """True when every rank holds the same ratios and importance (call on all ranks)."""
    return check_in_sync(dict(dms.space.ratios.items()),
                         {g.key: dms.space.importance(g) for g in dms.groups})
