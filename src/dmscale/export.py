"""Export: slice the supernet to its hard masks, fold surviving mask values, drop removed blocks."""

from __future__ import annotations

import copy
from collections import OrderedDict
from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn

from ._sharded import is_sharded
from .errors import ExportError
from .layers.spec import spec_for
from .layers.weightnorm import begin_export, detach_legacy_weights, finish_export, fold_weight_norm, weight_norms
from .trace.tracer import Space

if TYPE_CHECKING:
    from .search import DMS

__all__ = ["export_model", "ExportError", "SkipBlock", "reference_outputs", "verify_export"]


def _along(v: torch.Tensor, d: int, ndim: int) -> torch.Tensor:
    shape = [1] * ndim
    shape[d] = v.numel()
    return v.view(shape)


def _get_module(root: nn.Module, name: str) -> nn.Module:
    return root.get_submodule(name) if name else root


@torch.no_grad()
def export_model(dms: "DMS", check: bool = True, atol: float = 1e-4, rtol: float = 1e-4,
                 source: nn.Module | None = None) -> nn.Module:
    """Build the smaller model; with ``check`` verify it against the hard-masked supernet.

    ``source``: an unmasked, unsharded full copy of the model to slice in place (the sharded export
    passes the gathered weights); by default a deep copy of ``dms.model`` without its masks. A model
    sharded with FSDP2 is exported by :func:`dmscale.distributed.export` (``dms.export()`` calls it).
    """
    if source is None and is_sharded(dms.model):
        raise ExportError("the model is sharded with fully_shard: export it with dms.export() or "
                          "dmscale.distributed.export(dms) on every rank (collective)")
    masker = dms.masker
    tr = dms.trace
    with masker.use_mode("hard"):
        masker.begin_forward()
        masks: dict[int, torch.Tensor | None] = {}
        keeps: dict[int, torch.Tensor | None] = {}

        def mask_of(s: Space) -> torch.Tensor | None:
            r = s.find()
            if id(r) not in masks:
                masks[id(r)] = masker.mask_for(r)
                keeps[id(r)] = masker.keep_for(r)
            return masks[id(r)]

        def keep_of(s: Space) -> torch.Tensor | None:
            mask_of(s)
            return keeps[id(s.find())]

        for rec in tr.params.values():
            for s in rec.dims:
                mask_of(s)
        for rec in tr.layers.values():
            for s in rec.out_dims.values():
                mask_of(s)
        depth_keep = {g.key: masker.current_keep[g.key] for g in dms.groups if g.kind == "depth"}
    if source is not None:
        new = source
    else:
        with masker.detached():
            detach_legacy_weights(dms.model)
            new = copy.deepcopy(dms.model)
    modules = dict(new.named_modules())

    # 1. fold surviving soft mask values into each layer's output side (its spec's out_dims), and into
    #    raw parameters; a weight-normalised weight (W = g v / ||v||) first stores g / ||v|| in g (see
    #    dmscale.layers.weightnorm), and its mask values go there or into v
    normed = {name: weight_norms(modules[name]) for name, rec in tr.layers.items() if not rec.tied}
    normed = {name: wns for name, wns in normed.items() if wns}
    for name, wns in normed.items():
        for wn in wns.values():
            begin_export(modules[name], wn)
    for name, rec in tr.layers.items():
        mod = modules[name]
        if rec.tied:
            continue  # shared weight: the hard-masked supernet uses 0/1 masks here
        spec = rec.spec if rec.spec is not None else spec_for(mod)
        if spec is None:
            continue
        for _, s in rec.out_dims.items():
            m = mask_of(s)
            if m is not None and name in normed:
                _fold_normed(mod, spec, normed[name], m)
            elif m is not None:
                spec.fold(mod, m)
    for rec in tr.params.values():
        if not rec.raw or rec.is_buffer:
            continue
        p = getattr(modules[rec.module], rec.attr)
        for d, s in enumerate(rec.dims):
            m = mask_of(s)
            if m is not None:
                p.mul_(_along(m.to(p.dtype), d, p.dim()))

    # 2. slice every parameter and buffer to the kept elements
    sliced: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # id(old) -> (old, new); old kept alive
    for rec in tr.params.values():
        mod = modules[rec.module]
        t = getattr(mod, rec.attr)
        if not isinstance(t, torch.Tensor):
            continue
        if id(t) in sliced and sliced[id(t)][0] is t:  # tied: reuse the already sliced tensor
            _assign(mod, rec.attr, sliced[id(t)][1], rec.is_buffer)
            continue
        out = t.detach()
        changed = False
        for d, s in enumerate(rec.dims):
            k = keep_of(s)
            if k is None or bool(k.all()):
                continue
            idx = torch.nonzero(k, as_tuple=False).flatten().to(out.device)
            out = out.index_select(d, idx)
            changed = True
        if changed:
            new_t = nn.Parameter(out.clone(), requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) \
                else out.clone()
            _assign(mod, rec.attr, new_t, rec.is_buffer)
            sliced[id(t)] = (t, new_t)

    # tied tensors (e.g. an LM head sharing the embedding) point to the sliced tensor too
    for mod in new.modules():
        for store, is_buf in ((mod._parameters, False), (mod._buffers, True)):
            for attr, t in list(store.items()):
                if t is not None and id(t) in sliced and sliced[id(t)][0] is t:
                    store[attr] = sliced[id(t)][1]
    for name, wns in normed.items():  # g = (g / ||v||)[kept] * ||v[kept]||: the kept part of the supernet's W
        for wn in wns.values():
            finish_export(modules[name], wn)

    # 3. fix the size attributes of every known layer (tied ones too: they have no layer record): attributes
    #    the trace tied to a space (a grouped conv's groups) first, then what the spec derives from the weights
    for rec in getattr(tr, "size_attrs", ()):
        k = keep_of(rec.space)
        mod = modules.get(rec.module)
        if k is not None and mod is not None:  # an int, or a one-int tuple (a LayerNorm's normalized_shape)
            n = int(k.sum())
            setattr(mod, rec.attr, (n,) if isinstance(getattr(mod, rec.attr, None), tuple) else n)
    for mname, mod in new.named_modules():
        lrec = tr.layers.get(mname)
        spec = lrec.spec if lrec is not None and lrec.spec is not None else spec_for(mod)
        if spec is None or spec.size_attrs is None and spec.update_attrs is None and spec.refresh is None:
            continue
        if spec.out_param is None or isinstance(getattr(mod, spec.out_param, None), torch.Tensor):
            spec.update(mod)
    #    and the attributes that hold sizes of searched dims: by meaning for a model with a family
    #    (dmscale.families), else the ints a module used in a view / reshape of a pruned dim, by value
    from .families.base import check_export_config, post_export_fixups, start_export
    from .families.generic import update_export

    ctx = start_export(dms, new, keep_of, depth_keep)
    guessed = _update_reshape_attrs(dms, modules, keep_of) if ctx.family is None else []

    # 4. drop removed blocks
    for g in dms.groups:
        if g.kind != "depth":
            continue
        keep = depth_keep[g.key]
        by_container: dict[str, list[tuple[int, bool]]] = {}
        for i, b in enumerate(g.blocks):
            if b.declared:
                if not bool(keep[i]):
                    parent_name, _, attr = b.name.rpartition(".")
                    setattr(_get_module(new, parent_name), attr, SkipBlock(b.input_spec))
                continue
            by_container.setdefault(b.container, []).append((b.index, bool(keep[i])))
        for cname, items in by_container.items():
            drop = {idx for idx, k in items if not k}
            if drop:
                _drop_children(new, cname, drop)

    # 5. the family's (or generic) updates after blocks were dropped: layer indices, config sizes
    update_export(ctx)
    post_export_fixups(dms, new)  # fix-ups registered with the deprecated dmscale.adapters
    new.train(dms.model.training)
    if check:
        try:
            verify_export(dms, new, atol=atol, rtol=rtol)
        except ExportError as exc:
            # a size attribute guessed wrong: the export fails to run, or gives other shapes or values
            guess = str(exc).startswith(("the exported model failed to run", "output "))
            hint = generic_fallback_hint(dms.model, guessed) if guess else ""
            if not hint:
                raise
            raise ExportError(f"{exc}{hint}") from exc
    check_export_config(ctx)  # the edited config loads, and says whether it rebuilds the export
    return new


def _fold_normed(mod: nn.Module, spec: Any, wns: dict[str, Any], m: torch.Tensor) -> None:
    """``spec.fold`` for a layer with weight-normalised parameters: those take ``m`` through their g / v."""
    for pname, d in spec.out_dims.items():
        if pname in wns:
            fold_weight_norm(mod, wns[pname], d, m)
    spec.fold(mod, m, skip=tuple(wns))


class SkipBlock(nn.Module):
    """Stands in for a removed user-declared block: returns the block's input unchanged."""

    def __init__(self, input_spec: tuple[str, Any] = ("arg", 0)) -> None:
        super().__init__()
        self.kind, self.key = input_spec[0], input_spec[1]

    def forward(self, *args: Any, **kwargs: Any) -> Any:  # noqa: D102
        return args[self.key] if self.kind == "arg" else kwargs[self.key]


def _assign(mod: nn.Module, attr: str, t: torch.Tensor, is_buffer: bool) -> None:
    if is_buffer:
        mod._buffers[attr] = t
    elif isinstance(t, nn.Parameter):
        mod._parameters[attr] = t
    else:
        setattr(mod, attr, t)


# attribute-name hints when several int attributes hold the same old value (num_heads == head_dim)
_ATTR_HINTS = {
    "heads": lambda a: "head" in a and "dim" not in a and "size" not in a,
    "head_dim": lambda a: "dim" in a or "size" in a,
}


def generic_fallback_hint(model: nn.Module, guessed: list[tuple[str, str, int, int]]) -> str:
    """For a failed export check of a Hugging Face model whose ``model_type`` has no family: what the generic
    fallback guessed (``guessed``: (module, attribute, old, new)) and how to fix it ('' for any other model)."""
    from .families.base import family_for, hf_config

    cfg = hf_config(model)
    if cfg is None or family_for(model) is not None:
        return ""
    mt = getattr(cfg, "model_type", None) or type(cfg).__name__
    if guessed:
        shown = ", ".join(f"{m}.{a} {old} -> {new}" for m, a, old, new in guessed[:4])
        more = f" (and {len(guessed) - 4} more)" if len(guessed) > 4 else ""
        what = f"; it set {shown}{more}"
        mods = list(dict.fromkeys(m for m, *_ in guessed))[:3]
        where = f"DMS(..., exclude={mods!r})"
    else:
        what, where = "", "DMS(..., exclude=[...]) for the modules whose sizes the model keeps in attributes"
    return (f" [Hugging Face model_type {mt!r} has no dmscale family: the generic fallback updated module size "
            f"attributes by value (ints equal to a pruned size), which can hit the wrong attribute or miss one"
            f"{what}. Describe the family (docs/extending.md#a-hugging-face-model-family), or leave those "
            f"dimensions unpruned with {where}.]")


def _update_reshape_attrs(dms: "DMS", modules: dict[str, nn.Module], keep_of) -> list[tuple[str, str, int, int]]:
    """Update int attributes (num_heads, head_dim) that a module used in view/reshape of a pruned dim.

    The fallback for models without a family (:mod:`dmscale.families`): attributes are found by
    their value, so an unrelated attribute with the same value may be changed too; the export
    check catches a wrong guess. Returns what it changed: (module, attribute, old, new).
    """
    changes: list[tuple[str, str, int, int]] = []
    done: set[tuple[str, int]] = set()  # (module, space) already handled (q, k and v reshape alike)
    updated: set[tuple[str, str]] = set()  # (module, attribute) already given its new value
    for rec in dms.trace.reshapes:
        k = keep_of(rec.space)
        if k is None:
            continue
        new_val = int(k.sum())
        key = (rec.module, id(rec.space.find()))
        if new_val == rec.value or key in done:
            continue
        mod = modules.get(rec.module)
        if mod is None:
            continue
        hits = [a for a, v in vars(mod).items() if not a.startswith("_") and type(v) is int and v == rec.value
                and (rec.module, a) not in updated]
        if len(hits) > 1:  # e.g. Attention(dim=4, heads=2): num_heads == head_dim == 2
            g = dms.masker.leaf_group.get(id(rec.space.find()))
            hint = _ATTR_HINTS.get(g.kind) if g is not None else None
            named = [a for a in hits if hint(a)] if hint is not None else []
            hits = named or hits
        # several attributes with the old value (e.g. GPT-2's embed_dim and split_size): update all of
        # them; the export check afterwards catches a wrong guess
        for a in hits:
            setattr(mod, a, new_val)
            updated.add((rec.module, a))
            changes.append((rec.module, a, rec.value, new_val))
        done.add(key)
    return changes


def _drop_children(root: nn.Module, cname: str, drop: set[int]) -> None:
    cont = _get_module(root, cname)
    kept = [(n, m) for i, (n, m) in enumerate(cont.named_children()) if i not in drop]
    if isinstance(cont, nn.Sequential):
        new_c: nn.Module = nn.Sequential(OrderedDict(kept))
        new_c.train(cont.training)
        new_c.__class__ = type(cont)
    elif isinstance(cont, nn.ModuleList):
        new_c = nn.ModuleList([m for _, m in kept])
        new_c.train(cont.training)
    else:
        raise ExportError(f"cannot remove blocks from '{cname}' ({type(cont).__name__})")
    if cname:
        parent_name, _, attr = cname.rpartition(".")
        setattr(_get_module(root, parent_name), attr, new_c)
    else:
        raise ExportError("cannot remove blocks from the root module")


def _to(obj: Any, device: torch.device | None) -> Any:
    """Tensors in (nested) inputs moved to ``device`` (unchanged when None or already there)."""
    if device is None:
        return obj
    from torch.utils._pytree import tree_map

    return tree_map(lambda t: t.to(device) if isinstance(t, torch.Tensor) else t, obj)


def _flat(out: Any) -> list[torch.Tensor]:
    from torch.utils._pytree import tree_flatten

    if hasattr(out, "to_tuple"):
        out = out.to_tuple()
    flat, _ = tree_flatten(out)
    return [t for t in flat if isinstance(t, torch.Tensor) and t.is_floating_point()]


@torch.no_grad()
def reference_outputs(dms: "DMS") -> list[torch.Tensor]:
    """The hard-masked supernet's floating outputs on the examples, in eval mode (the export check's reference)."""
    model = dms.model
    was = model.training
    model.eval()
    try:
        with dms.hard():
            return _flat(model(*dms.example_inputs, **dms.example_kwargs))
    finally:
        model.train(was)


@torch.no_grad()
def verify_export(dms: "DMS", exported: nn.Module, atol: float = 1e-4, rtol: float = 1e-4,
                  reference: list[torch.Tensor] | None = None) -> None:
    """Raise ExportError unless the export's outputs equal the hard-masked supernet's on the examples.

    Tolerance: ``|export - ref| <= atol * max(1, max|ref|) + rtol * |ref|``. ``reference``: the
    supernet's outputs computed beforehand (:func:`reference_outputs`; the sharded export does so on
    every rank).
    """
    was_e = exported.training
    exported.eval()
    try:
        ref = reference_outputs(dms) if reference is None else reference
        p0 = next(iter(exported.parameters()), None)
        dev = p0.device if p0 is not None else None  # the sharded export may gather to another device
        args, kwargs = _to(dms.example_inputs, dev), _to(dms.example_kwargs, dev)
        ref = [r.to(dev) for r in ref] if dev is not None else ref
        got = _flat(exported(*args, **kwargs))
    except Exception as exc:
        raise ExportError(f"the exported model failed to run on example_inputs: {exc}") from exc
    finally:
        exported.train(was_e)
    if len(ref) != len(got):
        hint = (" (outputs per layer, such as a cache or XLNet's mems, change with removed layers: turn them off in "
                "example_kwargs, e.g. use_cache=False / use_mems=False, or search with prune_depth=False)"
                if any(g.kind == "depth" for g in dms.groups) else "")
        raise ExportError(f"exported model returns {len(got)} tensors, the supernet {len(ref)}{hint}")
    for i, (a, b) in enumerate(zip(ref, got)):
        if a.shape != b.shape:
            raise ExportError(f"output {i}: exported shape {tuple(b.shape)} != supernet {tuple(a.shape)}")
        # slicing changes summation order: scale the absolute tolerance with the outputs' magnitude
        scale = max(1.0, float(a.detach().abs().max())) if a.numel() else 1.0
        try:
            torch.testing.assert_close(b, a, atol=atol * scale, rtol=rtol)
        except AssertionError as exc:
            raise ExportError(f"output {i} of the exported model differs from the hard-masked supernet: {exc}") \
                from exc
