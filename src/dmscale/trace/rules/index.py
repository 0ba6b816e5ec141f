"""Indexing by tensors: ``x[idx]`` (the ``__getitem__`` rule in :mod:`.shape` calls
:func:`advanced_getitem`), ``x[...] = v``, ``gather``, ``index_select``.

A dimension that is indexed by position (an int, a partial slice, a tensor of indices) is fixed:
export could not know which positions survive. Every other dimension passes through, so
indexing *over an unpruned dimension* (tokens, batch rows, a vocabulary) keeps the channels
searchable.
"""

from __future__ import annotations

from typing import Any

import torch

from ..registry import norm_dim, op_rule
from ..spaces import Space, TraceError, fix, union


def _is_index_tensor(i: Any) -> bool:
    return isinstance(i, torch.Tensor) and i.dtype != torch.bool and not i.is_floating_point()


def _full_index(src: torch.Tensor, idx: tuple) -> list[Any] | None:
    """The index with the Ellipsis expanded and trailing full slices added (None: not understood)."""
    consumed = 0
    for i in idx:
        if i is None or i is Ellipsis:
            continue
        if isinstance(i, torch.Tensor) and i.dtype == torch.bool:
            consumed += max(i.dim(), 1)
        else:
            consumed += 1
    full: list[Any] = []
    for i in idx:
        if i is Ellipsis:
            full.extend([slice(None)] * (src.dim() - consumed))
        else:
            full.append(i)
    used = sum((max(i.dim(), 1) if isinstance(i, torch.Tensor) and i.dtype == torch.bool else 1)
               for i in full if i is not None)
    if used > src.dim():
        return None
    full.extend([slice(None)] * (src.dim() - used))
    return full


def index_labels(tr, src: torch.Tensor, idx: Any, out_shape: tuple[int, ...]) -> list[Space] | None:
    """The spaces of ``src[idx]`` (fixing the dims indexed by position), or None when not understood."""
    sd = list(tr.get(src))
    where = tr.current_module() or "model"
    if not isinstance(idx, tuple):
        idx = (idx,)
    idx = tuple(torch.as_tensor(i) if isinstance(i, list) else i for i in idx)
    full = _full_index(src, idx)
    if full is None:
        return None
    advanced = any(isinstance(i, torch.Tensor) and i.dim() > 0 for i in full)
    od: list[Space] = []
    adv_pos: list[int] = []  # positions (in ``full``) of advanced indices
    adv_tensors: list[torch.Tensor] = []
    adv_at = None  # output position of the advanced block
    d = 0
    for k, i in enumerate(full):
        if i is None:
            od.append(Space(1, "unsqueeze"))
            continue
        if isinstance(i, torch.Tensor) and i.dtype == torch.bool and i.dim() > 0:
            if not advanced or any(isinstance(j, torch.Tensor) and j.dim() > 0 for j in full if j is not i):
                return None  # a mask with other tensor indices: not modelled
            for s in sd[d:d + i.dim()]:
                fix(s, f"boolean mask index in {where}")
            d += i.dim()
            adv_pos.append(k)
            adv_tensors.append(i)
            if adv_at is None:
                adv_at = len(od)
            continue
        if isinstance(i, int) or (isinstance(i, torch.Tensor) and i.dim() == 0):
            fix(sd[d], f"integer index in {where}")
            d += 1
            if advanced:
                adv_pos.append(k)
                if adv_at is None:
                    adv_at = len(od)
            continue
        if _is_index_tensor(i):
            fix(sd[d], f"tensor index in {where}")
            d += 1
            adv_pos.append(k)
            adv_tensors.append(i)
            if adv_at is None:
                adv_at = len(od)
            continue
        if isinstance(i, slice):
            start, stop, step = i.indices(src.shape[d])
            if (start, stop, step) == (0, src.shape[d], 1):
                od.append(sd[d])
            else:
                fix(sd[d], f"slice in {where}")
                s = Space(len(range(start, stop, step)), "slice", fixed=True)
                s.fix_reasons.append(f"slice in {where}")
                od.append(s)
            d += 1
            continue
        raise TraceError(f"internal: index {i!r}")
    if advanced:
        n_adv = len(out_shape) - len(od)
        if n_adv < 0:
            return None
        adjacent = adv_pos == list(range(adv_pos[0], adv_pos[-1] + 1))
        at = adv_at if adjacent else 0
        sizes = list(out_shape[at:at + n_adv])
        if len(adv_tensors) == 1 and adv_tensors[0].dtype != torch.bool and list(adv_tensors[0].shape) == sizes:
            block = list(tr.get(adv_tensors[0]))
        else:  # several index tensors broadcast together, or a mask: positions made at run time
            block = []
            for n in sizes:
                s = Space(n, "index", fixed=n > 1)
                if n > 1:
                    s.fix_reasons.append(f"advanced index in {where}")
                block.append(s)
        od = od[:at] + block + od[at:]
    return od if len(od) == len(out_shape) else None


def advanced_getitem(tr, c) -> None:
    """``x[idx]`` with tensor (or list, or mask) indices, called by the ``__getitem__`` rule: the dims indexed
    by position are fixed, the others pass through, the index's dims are placed as numpy does."""
    src, idx, out = c.args[0], c.args[1], c.out
    if not isinstance(out, torch.Tensor):
        return tr.unknown("__getitem__", c.args, c.kwargs, out)
    for t in (idx if isinstance(idx, tuple) else (idx,)):
        if isinstance(t, torch.Tensor):
            tr.get(t)
    od = index_labels(tr, src, idx, tuple(out.shape))
    if od is None or [s.find().size for s in od] != list(out.shape):
        return tr.unknown("__getitem__(tensor index)", (src,), {}, out)
    tr.set(out, od)


@op_rule("__setitem__")
def setitem(tr, c) -> None:
    """``x[idx] = v``: ``v`` is broadcast-united with the region written (indexed dims are fixed as in
    ``__getitem__``); a tensor ``v`` that is a parameter is raw."""
    x, idx, v = c.args[0], c.args[1], c.args[2]
    if not isinstance(x, torch.Tensor):
        return None
    region = x[idx]
    od = index_labels(tr, x, idx, tuple(region.shape))
    if od is None:
        return tr.unknown("__setitem__", c.args, c.kwargs, x)
    if isinstance(v, torch.Tensor):
        vd = list(tr.get(v))
        for j in range(1, min(v.dim(), region.dim()) + 1):
            if v.shape[-j] == region.shape[-j]:
                union(vd[-j], od[-j])
        if tr.is_param(v):
            tr.mark_raw(v)


@op_rule("gather")
def gather(tr, c) -> None:
    """``x.gather(dim, index)``: fixes x[dim] (positions); every other dim of the output is x's dim there, tied
    with the index's dim unless the index only repeats along it (an ``expand`` copy)."""
    x, dim, index = c.arg(0, "input"), c.arg(1, "dim"), c.arg(2, "index")
    dim = norm_dim(dim, x.dim())
    xd, idd = list(tr.get(x)), list(tr.get(index))
    fix(xd[dim], f"gather along this dim in {tr.current_module() or 'model'}")
    od: list[Space] = []
    for d in range(c.out.dim()):
        if d == dim or index.shape[d] != x.shape[d]:
            if d != dim:
                fix(xd[d], f"gather of part of this dim in {tr.current_module() or 'model'}")
            od.append(idd[d])
        elif "bcast_copy" in idd[d].find().tags and idd[d].find().kind == "atomic":
            od.append(xd[d])
        else:
            od.append(union(xd[d], idd[d]))
    tr.set(c.out, od)


@op_rule("index_select")
def index_select(tr, c) -> None:
    """``x.index_select(dim, index)``: fixes x[dim]; out[dim] is the index's dim; the others pass through."""
    x, dim, index = c.arg(0, "input"), c.arg(1, "dim"), c.arg(2, "index")
    dim = norm_dim(dim, x.dim())
    xd = list(tr.get(x))
    fix(xd[dim], f"index_select along this dim in {tr.current_module() or 'model'}")
    idd = list(tr.get(index))
    xd[dim] = idd[0] if idd else Space(1, "index")
    tr.set(c.out, xd)
