"""Shape ops: reshapes split / merge spaces, permutes reorder them, ``cat`` / ``split`` concatenate them.

Slicing a contiguous range of a dimension (``x[..., a:b]``, ``narrow``, an index list like ``[-2]``)
refines its space into a concatenation whose middle part is the slice (a fused ``qkv_proj`` cut into
q | k | v by positions); the parts are not searched on their own unless an attention op tags them as
heads. Tiling a dim (``repeat``, ``tile``, ``repeat_interleave`` by an int) makes it a product of the dim and
a fixed factor (the copies). Indexing one element, a strided slice, and copying data along a dim of size one
or by per-element counts (``repeat``, a broadcasting ``expand``) make that dimension unprunable: export could
not slice it consistently.
"""

from __future__ import annotations

from typing import Any

import torch

from ..registry import norm_dim, op_rule, tensors
from ..lost import FOLDED
from ..spaces import Space, TraceError, composite, fix, split, union
from .index import advanced_getitem


@op_rule("view", "reshape", "flatten", "unflatten", "view_as", "reshape_as", "squeeze", "unsqueeze", "squeeze_",
         "unsqueeze_", "ravel")
def reshape(tr, c) -> None:
    """Aligns input and output dims by products of sizes (size-1 dims skipped).

    One dim to one dim: same space. Several to one: a product of the input spaces. One to
    several: the input space is split into a product (heads x head_dim); an explicit int in
    a view/reshape that sized a part is recorded (export updates that attribute). Fixes
    nothing itself (a dim split two different ways is fixed by :func:`split`).
    """
    src, out = c.args[0], c.out
    sd = list(tr.get(src))
    ins = list(src.shape)
    outs = list(out.shape)
    where = tr.current_module()
    # explicit ints in the requested shape (for attribute updates on export)
    explicit: list[int] = []
    if c.name in ("view", "reshape"):
        req = c.args[1:]
        if len(req) == 1 and isinstance(req[0], (tuple, list, torch.Size)):
            req = tuple(req[0])
        explicit = [r if isinstance(r, int) else -2 for r in req]
    od: list[Space | None] = [None] * len(outs)
    i = j = 0
    while i < len(ins) or j < len(outs):
        # skip size-1 dims
        if i < len(ins) and ins[i] == 1 and (j >= len(outs) or outs[j] != 1):
            i += 1
            continue
        if j < len(outs) and outs[j] == 1 and (i >= len(ins) or ins[i] != 1):
            od[j] = Space(1, "unit")
            j += 1
            continue
        if i >= len(ins) or j >= len(outs):
            raise TraceError(f"internal: reshape {ins} -> {outs} not aligned")
        gi, gj = [i], [j]
        pi, pj = ins[i], outs[j]
        while pi != pj:
            if pi < pj:
                i += 1
                gi.append(i)
                pi *= ins[i]
            else:
                j += 1
                gj.append(j)
                pj *= outs[j]
        i += 1
        j += 1
        gi = [k for k in gi if ins[k] != 1] or gi[:1]
        gj_nz = [k for k in gj if outs[k] != 1] or gj[:1]
        for k in gj:
            if k not in gj_nz:
                od[k] = Space(1, "unit")
        if len(gi) > 1:
            note_folds([sd[k] for k in gi], where)
        if len(gi) == 1 and len(gj_nz) == 1:
            od[gj_nz[0]] = sd[gi[0]]
        elif len(gj_nz) == 1:
            od[gj_nz[0]] = composite("product", [sd[k] for k in gi], f"merge:{where}")
        elif len(gi) == 1:
            parts = split(sd[gi[0]], [outs[k] for k in gj_nz], "product", f"split:{where}")
            for k, p in zip(gj_nz, parts):
                od[k] = p
                if explicit and k < len(explicit) and explicit[k] == outs[k]:
                    tr.record_reshape(outs[k], p)
        else:
            merged = composite("product", [sd[k] for k in gi], f"merge:{where}")
            parts = split(merged, [outs[k] for k in gj_nz], "product", f"split:{where}")
            for k, p in zip(gj_nz, parts):
                od[k] = p
    tr.set(out, [s if s is not None else Space(outs[k], "unit") for k, s in enumerate(od)])


def note_folds(merged: list[Space], where: str) -> None:
    """A reshape merging a factor split off a feature dim with a dim of the model's input (the batch: heads
    folded into it, ``(B, H, T, D) -> (B * H, T, D)``) tags that factor ``folded:<module>``: unless an attention
    op then reads it as heads, the trace fixes it at the end and names it as lost
    (:func:`dmscale.trace.lost.fix_folded`). Merging heads back with a fixed copy factor (grouped-query
    ``repeat_kv``) is not a fold."""
    leaves = [leaf for s in merged for leaf in s.leaves()]
    if any(leaf.fixed and any(r.startswith("model input") for r in leaf.fix_reasons) for leaf in leaves):
        for leaf in leaves:
            if not leaf.fixed and "split" in leaf.tags and leaf.size > 1:
                leaf.tags.add(f"{FOLDED}{where or 'model'}")


@op_rule("permute", "transpose", "transpose_", "t", "swapaxes", "swapdims", "movedim", "moveaxis")
def permute(tr, c) -> None:
    """Reorders the input's spaces. Couples and fixes nothing."""
    name, args, kwargs = c.name, c.args, c.kwargs
    src = args[0]
    sd = list(tr.get(src))
    n = src.dim()
    if name == "permute":
        perm = args[1:] if len(args) > 1 and isinstance(args[1], int) else (args[1] if len(args) > 1 else kwargs["dims"])
        od = [sd[norm_dim(p, n)] for p in perm]
    elif name in ("transpose", "transpose_", "swapaxes", "swapdims"):
        d0 = norm_dim(args[1] if len(args) > 1 else kwargs["dim0"], n)
        d1 = norm_dim(args[2] if len(args) > 2 else kwargs["dim1"], n)
        od = list(sd)
        od[d0], od[d1] = od[d1], od[d0]
    elif name == "t":
        od = sd[::-1]
    else:  # movedim
        srcd = args[1] if len(args) > 1 else kwargs["source"]
        dst = args[2] if len(args) > 2 else kwargs["destination"]
        srcd = [srcd] if isinstance(srcd, int) else list(srcd)
        dst = [dst] if isinstance(dst, int) else list(dst)
        srcd = [norm_dim(d, n) for d in srcd]
        dst = [norm_dim(d, n) for d in dst]
        moved: list[Space | None] = [None] * n
        for s_, d_ in zip(srcd, dst):
            moved[d_] = sd[s_]
        rest = iter([sd[i] for i in range(n) if i not in srcd])
        od = [o if o is not None else next(rest) for o in moved]
    tr.set(c.out, list(od))


@op_rule("get:T", "get:mT", "get:mH", "get:H")
def transpose_property(tr, c) -> None:
    """``t.T`` reverses the spaces; ``t.mT`` / ``t.mH`` / ``t.H`` swap the last two."""
    src = c.args[0] if c.args else None
    if not isinstance(src, torch.Tensor):
        return tr.unknown(c.name, c.args, c.kwargs, c.out)
    d = list(tr.get(src))
    tr.set(c.out, d[::-1] if c.name == "get:T" else d[:-2] + [d[-1], d[-2]])


@op_rule("expand", "expand_as", "broadcast_to")
def expand(tr, c) -> None:
    """Kept dims keep their space; a dim broadcast from size 1 (e.g. ``repeat_kv``) is a new fixed space."""
    src, out = c.args[0], c.out
    sd = list(tr.get(src))
    od: list[Space] = []
    lead = out.dim() - src.dim()
    for i, n in enumerate(out.shape):
        j = i - lead
        if j >= 0 and src.shape[j] == n:
            od.append(sd[j])
        else:  # broadcast copies (e.g. repeat_kv): not a dimension export could slice
            od.append(Space(n, "expand", fixed=n > 1))
            od[-1].tags.add("bcast_copy")  # equal values along it (an index built this way may follow any slice)
    tr.set(out, od)


@op_rule("cat", "concat", "concatenate")
def cat(tr, c) -> None:
    """The cat dim becomes a concatenation of the inputs' spaces; every other dim is coupled across inputs."""
    out = c.out
    ts = list(c.args[0] if c.args else c.kwargs["tensors"])
    dim = c.kwargs.get("dim", c.args[1] if len(c.args) > 1 else 0)
    ts = [t for t in ts if t.numel() > 0 or t.dim() == out.dim()]
    dim = norm_dim(dim, out.dim())
    labs = [list(tr.get(t)) for t in ts]
    for t in ts:
        if tr.is_param(t):
            tr.mark_raw(t)
    od: list[Space] = []
    for d in range(out.dim()):
        if d == dim:
            od.append(composite("concat", [lab[d] for lab in labs], f"cat:{tr.current_module()}")
                      if len(labs) > 1 else labs[0][d])
        else:
            s = labs[0][d]
            for lab in labs[1:]:
                s = union(s, lab[d])
            od.append(s)
    tr.set(out, od)


@op_rule("stack")
def stack(tr, c) -> None:
    """Couples all inputs dim by dim; the new dim is a new space."""
    out = c.out
    ts = c.args[0] if c.args else c.kwargs["tensors"]
    dim = c.kwargs.get("dim", c.args[1] if len(c.args) > 1 else 0)
    dim = norm_dim(dim, out.dim())
    tr.broadcast_union(list(ts), None)
    base = list(tr.get(ts[0]))
    tr.set(out, base[:dim] + [Space(len(ts), "stack")] + base[dim:])


def equal_parts(space: Space, n: int, origin: str) -> list[Space]:
    """``n`` equal pieces of a space (``chunk`` / ``split`` into equal sizes) as ONE space repeated.

    The pieces of an equal ``chunk`` are pruned alike (element i of every piece together), so the
    op still cuts the smaller tensor into equal pieces after export: ``gate, up = h.chunk(2)``
    keeps the gated FFN searchable. A space already split in another way keeps that split.
    """
    root = space.find()
    size = root.size // n
    if root.kind == "concat" and len(root.children) == n and all(c.find().size == size for c in root.children):
        return list(root.children)
    if root.kind != "atomic":
        return split(root, [size] * n, "concat", origin)
    part = Space(size, origin, fixed=root.fixed)
    part.fix_reasons = list(root.fix_reasons)
    part.owned = True
    part.tags = {t for t in root.tags if t != "act"}
    root.kind = "concat"
    root.children = [part] * n
    return [part] * n


def slice_part(space: Space, start: int, stop: int, origin: str) -> Space | None:
    """The elements ``[start, stop)`` of a space as a part of a concatenation (None: not expressible).

    An atomic space is refined into (head | part | tail); a concatenation is refined inside the
    children the bounds fall in (so ``qkv[..., :q]``, ``qkv[..., q:q+k]``, ``qkv[..., q+k:]`` give
    the three parts q | k | v). The new parts are tagged 'split': not searched as widths on their own.
    """
    root = space.find()
    n = root.size
    if start == 0 and stop == n:
        return root
    if not 0 <= start < stop <= n:
        return None
    if root.kind == "atomic":
        sizes = [x for x in (start, stop - start, n - stop) if x > 0]
        parts = split(root, sizes, "concat", origin)
        return parts[1] if start > 0 else parts[0]
    if root.kind != "concat":
        return None
    covered: list[Space] = []
    off = 0
    for child in list(root.children):
        cs = child.find().size
        lo, hi = max(start, off), min(stop, off + cs)
        if lo < hi:
            part = child if (lo, hi) == (off, off + cs) else slice_part(child, lo - off, hi - off, origin)
            if part is None:
                return None
            covered.append(part)
        off += cs
    return covered[0] if len(covered) == 1 else composite("concat", covered, origin)


@op_rule("split", "chunk", "unbind", "tensor_split", "split_with_sizes")
def split_op(tr, c) -> None:
    """The split dim is refined into a concatenation of the pieces' sizes; ``unbind`` fixes its dim.

    Equal pieces (``chunk(n)``, ``split(size)`` with a divisible dim) are one space repeated (see
    :func:`equal_parts`); unequal pieces are separate parts. An int ``split_size`` is recorded like
    an explicit reshape int (export updates it).
    """
    name, args, kwargs = c.name, c.args, c.kwargs
    src = args[0]
    outs = tensors(c.out)
    sd = list(tr.get(src))
    if name == "unbind":
        dim = norm_dim(kwargs.get("dim", args[1] if len(args) > 1 else 0), src.dim())
        fix(sd[dim], f"unbind in {tr.current_module()}")
        for o in outs:
            tr.set(o, sd[:dim] + sd[dim + 1:])
        return
    dim = kwargs.get("dim", args[2] if len(args) > 2 else 0)
    dim = norm_dim(dim, src.dim())
    sizes = [o.shape[dim] for o in outs]
    origin = f"split:{tr.current_module()}"
    if len(outs) <= 1:
        parts = [sd[dim]]
    elif name in ("split", "chunk") and len(set(sizes)) == 1:
        parts = equal_parts(sd[dim], len(outs), origin)
    else:
        parts = split(sd[dim], sizes, "concat", origin)
    for o, p in zip(outs, parts):
        tr.set(o, sd[:dim] + [p] + sd[dim + 1:])
    size_arg = args[1] if len(args) > 1 else kwargs.get("split_size_or_sections", kwargs.get("split_size"))
    if name == "split" and isinstance(size_arg, int) and len(outs) > 1:
        tr.record_reshape(size_arg, parts[0])


def _as_slice(i: Any, n: int) -> Any:
    """An index list of consecutive ascending ints (``x[..., [-2], :]``) as the equivalent slice."""
    if isinstance(i, list) and i and all(isinstance(v, int) and not isinstance(v, bool) for v in i):
        vals = [v + n if v < 0 else v for v in i]
        if all(0 <= v < n for v in vals) and vals == list(range(vals[0], vals[0] + len(vals))):
            return slice(vals[0], vals[-1] + 1, 1)
    return i


@op_rule("__getitem__")
def getitem(tr, c) -> None:
    """Full slices and ``None`` / ``...`` keep spaces; a contiguous slice (or an index list of
    consecutive ints) is a part of its dim (:func:`slice_part`); an int index or a strided slice
    fixes the indexed dim (tensor and mask indices: :func:`.index.advanced_getitem`)."""
    src, idx, out = c.args[0], c.args[1], c.out
    sd = list(tr.get(src))
    where = tr.current_module() or "model"
    if not isinstance(idx, tuple):
        idx = (idx,)
    idx = _lists_as_slices(idx, src)
    if any(isinstance(i, torch.Tensor) and i.dtype != torch.bool for i in idx) or \
            any(isinstance(i, (list,)) for i in idx):
        return advanced_getitem(tr, c)  # indexing by tensors / lists: rules/index.py
    n_real = sum(1 for i in idx if i is not None and i is not Ellipsis and not (isinstance(i, torch.Tensor)))
    bool_dims = sum(i.dim() for i in idx if isinstance(i, torch.Tensor))
    if bool_dims:
        return advanced_getitem(tr, c)
    full: list[Any] = []
    for i in idx:
        if i is Ellipsis:
            full.extend([slice(None)] * (src.dim() - n_real))
        else:
            full.append(i)
    while sum(1 for i in full if i is not None) < src.dim():
        full.append(slice(None))
    od: list[Space] = []
    d = 0
    for i in full:
        if i is None:
            od.append(Space(1, "unsqueeze"))
            continue
        if isinstance(i, int) or (isinstance(i, torch.Tensor) and i.dim() == 0):
            fix(sd[d], f"integer index in {where}")
            d += 1
            continue
        if isinstance(i, slice):
            start, stop, step = i.indices(src.shape[d])
            part = slice_part(sd[d], start, stop, f"slice:{where}") if step == 1 else None
            if len(range(start, stop, step)) == 0:  # an empty slice (``q[..., d:]`` with nothing left) cuts nothing
                od.append(Space(0, "empty"))
            elif part is not None:
                od.append(part)
            else:
                fix(sd[d], f"slice in {where}")
                od.append(Space(len(range(start, stop, step)), "slice", fixed=True))
            d += 1
            continue
        raise TraceError(f"internal: index {i!r}")
    if len(od) != out.dim():
        return tr.unknown("__getitem__", (src,), {}, out)
    tr.set(out, od)


def _lists_as_slices(idx: tuple, src: torch.Tensor) -> tuple:
    """Replace index lists that select a consecutive range by slices (their dim is kept, like a slice)."""
    if not any(isinstance(i, list) for i in idx):
        return idx
    n_real = sum(1 for i in idx if i is not None and i is not Ellipsis)
    out, d = [], 0
    for i in idx:
        if i is Ellipsis:
            d += src.dim() - n_real
        elif i is not None:
            i = _as_slice(i, src.shape[d]) if d < src.dim() else i
            d += 1
        out.append(i)
    return tuple(out)


@op_rule("narrow", "select")
def narrow_select(tr, c) -> None:
    """``select`` fixes and drops its dim; ``narrow`` is a slice (see :func:`slice_part`)."""
    src, out = c.args[0], c.out
    dim = norm_dim(c.args[1], src.dim())
    dims = list(tr.get(src))
    if c.name == "select":
        fix(dims[dim], f"select in {tr.current_module()}")
        tr.set(out, dims[:dim] + dims[dim + 1:])
    else:
        if out.shape[dim] != src.shape[dim]:
            start = c.args[2] if len(c.args) > 2 else c.kwargs["start"]
            start = int(start) + (src.shape[dim] if int(start) < 0 else 0)
            part = slice_part(dims[dim], start, start + out.shape[dim], f"narrow:{tr.current_module()}")
            if part is None:
                fix(dims[dim], f"narrow in {tr.current_module()}")
                part = Space(out.shape[dim], "narrow", fixed=True)
            dims[dim] = part
        tr.set(out, dims)


@op_rule("pad")
def pad(tr, c) -> None:
    """A padded dim is fixed (its output is a new space); unpadded dims pass through."""
    src, out = c.args[0], c.out
    amounts = c.args[1] if len(c.args) > 1 else c.kwargs["pad"]
    k = len(amounts) // 2
    sd = list(tr.get(src))
    for i in range(k):
        d = src.dim() - 1 - i
        if amounts[2 * i] or amounts[2 * i + 1]:
            fix(sd[d], f"pad in {tr.current_module()}")
            sd[d] = Space(out.shape[d], "pad")
    tr.set(out, sd)


@op_rule("roll")
def roll(tr, c) -> None:
    """Rolled dims are fixed (a cyclic shift: Swin's shifted windows); the others pass through."""
    src = c.args[0]
    dims = c.arg(2, "dims", None)
    sd = list(tr.get(src))
    rolled = range(src.dim()) if dims is None else [norm_dim(d, src.dim()) for d in
                                                     ((dims,) if isinstance(dims, int) else dims)]
    for d in rolled:
        fix(sd[d], f"roll in {tr.current_module() or 'model'}")
    tr.set(c.out, sd)


@op_rule("repeat", "tile", "repeat_interleave")
def repeat(tr, c) -> None:
    """Unchanged dims pass through. A dim of size n tiled k times (``repeat`` / ``tile``: copy r of element i
    at r * n + i) is the product (k copies x the dim), ``repeat_interleave`` by an int k (at i * k + r) the
    product (the dim x k copies): the copies are a new fixed factor and the dim itself stays prunable
    (DeBERTa repeats per-head position keys over the batch folded with the heads). A dim broadcast from size
    1, or repeated by per-element counts, is fixed and its output is a new fixed space."""
    src, out = c.args[0], c.out
    sd = list(tr.get(src))
    where = tr.current_module() or "model"
    interleave = c.name == "repeat_interleave"
    if interleave and (out.dim() != src.dim() or not isinstance(c.arg(1, "repeats", None), int)):
        return _fix_repeated(tr, c, sd, where)  # flattened (dim=None) or per-element counts: not a product
    od = []
    lead = out.dim() - src.dim()
    for i, n in enumerate(out.shape):
        j = i - lead
        if j >= 0 and src.shape[j] == n:
            od.append(sd[j])
        elif j >= 0 and src.shape[j] > 1 and n % src.shape[j] == 0:
            copies = Space(n // src.shape[j], c.name, fixed=True)
            copies.fix_reasons.append(f"copies made by {c.name} in {where}")
            od.append(composite("product", [sd[j], copies] if interleave else [copies, sd[j]], f"{c.name}:{where}"))
        else:
            if j >= 0:
                fix(sd[j], f"{c.name} in {where}")
            od.append(Space(n, c.name, fixed=True))
    tr.set(out, od)


def _fix_repeated(tr, c, sd: list[Space], where: str) -> None:
    """Every dim whose size changed is fixed; the output's dims are new fixed spaces there."""
    src, out = c.args[0], c.out
    for j, s in enumerate(sd):
        if out.dim() != src.dim() or out.shape[j] != src.shape[j]:
            fix(s, f"{c.name} in {where}")
    tr.set(out, [sd[i] if out.dim() == src.dim() and out.shape[i] == src.shape[i] else Space(n, c.name, fixed=True)
                 for i, n in enumerate(out.shape)])
