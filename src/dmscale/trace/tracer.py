"""Find coupled dimensions of any PyTorch model by running it once and recording how dims flow.

Every dimension of every tensor seen during one eager forward pass is labelled with a
*space* (:mod:`dmscale.trace.spaces`: an equivalence class of dimensions that must keep the
same elements). After each torch function runs, the tracer looks its name up in the op-rule
table (:mod:`dmscale.trace.registry`, built-in rules in :mod:`dmscale.trace.rules`) and the
rule says how spaces flow: a linear/conv creates a new space for its output channels and ties
its input channels to its weight; elementwise ops and norms unite spaces; reshapes split a
space into a product (heads x head_dim) or merge several into one; ``cat`` builds a
concatenation. Any op without a rule fixes (makes unprunable) every space it touches and is
reported by name, so an unknown op can cost pruning freedom but never produces a silently
wrong export. Layer types with a :class:`~dmscale.layers.LayerSpec` are recorded as layers
(and, when their spec says so, traced as one unit instead of through their ops).
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

import torch
import torch.nn as nn
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from .flops import flop_formula
from .spaces import Space, TraceError, fix, union
from .records import (BlockRecord, LayerRecord, OpRecord, ParamRecord, ReshapeRecord, SizeAttrRecord,
                      TraceResult)
from .registry import OpCall, first_tensor, rule_for, tensors
from .lost import fix_folded, lost_dimensions
from . import rules as _rules  # noqa: F401  (registers the built-in op rules)
from .rules.metadata import METADATA as _METADATA
from ..layers.spec import LayerSpec, layer_kind, spec_for
from ..layers.predicates import is_rmsnorm
from ..layers.norms import identify_norm, norm_candidate, norm_spec
from ..layers.weightnorm import weight_norm_of, weight_norms

__all__ = ["Space", "TraceResult", "trace", "TraceError", "is_rmsnorm", "layer_kind", "Tracer", "BlockRecord",
           "LayerRecord", "OpRecord", "ParamRecord", "ReshapeRecord"]

_RESIDUAL_ADDS = ("add", "add_", "__add__", "__radd__", "__iadd__")


# --------------------------------------------------------------------------- flops
class _FlopCounter(TorchDispatchMode):
    """Running FLOP total with torch.utils.flop_counter's formulas (so counts agree with FlopCounterMode)."""

    def __init__(self) -> None:
        super().__init__()
        self.total = 0.0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: D105
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        fn = flop_formula(func._overloadpacket)
        if fn is not None:
            self.total += float(fn(*args, **kwargs, out_val=out))
        return out


def _func_name(func: Callable) -> str:
    """The op name rules are registered under (``get:<attr>`` / ``set:<attr>`` for tensor properties)."""
    name = getattr(func, "__name__", None)
    if name == "__get__":
        owner = getattr(func, "__self__", None)
        return "get:" + str(getattr(owner, "__name__", "?"))
    if name == "__set__":
        owner = getattr(func, "__self__", None)
        return "set:" + str(getattr(owner, "__name__", "?"))
    return name or repr(func)


# --------------------------------------------------------------------------- tracer
class Tracer(TorchFunctionMode):
    """Labels every tensor dimension with a Space while the model runs once.

    Op rules receive the tracer as their first argument; the methods they may use are listed
    in :mod:`dmscale.trace.registry`.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.labels: dict[int, tuple[torch.Tensor, list[Space]]] = {}
        self.param_names: dict[int, tuple[str, str, str, bool]] = {}
        for mname, mod in model.named_modules(remove_duplicate=False):
            for pname, p in mod.named_parameters(recurse=False):
                self.param_names.setdefault(id(p), (f"{mname}.{pname}" if mname else pname, mname, pname, False))
            for bname, b in mod.named_buffers(recurse=False):
                if b is not None:
                    self.param_names.setdefault(id(b), (f"{mname}.{bname}" if mname else bname, mname, bname, True))
        self.params: dict[str, ParamRecord] = {}
        self.layers: dict[str, LayerRecord] = {}
        self.ops: list[OpRecord] = []
        self.reshapes: list[ReshapeRecord] = []
        self.unsupported: dict[str, list[str]] = {}
        self.module_stack: list[str] = []
        self.block_stack: list[str] = []
        self.leaf_depth = 0
        self.candidate_blocks: dict[str, BlockRecord] = {}
        self.block_inputs: dict[str, int] = {}
        self.block_in_tensor: dict[str, torch.Tensor] = {}
        self.residual_blocks: set[str] = set()
        self.block_shapes_ok: dict[str, bool] = {}
        self.counter = _FlopCounter()
        self.leaf_flop_start: list[float] = []
        self.layer_outputs: dict[str, list[Space]] = {}
        self.layer_blocks: dict[str, tuple[str, ...]] = {}  # the blocks a layer ran in
        self.unsupported_spaces: dict[str, list[Space]] = {}
        self.size_attrs: list[SizeAttrRecord] = []
        self.watches: dict[int, list[tuple[torch.Tensor, Callable[[str], None]]]] = {}
        self.unit_call: tuple[tuple, dict] = ((), {})  # (args, kwargs) of the unit whose trace_unit runs

    # -- labels
    def get(self, t: torch.Tensor) -> list[Space]:
        """Spaces of t's dims, creating fresh ones (owned ones for parameters) on first sight."""
        entry = self.labels.get(id(t))
        if entry is not None and entry[0] is t and len(entry[1]) == t.dim():
            return entry[1]
        info = self.param_names.get(id(t))
        if info is not None:
            qname, mname, attr, is_buf = info
            rec = self.params.get(qname)
            if rec is None:
                dims = []
                for d, n in enumerate(t.shape):
                    s = Space(n, f"{qname}:{d}")
                    s.owned = True
                    dims.append(s)
                rec = ParamRecord(qname, mname, attr, dims, is_buf, tuple(self.block_stack))
                self.params[qname] = rec
            self.labels[id(t)] = (t, rec.dims)
            return rec.dims
        # a tensor of unknown origin (a plain attribute, made inside an untraced op): its dims can
        # not be sliced by export, so nothing it touches may be pruned
        dims = [Space(n, f"t:{self.current_module()}", fixed=n > 1) for n in t.shape]
        for s in dims:
            if s.fixed:
                s.fix_reasons.append(f"tensor of unknown origin in {self.current_module() or 'model'}")
        self.labels[id(t)] = (t, dims)
        return dims

    def set(self, t: torch.Tensor, dims: list[Space], act: bool = True) -> None:
        """Label ``t`` with ``dims`` (``act=False``: a tensor computed from parameters only, e.g. a weight-normalised
        weight, whose dims are not activation dims)."""
        if len(dims) != t.dim():
            raise TraceError(f"internal: label rank {len(dims)} != tensor rank {t.dim()}")
        if id(t) in self.param_names:  # in-place op on a parameter: unite instead
            for a, b in zip(self.get(t), dims):
                union(a, b)
            return
        if act:
            for s in dims:
                s.find().tags.add("act")
        self.labels[id(t)] = (t, dims)

    def current_module(self) -> str:
        return self.module_stack[-1] if self.module_stack else ""

    def fresh(self, t: torch.Tensor, origin: str = "", fixed: bool = False) -> list[Space]:
        """New spaces for a new tensor's dims (fixed when export could not slice it; ``origin`` names the op)."""
        dims = [Space(n, origin or f"t:{self.current_module()}", fixed=fixed and n > 1) for n in t.shape]
        for s in dims:
            if s.fixed:
                s.fix_reasons.append(f"{origin or 'a tensor made'} in {self.current_module() or 'model'}")
        return dims

    def watch(self, t: torch.Tensor, fn: Callable[[str], None]) -> None:
        """Call ``fn(op_name)`` once if ``t`` is used by a later op or returned by the model.

        For outputs that are only safe to prune while nothing reads them (e.g. attention weights
        averaged over heads): ``fn`` fixes what pruning would change.
        """
        self.watches.setdefault(id(t), []).append((t, fn))

    def _fire_watches(self, name: str, ts: list[torch.Tensor]) -> None:
        if name in _METADATA or name in ("get:shape", "get:dtype", "get:device", "get:ndim", "get:is_cuda"):
            return
        for t in ts:
            entries = self.watches.get(id(t))
            if entries:
                for held, fn in [e for e in entries if e[0] is t]:
                    fn(name)
                self.watches[id(t)] = [e for e in entries if e[0] is not t]

    def record_size_attr(self, attr: str, space: Space, module: str | None = None) -> None:
        """Attribute ``attr`` of a module (default: the current one) holds the kept size of ``space``
        (e.g. a grouped convolution's ``groups``); export sets it from the kept count."""
        self.size_attrs.append(SizeAttrRecord(self.current_module() if module is None else module, attr, space))

    def is_param(self, t: torch.Tensor) -> bool:
        """True for a parameter or buffer of the model."""
        return id(t) in self.param_names

    def mark_raw(self, t: torch.Tensor) -> None:
        info = self.param_names.get(id(t))
        if info is not None and not info[3]:
            self.get(t)
            self.params[info[0]].raw = True

    # -- dispatch
    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: D105
        kwargs = kwargs or {}
        if self.leaf_depth > 0:
            return func(*args, **kwargs)
        name = _func_name(func)
        if self.watches:
            self._fire_watches(name, tensors((args, kwargs)))
        before = self.counter.total
        out = func(*args, **kwargs)
        flops = self.counter.total - before
        n_ops = len(self.ops)
        try:
            self.rule(name, func, args, kwargs, out, flops)
        except TraceError:
            raise
        except Exception as exc:  # a rule that fails must not break the user's model: fix and report
            self.unknown(name, args, kwargs, out, f"{name} (rule error: {exc})")
        if flops > 0 and len(self.ops) == n_ops:
            # FLOPs of an op no rule accounted for: counted at full width, removed with their block
            self.record_op(name, flops, [])
        return out

    def unknown(self, name: str, args: tuple, kwargs: dict, out: Any, reason: str | None = None) -> None:
        ins = tensors((args, kwargs))
        outs = tensors(out)
        if not outs:
            return
        reason = reason or f"unsupported op '{name}'"
        touched = self.unsupported_spaces.setdefault(name, [])
        for t in ins + outs:
            for s in self.get(t):
                fix(s, f"{reason} in {self.current_module() or 'model'}")
                if len(touched) < 256:
                    touched.append(s)
        for t in outs:  # activations: a parameter dim they meet later is reported as lost
            for s in self.get(t):
                s.find().tags.add("act")
        for t in ins:
            self.mark_raw(t)
        self.unsupported.setdefault(name, [])
        if self.current_module() not in self.unsupported[name]:
            self.unsupported[name].append(self.current_module())

    def record_op(self, name: str, flops: float, dims: list[Space]) -> None:
        """An op whose FLOPs (at full size) scale with the sizes of ``dims``."""
        if flops > 0:
            self.ops.append(OpRecord(name, flops, dims, tuple(self.block_stack), self.current_module()))

    def record_reshape(self, value: int, space: Space) -> None:
        """An explicit int of the current module that sized ``space`` (export updates the attribute)."""
        self.reshapes.append(ReshapeRecord(self.current_module(), value, space))

    # -- rules
    def rule(self, name: str, func, args, kwargs, out, flops: float) -> None:
        """Apply the op rule registered for ``name`` (no rule: the op is unsupported)."""
        if name in _RESIDUAL_ADDS and self.block_stack:
            # residual detection: an add whose operand is a candidate block's own input
            ids = {id(t) for t in tensors((args, kwargs))}
            for b in self.block_stack:
                if self.block_inputs.get(b) in ids:
                    self.residual_blocks.add(b)
        if name.startswith("set:"):
            return
        if name.startswith("get:"):
            if not isinstance(out, torch.Tensor):
                return
        elif not tensors(out) and name != "__setitem__":  # x[i] = v returns nothing but writes into x
            return
        fn = rule_for(name)
        if fn is None:
            return self.unknown(name, args, kwargs, out)
        fn(self, OpCall(name, func, args, kwargs, out, flops))

    def broadcast_union(self, ts: list[torch.Tensor], out: torch.Tensor | None) -> None:
        """Elementwise op: unite equally sized aligned dims (numpy broadcasting)."""
        ts = [t for t in ts if isinstance(t, torch.Tensor)]
        if not ts:
            return
        nd = max(t.dim() for t in ts) if out is None else out.dim()
        res: list[Space | None] = [None] * nd
        for t in ts:
            dims = self.get(t)
            lead = nd - t.dim()
            for j, s in enumerate(dims):
                i = j + lead
                if i < 0:
                    continue
                if t.shape[j] == 1 and (out is None or out.shape[i] != 1):
                    continue
                if res[i] is None:
                    res[i] = s
                else:
                    res[i] = union(res[i], s)
        for t in ts:
            if t.dim() > 0 and id(t) in self.param_names and t.numel() > 1:
                self.mark_raw(t)
        if out is not None:
            final = [r if r is not None else Space(out.shape[i], "bcast") for i, r in enumerate(res)]
            self.set(out, final)


_Tracer = Tracer  # the pre-0.2 name


# --------------------------------------------------------------------------- trace
def trace(model: nn.Module, example_inputs: tuple, example_kwargs: dict | None = None,
          depth_containers: Iterable[str] | None = None,
          depth_blocks: Iterable[Iterable[str]] | None = None) -> TraceResult:
    """Run ``model`` once on the example inputs and return the coupled-dimension structure.

    ``depth_containers`` limits automatic block discovery to these containers; ``depth_blocks``
    declares stages of removable blocks by module name (each must keep its input's shape).
    """
    example_kwargs = example_kwargs or {}
    tr = Tracer(model)
    names = {id(m): n for n, m in model.named_modules()}
    specs = {id(m): spec_for(m) for m in model.modules()}
    units = {k for k, sp in specs.items() if sp is not None and sp.trace_unit is not None}
    # norms are recognised by what they compute (layers/norms.py): modules without a spec of their
    # own (or with a built-in norm spec) whose parameters look like a norm's are probed on first call
    from ..layers.builtin import LAYERNORM, RMSNORM  # torch's norm classes are probed like any norm-shaped module

    norm_probe = {id(m) for m in model.modules()
                  if (specs[id(m)] is None or specs[id(m)] in (LAYERNORM, RMSNORM)) and norm_candidate(m)}
    norm_forms: dict[int, Any] = {}
    handles = []
    containers = {}
    for cname, c in model.named_modules():
        if isinstance(c, (nn.ModuleList, nn.Sequential)) and len(c) >= 1:
            for i, (childname, child) in enumerate(c.named_children()):
                containers[id(child)] = (cname, i, f"{cname}.{childname}" if cname else childname)
    if depth_containers is not None:
        allowed = set(depth_containers)
        containers = {k: v for k, v in containers.items() if v[0] in allowed}
    declared: set[str] = set()
    mods_by_name = dict(model.named_modules())
    for k, stage in enumerate(depth_blocks or ()):
        for i, bname in enumerate(stage):
            if bname not in mods_by_name or not bname:
                raise ValueError(f"depth_blocks: no submodule named {bname!r}")
            containers[id(mods_by_name[bname])] = (f"declared{k}", i, bname)
            declared.add(bname)

    def probe_norm(mod, args, kwargs) -> None:
        flops = tr.counter.total
        tr.leaf_depth += 1  # the probe's ops are not part of the trace
        try:
            form = identify_norm(mod, args, kwargs)
        finally:
            tr.leaf_depth -= 1
            tr.counter.total = flops
        norm_forms[id(mod)] = form
        base = specs[id(mod)]
        if form is not None:
            specs[id(mod)] = norm_spec(form, base)
            units.add(id(mod))
        elif base is not None and base.masked_norm is None:
            # a built-in norm spec whose module computes something else: traced through its ops
            specs[id(mod)] = None

    def pre(mod, args, kwargs):
        name = names.get(id(mod), "?")
        if id(mod) in norm_probe and id(mod) not in norm_forms and tr.leaf_depth == 0:
            probe_norm(mod, args, kwargs)
        tr.module_stack.append(name)
        info = containers.get(id(mod))
        if info is not None and tr.leaf_depth == 0:
            # remember the input that a residual block would add back
            spec = None
            for i, a in enumerate(args):
                if isinstance(a, torch.Tensor):
                    spec = ("arg", i, a)
                    break
            if spec is None:
                for k, a in kwargs.items():
                    if isinstance(a, torch.Tensor) and k in ("hidden_states", "x", "input", "hidden_state"):
                        spec = ("kw", k, a)
                        break
            if spec is not None:
                tr.block_inputs[name] = id(spec[2])
                tr.candidate_blocks[name] = BlockRecord(name, info[0], info[1], (spec[0], spec[1]))
                tr.block_in_tensor[name] = spec[2]
            tr.block_stack.append(name)
        if id(mod) in units:  # traced as one unit: its insides are not followed
            if tr.leaf_depth == 0:
                tr.leaf_flop_start.append(tr.counter.total)
            tr.leaf_depth += 1
        return None

    def post(mod, args, kwargs, output):
        name = names.get(id(mod), "?")
        spec = specs.get(id(mod))
        if id(mod) in units:
            tr.leaf_depth -= 1
            if tr.leaf_depth == 0:
                flops = tr.counter.total - tr.leaf_flop_start.pop()
                x = args[0] if args else next((v for v in kwargs.values() if isinstance(v, torch.Tensor)), None)
                tr.unit_call = (args, kwargs)
                spec.trace_unit(tr, mod, name, x, output, flops)
        if spec is not None and spec.maskable and tr.leaf_depth == 0:
            y = first_tensor(output)
            if y is not None and name not in tr.layer_outputs:
                tr.layer_outputs[name] = list(tr.get(y))
                tr.layer_blocks[name] = tuple(tr.block_stack)
        info = containers.get(id(mod))
        if info is not None and tr.block_stack and tr.block_stack[-1] == name:
            tr.block_stack.pop()
            x = tr.block_in_tensor.get(name)
            y = first_tensor(output)
            tr.block_shapes_ok[name] = x is not None and y is not None and tuple(x.shape) == tuple(y.shape)
        tr.module_stack.pop()
        return None

    for m in model.modules():
        handles.append(m.register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(m.register_forward_hook(post, with_kwargs=True))
    was_training = model.training
    model.eval()  # never update BatchNorm statistics while tracing
    access = _ListAccess()
    try:
        with torch.no_grad(), tr.counter, tr, access:
            inputs = tuple(example_inputs)
            for t in tensors((inputs, example_kwargs)):
                for s in tr.get(t):
                    fix(s, "model input")
            out = model(*inputs, **example_kwargs)
        outs = tensors(_model_outputs(out))
        tr._fire_watches("model output", outs)
        for t in outs:
            for s in tr.get(t):
                fix(s, "model output")
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)

    # layer records: known layers with the spaces of their outputs
    owners: dict[int, int] = {}
    for mod in model.modules():
        for p in mod._parameters.values():
            if p is not None:
                owners[id(p)] = owners.get(id(p), 0) + 1
    for mname, mod in model.named_modules():
        spec = specs.get(id(mod))
        if spec is None or not spec.maskable:
            continue
        rec = _layer_record(tr, mod, mname, spec)
        if rec is not None:
            rec.tied = any(owners.get(id(p), 0) > 1 for p in mod._parameters.values() if p is not None)
            tr.layers[mname] = rec
    for n in declared:
        if n not in tr.candidate_blocks:
            raise ValueError(f"depth_blocks: block {n!r} did not run on example_inputs with a tensor input")
        if not tr.block_shapes_ok.get(n):
            raise ValueError(f"depth_blocks: block {n!r} changes the shape of its input, so it cannot be removed")
        tr.candidate_blocks[n].declared = True
    # children of a ModuleList the model indexes by position (T5Block.layer[0], layer[-1]) are sub-layers with
    # fixed roles, not a stack of removable blocks
    positional = {name for name, m in mods_by_name.items() if access.positional(m)}
    blocks = [b for n, b in tr.candidate_blocks.items()
              if (n in tr.residual_blocks or n in declared) and tr.block_shapes_ok.get(n)
              and (b.container not in positional or n in declared)]
    # a container of removable blocks is not itself removable: keep the innermost
    blocks = [b for b in blocks if not any(o.name.startswith(b.name + ".") for o in blocks)]
    # a parameter is raw (masked by its own parametrization) unless the layer record of its module
    # accounts for it (a layer that never ran, e.g. a projection whose weight an op reads, has none)
    normed = _weight_normed_params(tr, model)
    for rec in tr.params.values():
        lrec = tr.layers.get(rec.module)
        rec.raw = lrec is None or lrec.spec is None or rec.attr not in lrec.spec.params
        if rec.name in normed:  # g / v of a weight-normalised layer weight: accounted for by the layer
            rec.raw = False
        # a space whose elements must be masked in every parameter that holds them (multi-query heads:
        # a pruned query head still outputs the shared value head, so the output projection is masked too)
        if not rec.raw and any("mask_params" in leaf.tags for s in rec.dims for leaf in s.leaves()):
            rec.raw = True
    # blocks nested in other removable blocks of the same container family are fine; order by container/index
    blocks.sort(key=lambda b: (b.container, b.index))
    # report only ops that cost pruning freedom: they touched a dimension some parameter lives in
    unsupported = {op: mods for op, mods in tr.unsupported.items()
                   if any(leaf.owned and leaf.size > 1 for s in tr.unsupported_spaces.get(op, []) for leaf in s.leaves())}
    fix_folded(tr.params)
    return TraceResult(tr.params, tr.layers, tr.ops, blocks, tr.reshapes, unsupported, tr.counter.total,
                       size_attrs=tr.size_attrs, lost=lost_dimensions(tr.params))


class _ListAccess:
    """Records, while the model runs, which ModuleLists are iterated (or sliced) and which are indexed by int."""

    def __init__(self) -> None:
        self.indexed: set[int] = set()
        self.iterated: set[int] = set()

    def positional(self, m: nn.Module) -> bool:
        """True for a ModuleList only ever read as ``lst[i]`` (its items have fixed roles)."""
        return isinstance(m, nn.ModuleList) and id(m) in self.indexed and id(m) not in self.iterated

    def __enter__(self) -> "_ListAccess":
        self._getitem, self._iter = nn.ModuleList.__getitem__, nn.ModuleList.__iter__
        getitem, iterate = self._getitem, self._iter
        indexed, iterated = self.indexed, self.iterated

        def recording_getitem(lst, idx):
            (indexed if isinstance(idx, int) else iterated).add(id(lst))
            return getitem(lst, idx)

        def recording_iter(lst):
            iterated.add(id(lst))
            return iterate(lst)

        nn.ModuleList.__getitem__ = recording_getitem
        nn.ModuleList.__iter__ = recording_iter
        return self

    def __exit__(self, *exc: Any) -> None:
        nn.ModuleList.__getitem__ = self._getitem
        nn.ModuleList.__iter__ = self._iter


def _model_outputs(out: Any) -> Any:
    if isinstance(out, dict):
        return list(out.values())
    if hasattr(out, "to_tuple"):
        return out.to_tuple()
    return out


def _weight_normed_params(tr: Tracer, model: nn.Module) -> set[str]:
    """The qualified names of the g / v of weight-normalised weights that their layer's record accounts for.

    The g / v of any other weight norm (a layer dmscale does not know, one whose output channels were not found,
    one whose spec folds masks its own way, a shared weight) keep every dim fixed: masking v as a raw parameter
    would cancel in ``v / ||v||``."""
    out: set[str] = set()
    for mname, mod in model.named_modules():
        for attr, wn in weight_norms(mod).items():
            names = wn.qualified(mname)
            lrec = tr.layers.get(mname)
            spec = lrec.spec if lrec is not None else None
            ok = (spec is not None and attr in spec.params and spec.fold_mask is None and not lrec.tied
                  and lrec.norm_space is None)
            if ok:
                out.update(names)
                continue
            for n in names:
                rec = tr.params.get(n)
                for s in rec.dims if rec is not None else ():
                    fix(s, f"weight_norm of '{attr}' in {type(mod).__name__} '{mname}', which dmscale does not "
                           "trace as a known layer")
    return out


def _layer_record(tr: Tracer, mod: nn.Module, mname: str, spec: LayerSpec) -> LayerRecord | None:
    """Where the output channels of a known layer live, read off its traced output."""
    if spec.out_param is None:
        return _paramless_norm_record(tr, mod, mname, spec)
    pname = spec.out_param
    w = getattr(mod, pname, None)
    key = f"{mname}.{pname}" if mname else pname
    wn = weight_norm_of(mod, pname)
    if wn is not None:  # W = g v / ||v||: its dims are v's (the _weight_norm rule)
        key = wn.qualified(mname)[1]
    prec = tr.params.get(key)
    if prec is None or not isinstance(w, torch.Tensor):
        return None
    out_space = prec.dims[spec.out_dims[pname]]
    labels = tr.layer_outputs.get(mname)
    if labels is None:  # never called: its parameters were read by ops (they are masked as raw parameters)
        return None
    dims: dict[int, Space] = {}
    n = len(labels)
    for i, s in enumerate(labels):
        if s.find() is out_space.find():
            dims[i - n] = out_space
    if not dims:
        fix(out_space, f"output channels of {type(mod).__name__} '{mname}' not found in its output")
        return None
    norm_space = None
    if spec.masked_norm is not None:
        std = spec.standard_forward
        custom = std is not None and type(mod).forward is not std
        od = spec.out_dims[pname] % w.dim()
        if any(n != 1 for i, n in enumerate(w.shape) if i != od) or custom or len(dims) != 1:
            fix(out_space, f"{type(mod).__name__} '{mname}' normalises in a way dmscale does not model")
            return None
        norm_space = prec.dims[od]
    return LayerRecord(mname, spec.kind, dims, norm_space=norm_space, blocks=prec.blocks, spec=spec)


def _paramless_norm_record(tr: Tracer, mod: nn.Module, mname: str, spec: LayerSpec) -> LayerRecord | None:
    """A norm without parameters (``norm_dim``): its output channels are the normalised dim of its output."""
    labels = tr.layer_outputs.get(mname)
    if labels is None or spec.norm_dim is None or len(labels) < 2:
        return None
    d = spec.norm_dim % len(labels)
    space = labels[d]
    if spec.standard_forward is not None and type(mod).forward is not spec.standard_forward:
        fix(space, f"{type(mod).__name__} '{mname}' normalises in a way dmscale does not model")
        return None
    return LayerRecord(mname, spec.kind, {d - len(labels): space}, norm_space=space, blocks=tr.layer_blocks.get(mname, ()),
                       spec=spec)
