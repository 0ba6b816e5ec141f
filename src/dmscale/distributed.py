"""Searching under ``torch.distributed``: data parallel (DDP) and sharded (FSDP2 ``fully_shard``) models.

``DMS`` sets itself up when a process group is initialized at construction: importance
updates and ratio gradients are all-reduced (mean), so ranks that start equal stay equal.

**Order with FSDP2.** Build ``DMS`` on the plain (unsharded) model first, then shard it::

    dms = dmscale.DMS(model, (x,), target, total_steps)      # after init_process_group
    for block in blocks:
        fully_shard(block)
    fully_shard(model)
    opt = torch.optim.AdamW([{"params": dms.weight_parameters()},      # DTensors now
                             {"params": dms.structure_parameters(), "weight_decay": 0.0}])
    ...
    small = dms.export()            # collective: every rank gets the same full smaller model
    small = dmscale.distributed.export(dms, rank=0)   # or: rank 0 only (others get None)

The tracer labels parameters by identity and FSDP2 swaps them for DTensors (and all-gathers
other tensors in each forward), so a model that is already sharded is refused with a clear
error. Masks folded into weights through a parametrization keep working after sharding: FSDP2
shards ``parametrizations.<name>.original`` and the parametrization runs on the all-gathered
weight inside the forward; read outside a forward (a sharded DTensor) the mask is applied as a
replicated DTensor. Masks installed on parameters that are DTensors already (sharded before the
masks went in) are not folded: those layers fall back to activation masks.

Helpers here also make the start equal after a rank-local change (e.g. a checkpoint loaded on
rank 0 only) and check that the ranks agree.
"""

from __future__ import annotations

import copy
import re
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
import torch.nn as nn

from ._sharded import fsdp_module_class, is_dtensor, is_sharded

if TYPE_CHECKING:
    from .search import DMS

__all__ = ["broadcast_search_state", "check_in_sync", "search_state_in_sync", "export", "is_sharded",
           "is_dtensor", "full_state_dict", "move_search_state", "ShardingOrderError"]


class ShardingOrderError(ValueError):
    """``DMS`` was given a model that ``fully_shard`` has already sharded (build DMS first, then shard)."""


def _initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


# ------------------------------------------------------------------ DTensor / FSDP detection
def refuse_sharded(model: nn.Module) -> None:
    """Raise :class:`ShardingOrderError` when ``model`` is already sharded (called by ``DMS``)."""
    fsdp = fsdp_module_class()
    names = [n or "<root>" for n, m in model.named_modules() if fsdp is not None and isinstance(m, fsdp)]
    names += [n for n, p in model.named_parameters() if is_dtensor(p)][:3]
    if names:
        raise ShardingOrderError(
            "DMS must be built on the unsharded model, before fully_shard: these are sharded already: "
            f"{', '.join(names[:5])}{' ...' if len(names) > 5 else ''}. Build dmscale.DMS(model, ...) after "
            "init_process_group, then call fully_shard on the blocks and the root (see dmscale.distributed).")


# ------------------------------------------------------------------ search state placement
@torch.no_grad()
def move_search_state(dms: "DMS", device: torch.device | str) -> None:
    """Move the search state (ratios, importance) and the example inputs to ``device``.

    For a model too large for one accelerator: build ``DMS`` on the CPU copy, move the search
    state to the GPU, then ``fully_shard`` (FSDP2 moves the model's shards to the mesh's device).
    The ratio parameters stay the same objects (their gradient hooks and optimizer entries hold).
    """
    from torch.utils._pytree import tree_map

    dms.space.to(device)
    dms.space._rank_cache.clear()
    move = (lambda t: t.to(device) if isinstance(t, torch.Tensor) else t)
    dms.example_inputs = tuple(tree_map(move, list(dms.example_inputs)))
    dms.example_kwargs = tree_map(move, dms.example_kwargs)


# ------------------------------------------------------------------ search state in sync
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


# ------------------------------------------------------------------ full (unsharded) copy for export
def take_skeleton(dms: "DMS") -> nn.Module:
    """A copy of the unmasked model with every parameter and buffer on the meta device (no memory).

    Taken when ``DMS`` is built under a process group, before the model can be sharded: FSDP2
    modules cannot be deep-copied, so the sharded export fills this skeleton with gathered weights.
    """
    model = dms.model
    with dms.masker.detached():
        memo: dict[int, Any] = {}
        for t in list(model.parameters()) + list(model.buffers()):
            meta = torch.empty_like(t, device="meta")
            memo[id(t)] = nn.Parameter(meta, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else meta
        return copy.deepcopy(model, memo)


_PARAMETRIZED = re.compile(r"(^|\.)parametrizations\.([^.]+)\.original$")


def _plain_name(name: str) -> str:
    """``a.parametrizations.weight.original`` -> ``a.weight`` (the name without dmscale's parametrization)."""
    return _PARAMETRIZED.sub(r"\1\2", name)


@torch.no_grad()
def full_state_dict(model: nn.Module, keep: bool = True, device: torch.device | str | None = None
                    ) -> dict[str, torch.Tensor]:
    """Every parameter of a (sharded) model as a full plain tensor, under its unmasked name.

    Collective under FSDP: every rank must call it (DTensors are all-gathered one at a time, in
    ``named_parameters`` order). With ``keep=False`` the gathered tensors are dropped at once (the
    ranks that do not receive the export); ``device`` moves each one (e.g. ``"cpu"`` to keep the
    accelerator free).
    """
    out: dict[str, torch.Tensor] = {}
    for name, p in model.named_parameters():
        t = p.detach()
        if is_dtensor(t):
            full = t.full_tensor()
            if full.untyped_storage().data_ptr() == t.to_local().untyped_storage().data_ptr():
                full = full.clone()  # one rank: the "gathered" tensor is the shard itself
            t = full
        else:
            t = t.clone()  # a fresh tensor: export scales it in place
        if keep:
            out[_plain_name(name)] = t.to(device) if device is not None else t
    return out


def _full_model(dms: "DMS", keep: bool, device: torch.device | str | None) -> nn.Module | None:
    """The unmasked model with full weights (gathered from the shards) on this rank, or None without ``keep``."""
    skel = getattr(dms, "_skeleton", None)
    if skel is None:
        raise RuntimeError("this DMS has no unsharded copy of the model to export into: it was built without an "
                           "initialized process group. Call torch.distributed.init_process_group before "
                           "dmscale.DMS(model, ...), and fully_shard after it")
    state = full_state_dict(dms.model, keep=keep, device=device)
    if not keep:
        return None
    new = copy.deepcopy(skel)
    named = dict(new.named_parameters())
    missing = sorted(set(named) - set(state))
    extra = sorted(set(state) - set(named))
    if missing or extra:
        raise RuntimeError("the sharded model's parameters differ from the model DMS was built on: "
                           f"missing {missing[:5]}, unexpected {extra[:5]}")
    repl = {id(p): nn.Parameter(state[n], requires_grad=p.requires_grad) for n, p in named.items()}
    live_bufs = dict(dms.model.named_buffers())
    for mname, mod in new.named_modules():
        for k, p in list(mod._parameters.items()):
            if p is not None:
                mod._parameters[k] = repl[id(p)]
        for k, b in list(mod._buffers.items()):
            if b is None:
                continue
            qn = f"{mname}.{k}" if mname else k
            if qn not in live_bufs:
                raise RuntimeError(f"buffer '{qn}' of the model DMS was built on is missing from the sharded model")
            src = live_bufs[qn].detach()
            mod._buffers[k] = src.to(device if device is not None else src.device, copy=True)
    return new


# ------------------------------------------------------------------ export of a sharded search
@torch.no_grad()
def export(dms: "DMS", rank: int | None = None, check: bool = True, atol: float = 1e-4, rtol: float = 1e-4,
           device: torch.device | str | None = None, project: bool | None = None) -> nn.Module | None:
    """Export a (possibly FSDP-sharded) search: the same smaller model on every rank, or on ``rank`` only.

    On a sharded model this is collective (every rank must call it): the ranks check that they hold
    the same search state, run the hard-masked supernet on the examples (the export check's
    reference), all-gather the weights into an unsharded copy of the model, and export that.
    With ``rank=r`` only rank ``r`` keeps the gathered weights and returns the model; the others
    return None. ``device`` places the gathered weights (default: where the shards live).
    ``project`` as in ``dms.export``: first land on the budget (the same on every rank: the
    projection reads only the search state). On an unsharded model (no FSDP) this is
    ``dms.export()`` on the chosen rank(s) (not collective).
    """
    me = dist.get_rank() if _initialized() else 0
    keep = rank is None or rank == me
    if not is_sharded(dms.model):
        return dms.export(check=check, atol=atol, rtol=rtol, project=project) if keep else None
    from .export import export_model, reference_outputs, verify_export

    if project is None:
        project = dms.config.project_export and dms._ratios_as_left()
    if project:
        dms.project(when="export")
    if not search_state_in_sync(dms):
        raise RuntimeError("the ranks hold different search states (ratios / importance): every rank must run the "
                           "same steps; dmscale.distributed.broadcast_search_state(dms) copies rank 0's state")
    was = dms.model.training
    ref = reference_outputs(dms) if check else None
    full = _full_model(dms, keep, device)
    dms.model.train(was)
    if full is None:
        return None
    new = export_model(dms, check=False, source=full)
    if check:
        verify_export(dms, new, atol=atol, rtol=rtol, reference=ref)
    return new
