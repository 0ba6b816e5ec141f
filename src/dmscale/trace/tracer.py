"""Find coupled dimensions of any PyTorch model by running it once and recording how dims flow.

Every dimension of every tensor seen during one eager forward pass is labelled with a
*space* (an equivalence class of dimensions that must keep the same elements). Per-op rules
say how spaces flow: a Linear/Conv creates a new space for its output channels and ties its
input channels to its weight; elementwise ops and norms unite spaces; reshapes split a space
into a product (heads x head_dim) or merge several into one; ``cat`` builds a concatenation.
Any op without a rule fixes (makes unprunable) every space it touches and is reported by name,
so an unknown op can cost pruning freedom but never produces a silently wrong export.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch
import torch.nn as nn
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry
from torch.utils._pytree import tree_flatten

__all__ = ["Space", "TraceResult", "trace", "TraceError", "is_rmsnorm"]


class TraceError(RuntimeError):
    """The model could not be traced (the message names the op or module)."""


# --------------------------------------------------------------------------- spaces
class Space:
    """A set of tensor dimensions that must be pruned together (union-find node)."""

    _next_id = 0

    def __init__(self, size: int, origin: str = "", fixed: bool = False) -> None:
        self.id = Space._next_id
        Space._next_id += 1
        self.size = int(size)
        self.origin = origin
        self.parent: Space | None = None
        self.kind = "atomic"  # 'atomic' | 'product' | 'concat'
        self.children: list[Space] = []
        self.fixed = fixed
        self.fix_reasons: list[str] = []
        self.tags: set[str] = set()
        self.owned = False  # some parameter dimension lives in this space

    def find(self) -> "Space":
        """Return the representative of this space's class (with path compression)."""
        root = self
        while root.parent is not None:
            root = root.parent
        node = self
        while node.parent is not None and node.parent is not root:
            nxt = node.parent
            node.parent = root
            node = nxt
        return root

    def leaves(self) -> list["Space"]:
        """Atomic roots this space is made of (itself when atomic)."""
        root = self.find()
        if root.kind == "atomic":
            return [root]
        out: list[Space] = []
        for c in root.children:
            out.extend(c.leaves())
        return out

    def __repr__(self) -> str:
        r = self.find()
        return f"Space#{r.id}({r.kind},{r.size},{r.origin})"


def _fix(space: Space, reason: str) -> None:
    root = space.find()
    if root.kind == "atomic":
        if not root.fixed:
            root.fixed = True
        if reason and len(root.fix_reasons) < 8 and reason not in root.fix_reasons:
            root.fix_reasons.append(reason)
        return
    root.fixed = True
    for c in root.children:
        _fix(c, reason)


def _union(a: Space, b: Space) -> Space:
    """Merge two spaces; composite structures are merged component-wise."""
    ra, rb = a.find(), b.find()
    if ra is rb:
        return ra
    if ra.size != rb.size:
        raise TraceError(f"internal: cannot unite dimensions of sizes {ra.size} and {rb.size} ({ra.origin} / {rb.origin})")
    if ra.kind == "atomic" and rb.kind != "atomic":
        ra, rb = rb, ra
    # now ra is composite or both atomic
    fixed_b = rb.fixed and rb.kind == "atomic"
    rb.parent = ra
    ra.tags |= rb.tags
    ra.owned = ra.owned or rb.owned
    if ra.kind == "atomic":
        ra.fixed = ra.fixed or rb.fixed
        ra.fix_reasons.extend(r for r in rb.fix_reasons if r not in ra.fix_reasons)
        return ra
    if rb.kind == "atomic":
        if fixed_b:
            _fix(ra, rb.fix_reasons[0] if rb.fix_reasons else "")
        return ra
    if rb.kind == ra.kind and [c.find().size for c in rb.children] == [c.find().size for c in ra.children]:
        for ca, cb in zip(ra.children, rb.children):
            _union(ca, cb)
        return ra.find()
    # incompatible factorisations: give up pruning here (safe)
    reason = f"incompatible split of one dimension ({ra.kind} vs {rb.kind})"
    _fix(ra, reason)
    for c in rb.children:
        _fix(c, reason)
    return ra


def _tag(space: Space, tag: str) -> None:
    """Tag a space and, when it is composite (query heads = KV heads x repeats), its leaves."""
    space.find().tags.add(tag)
    for leaf in space.leaves():
        leaf.tags.add(tag)


def _make_composite(kind: str, parts: list[Space], origin: str) -> Space:
    parts = [p for p in parts]
    size = math.prod(p.find().size for p in parts) if kind == "product" else sum(p.find().size for p in parts)
    s = Space(size, origin)
    s.kind = kind
    s.children = parts
    return s


def _split(space: Space, sizes: list[int], kind: str, origin: str) -> list[Space]:
    """Refine a space into a product/concat of sub-spaces of the given sizes (reusing an existing split)."""
    root = space.find()
    if root.kind == kind and [c.find().size for c in root.children] == list(sizes):
        return list(root.children)
    if root.kind == "atomic":
        children = [Space(n, origin + f"[{i}]", fixed=root.fixed) for i, n in enumerate(sizes)]
        for c in children:
            c.tags.add("split")
            c.owned = True
        root.kind = kind
        root.children = children
        return children
    # A composite split differently: try a flat view of a product of products
    reason = f"{origin}: dimension split in two different ways"
    _fix(root, reason)
    return [Space(n, origin, fixed=True) for n in sizes]


# --------------------------------------------------------------------------- records
@dataclass
class OpRecord:
    """A FLOP-carrying op: its FLOPs at full size and the dim spaces its FLOPs scale with."""

    name: str
    flops: float
    dims: list[Space]
    blocks: tuple[str, ...]
    module: str


@dataclass
class ParamRecord:
    """A parameter or buffer with the space of each of its dims."""

    name: str  # qualified name in the model
    module: str
    attr: str
    dims: list[Space]
    is_buffer: bool
    blocks: tuple[str, ...] = ()
    raw: bool = False  # used outside a known layer (needs a parametrisation to be masked)


@dataclass
class LayerRecord:
    """A known layer (Linear, Conv, norms, Embedding): where its output channels are."""

    module: str
    kind: str
    out_dims: dict[int, Space]  # negative dim index -> space
    norm_space: Space | None = None  # for LN/RMSNorm: the normalised (last) dim
    blocks: tuple[str, ...] = ()
    tied: bool = False  # weight shared with another module: mask values cannot be folded into it


@dataclass
class BlockRecord:
    """A removable residual block inside a container (ModuleList / Sequential)."""

    name: str
    container: str
    index: int
    input_spec: tuple[str, Any]  # ('arg', i) or ('kw', name)
    declared: bool = False  # named by the user (no residual check; replaced by SkipBlock on export)


@dataclass
class ReshapeRecord:
    """An explicit int in a view/reshape that sized a split dimension (for attribute updates)."""

    module: str
    value: int
    space: Space


@dataclass
class TraceResult:
    """Everything the search and export need to know about the model's dimensions."""

    params: dict[str, ParamRecord]
    layers: dict[str, LayerRecord]
    ops: list[OpRecord]
    blocks: list[BlockRecord]
    reshapes: list[ReshapeRecord]
    unsupported: dict[str, list[str]]  # op name -> modules where seen
    total_flops: float


# --------------------------------------------------------------------------- flops
class _FlopCounter(TorchDispatchMode):
    """Running FLOP total with torch.utils.flop_counter's formulas (so counts agree with FlopCounterMode)."""

    def __init__(self) -> None:
        super().__init__()
        self.total = 0.0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: D105
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        fn = flop_registry.get(func._overloadpacket)
        if fn is not None:
            self.total += float(fn(*args, **kwargs, out_val=out))
        return out


# --------------------------------------------------------------------------- helpers
def is_rmsnorm(m: nn.Module) -> bool:
    """RMSNorm layers (torch's and the many custom classes named like it)."""
    return isinstance(m, getattr(nn, "RMSNorm", ())) or type(m).__name__.endswith("RMSNorm")


def _is_hf_conv1d(m: nn.Module) -> bool:
    return type(m).__name__ == "Conv1D" and hasattr(m, "nf") and hasattr(m, "weight")


_ZERO_PRESERVING = {
    "relu", "relu_", "relu6", "gelu", "silu", "silu_", "tanh", "tanh_", "hardtanh", "hardtanh_", "hardswish",
    "leaky_relu", "leaky_relu_", "elu", "elu_", "selu", "celu", "mish", "neg", "__neg__", "abs", "dropout",
    "dropout_", "alpha_dropout", "feature_alpha_dropout", "dropout1d", "dropout2d", "dropout3d", "clone",
    "contiguous", "to", "type", "type_as", "float", "half", "bfloat16", "double", "detach", "requires_grad_",
    "clamp", "clamp_", "clip", "sign", "sin", "asin", "atan", "sinh", "erf", "gelu_", "prelu",
    "hardshrink", "softshrink", "tanhshrink", "square", "pow", "__pow__", "rrelu", "sqrt", "cpu", "cuda",
    "hardsigmoid", "sigmoid", "exp", "cos", "cosh", "log", "rsqrt", "reciprocal", "softplus", "logsigmoid",
    "nan_to_num", "round", "floor", "ceil", "trunc", "frac", "erfc", "exp2", "expm1", "log1p", "log2",
    "__invert__", "logical_not", "bitwise_not", "isnan", "isinf", "isfinite", "sigmoid_", "relu6_",
    "__abs__", "float_power", "pin_memory", "__deepcopy__", "cumsum_",
}
_BINARY = {
    "add", "add_", "__add__", "__radd__", "__iadd__", "sub", "sub_", "__sub__", "__rsub__", "__isub__", "rsub",
    "mul", "mul_", "__mul__", "__rmul__", "__imul__", "div", "div_", "__div__", "__truediv__", "__rtruediv__",
    "__itruediv__", "true_divide", "floor_divide", "__floordiv__", "maximum", "minimum", "where", "masked_fill",
    "masked_fill_", "eq", "ne", "lt", "le", "gt", "ge", "__eq__", "__ne__", "__lt__", "__le__", "__gt__", "__ge__",
    "logical_and", "logical_or", "__and__", "__or__", "__xor__", "__mod__", "remainder", "fmod", "addcmul",
    "addcdiv", "lerp", "copysign", "atan2", "hypot", "xlogy", "pow_", "__rpow__", "fmax", "fmin", "__iand__",
    "__ior__", "bitwise_and", "bitwise_or", "copy_", "__matmul_placeholder__",
}
_REDUCTIONS = {
    "mean", "sum", "amax", "amin", "max", "min", "std", "var", "norm", "logsumexp", "prod", "argmax", "argmin",
    "all", "any", "nansum", "nanmean", "median", "var_mean", "std_mean", "count_nonzero",
}
_SOFTMAX = {"softmax", "log_softmax", "_softmax", "cumsum", "cumprod", "softmin"}
_METADATA_TENSOR_OUT = {"new_zeros", "new_ones", "new_empty", "new_full", "new_tensor", "zeros_like", "ones_like",
                        "empty_like", "full_like", "rand_like", "randn_like", "randint_like"}
_POOL = {
    "avg_pool1d": 1, "avg_pool2d": 2, "avg_pool3d": 3, "max_pool1d": 1, "max_pool2d": 2, "max_pool3d": 3,
    "adaptive_avg_pool1d": 1, "adaptive_avg_pool2d": 2, "adaptive_avg_pool3d": 3, "adaptive_max_pool1d": 1,
    "adaptive_max_pool2d": 2, "adaptive_max_pool3d": 3, "_max_pool1d": 1, "_max_pool2d": 2, "_max_pool3d": 3,
    "max_pool1d_with_indices": 1, "max_pool2d_with_indices": 2, "max_pool3d_with_indices": 3,
    "_adaptive_max_pool1d": 1, "_adaptive_max_pool2d": 2, "_adaptive_max_pool3d": 3, "lp_pool2d": 2, "lp_pool1d": 1,
    "pixel_shuffle": -1, "upsample": -1, "interpolate": -1, "upsample_nearest": -1, "upsample_bilinear": -1,
    "fractional_max_pool2d": 2, "fractional_max_pool2d_with_indices": 2,
}


def _func_name(func: Callable) -> str:
    name = getattr(func, "__name__", None)
    if name == "__get__":
        owner = getattr(func, "__self__", None)
        return "get:" + str(getattr(owner, "__name__", "?"))
    if name == "__set__":
        owner = getattr(func, "__self__", None)
        return "set:" + str(getattr(owner, "__name__", "?"))
    return name or repr(func)


def _tensors(obj: Any) -> list[torch.Tensor]:
    flat, _ = tree_flatten(obj)
    return [t for t in flat if isinstance(t, torch.Tensor)]


def _norm_dim(d: int, n: int) -> int:
    return d + n if d < 0 else d


# --------------------------------------------------------------------------- tracer
class _Tracer(TorchFunctionMode):
    """Labels every tensor dimension with a Space while the model runs once."""

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
        self.residual_blocks: set[str] = set()
        self.block_shapes_ok: dict[str, bool] = {}
        self.counter = _FlopCounter()
        self.leaf_flop_start: list[float] = []
        self.layer_outputs: dict[str, list[Space]] = {}
        self.unsupported_spaces: dict[str, list[Space]] = {}

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

    def set(self, t: torch.Tensor, dims: list[Space]) -> None:
        if len(dims) != t.dim():
            raise TraceError(f"internal: label rank {len(dims)} != tensor rank {t.dim()}")
        if id(t) in self.param_names:  # in-place op on a parameter: unite instead
            for a, b in zip(self.get(t), dims):
                _union(a, b)
            return
        for s in dims:
            s.find().tags.add("act")
        self.labels[id(t)] = (t, dims)

    def current_module(self) -> str:
        return self.module_stack[-1] if self.module_stack else ""

    def fresh(self, t: torch.Tensor, origin: str = "", fixed: bool = False) -> list[Space]:
        """New spaces for a new tensor's dims (fixed when export could not slice it)."""
        return [Space(n, origin or f"t:{self.current_module()}", fixed=fixed and n > 1) for n in t.shape]

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
        before = self.counter.total
        out = func(*args, **kwargs)
        flops = self.counter.total - before
        try:
            self.rule(name, func, args, kwargs, out, flops)
        except TraceError:
            raise
        except Exception as exc:  # a rule that fails must not break the user's model: fix and report
            self.unknown(name, args, kwargs, out, f"{name} (rule error: {exc})")
        return out

    def unknown(self, name: str, args: tuple, kwargs: dict, out: Any, reason: str | None = None) -> None:
        ins = _tensors((args, kwargs))
        outs = _tensors(out)
        if not outs:
            return
        reason = reason or f"unsupported op '{name}'"
        touched = self.unsupported_spaces.setdefault(name, [])
        for t in ins + outs:
            for s in self.get(t):
                _fix(s, f"{reason} in {self.current_module() or 'model'}")
                if len(touched) < 256:
                    touched.append(s)
        for t in ins:
            self.mark_raw(t)
        self.unsupported.setdefault(name, [])
        if self.current_module() not in self.unsupported[name]:
            self.unsupported[name].append(self.current_module())

    def record_op(self, name: str, flops: float, dims: list[Space]) -> None:
        if flops > 0:
            self.ops.append(OpRecord(name, flops, dims, tuple(self.block_stack), self.current_module()))

    # -- rules
    def rule(self, name: str, func, args, kwargs, out, flops: float) -> None:
        if name.startswith("get:"):
            attr = name[4:]
            if not isinstance(out, torch.Tensor):
                return
            src = args[0] if args else None
            if attr in ("data",) and isinstance(src, torch.Tensor):
                self.set(out, list(self.get(src)))
                return
            if attr in ("T", "mT", "mH", "H") and isinstance(src, torch.Tensor):
                d = list(self.get(src))
                if attr in ("T",):
                    self.set(out, d[::-1])
                else:
                    self.set(out, d[:-2] + [d[-1], d[-2]])
                return
            if attr in ("real", "imag") and isinstance(src, torch.Tensor) and out.shape == src.shape:
                self.set(out, list(self.get(src)))
                return
            self.unknown(name, args, kwargs, out)
            return
        if name.startswith("set:") or not _tensors(out):
            return
        if name in ("linear",):
            return self.r_linear(args, kwargs, out, flops)
        if name in ("conv1d", "conv2d", "conv3d"):
            return self.r_conv(args, kwargs, out, flops)
        if name == "batch_norm":
            return self.r_batch_norm(args, kwargs, out)
        if name == "layer_norm":
            return self.r_layer_norm(args, kwargs, out)
        if name == "group_norm":
            return self.r_group_norm(args, kwargs, out)
        if name == "rms_norm":
            return self.r_rms_norm(args, kwargs, out)
        if name == "embedding":
            return self.r_embedding(args, kwargs, out)
        if name in ("matmul", "__matmul__", "__rmatmul__", "mm", "bmm"):
            a, b = (args[1], args[0]) if name == "__rmatmul__" else (args[0], args[1])
            return self.r_matmul(a, b, out, flops, name)
        if name in ("addmm", "baddbmm", "addbmm"):
            bias = args[0] if args else kwargs.get("input")
            a, b = args[1], args[2]
            self.r_matmul(a, b, out, flops, name)
            if isinstance(bias, torch.Tensor):
                self.broadcast_union([bias, out], out)
            return
        if name == "scaled_dot_product_attention":
            return self.r_sdpa(args, kwargs, out, flops)
        if name in _ZERO_PRESERVING:
            src = args[0] if args and isinstance(args[0], torch.Tensor) else kwargs.get("input")
            if isinstance(src, torch.Tensor) and isinstance(out, torch.Tensor) and out.shape == src.shape:
                # 'pow', 'clamp' etc. may take tensor operands too
                others = [t for t in _tensors((args[1:], kwargs)) if t is not src]
                if others:
                    return self.broadcast_union([src] + others, out)
                self.set(out, list(self.get(src)))
                return
            return self.unknown(name, args, kwargs, out)
        if name in _BINARY:
            ts = _tensors((args, kwargs))
            if isinstance(out, torch.Tensor):
                return self.broadcast_union(ts, out)
            return self.unknown(name, args, kwargs, out)
        if name in _SOFTMAX:
            src = args[0]
            dim = kwargs.get("dim", args[1] if len(args) > 1 else None)
            dims = list(self.get(src))
            if dim is None:
                for s in dims:
                    _fix(s, f"{name} over all dims")
            else:
                _fix(dims[_norm_dim(dim, src.dim())], f"{name} over this dim in {self.current_module()}")
            self.set(out, dims)
            return
        if name in _REDUCTIONS:
            return self.r_reduce(name, args, kwargs, out)
        if name in _METADATA_TENSOR_OUT:
            src = args[0] if args and isinstance(args[0], torch.Tensor) else None
            for t in _tensors(out):
                if name.endswith("_like") and src is not None and t.shape == src.shape:
                    self.set(t, list(self.get(src)))
                else:
                    self.set(t, self.fresh(t, fixed=True))
            return
        if name in ("view", "reshape", "flatten", "unflatten", "view_as", "reshape_as", "squeeze", "unsqueeze",
                    "squeeze_", "unsqueeze_", "ravel"):
            return self.r_reshape(name, args, kwargs, out)
        if name in ("permute", "transpose", "transpose_", "t", "swapaxes", "swapdims", "movedim", "moveaxis"):
            return self.r_permute(name, args, kwargs, out)
        if name in ("expand", "expand_as", "broadcast_to"):
            src = args[0]
            sd = list(self.get(src))
            od: list[Space] = []
            lead = out.dim() - src.dim()
            for i, n in enumerate(out.shape):
                j = i - lead
                if j >= 0 and src.shape[j] == n:
                    od.append(sd[j])
                else:  # broadcast copies (e.g. repeat_kv): not a dimension export could slice
                    od.append(Space(n, "expand", fixed=n > 1))
            self.set(out, od)
            return
        if name in ("cat", "concat", "concatenate"):
            return self.r_cat(args, kwargs, out)
        if name == "stack":
            ts = args[0] if args else kwargs["tensors"]
            dim = kwargs.get("dim", args[1] if len(args) > 1 else 0)
            dim = _norm_dim(dim, out.dim())
            self.broadcast_union(list(ts), None)
            base = list(self.get(ts[0]))
            self.set(out, base[:dim] + [Space(len(ts), "stack")] + base[dim:])
            return
        if name in ("split", "chunk", "unbind", "tensor_split", "split_with_sizes"):
            return self.r_split(name, args, kwargs, out)
        if name in ("__getitem__",):
            return self.r_getitem(args, out)
        if name in ("narrow", "select"):
            src = args[0]
            dim = _norm_dim(args[1], src.dim())
            dims = list(self.get(src))
            if name == "select":
                _fix(dims[dim], f"select in {self.current_module()}")
                self.set(out, dims[:dim] + dims[dim + 1:])
            else:
                if out.shape[dim] != src.shape[dim]:
                    _fix(dims[dim], f"narrow in {self.current_module()}")
                    dims[dim] = Space(out.shape[dim], "narrow", fixed=True)
                self.set(out, dims)
            return
        if name in _POOL:
            src = args[0] if args else kwargs["input"]
            k = _POOL[name]
            k = src.dim() - 2 if k < 0 else k
            outs = _tensors(out)
            sd = list(self.get(src))
            for o in outs:
                if o.dim() == src.dim():
                    self.set(o, sd[: o.dim() - k] + [Space(n, "pool") for n in o.shape[o.dim() - k:]])
                else:
                    self.set(o, self.fresh(o))
            if name == "pixel_shuffle":
                _fix(sd[-3], "pixel_shuffle")
            return
        if name == "pad":
            src = args[0]
            pad = args[1] if len(args) > 1 else kwargs["pad"]
            k = len(pad) // 2
            sd = list(self.get(src))
            for i in range(k):
                d = src.dim() - 1 - i
                if pad[2 * i] or pad[2 * i + 1]:
                    _fix(sd[d], f"pad in {self.current_module()}")
                    sd[d] = Space(out.shape[d], "pad")
            self.set(out, sd)
            return
        if name in ("repeat", "tile", "repeat_interleave"):
            src = args[0]
            sd = list(self.get(src))
            od = []
            lead = out.dim() - src.dim()
            for i, n in enumerate(out.shape):
                j = i - lead
                if j >= 0 and src.shape[j] == n:
                    od.append(sd[j])
                else:
                    if j >= 0:
                        _fix(sd[j], f"{name} in {self.current_module()}")
                    od.append(Space(n, name, fixed=True))
            self.set(out, od)
            return
        if name in ("dim", "size", "numel", "__len__", "item", "tolist", "__bool__", "__index__", "__int__",
                    "__float__", "__format__", "__hash__", "__repr__", "is_floating_point", "is_contiguous",
                    "element_size", "stride", "data_ptr", "__contains__", "is_complex", "get_device"):
            return
        if name in ("arange", "zeros", "ones", "empty", "full", "rand", "randn", "tensor", "as_tensor",
                    "linspace", "triu", "tril", "ones_like", "zeros_like", "outer", "polar", "complex",
                    "view_as_real", "view_as_complex", "multinomial", "argsort", "sort", "topk", "nonzero"):
            if name in ("triu", "tril", "sort", "topk", "argsort"):
                src = args[0]
                if name in ("triu", "tril"):
                    for t in _tensors(out):
                        self.set(t, list(self.get(src)))
                    return
                return self.unknown(name, args, kwargs, out)
            for t in _tensors(out):
                self.set(t, self.fresh(t, fixed=True))
            return
        return self.unknown(name, args, kwargs, out)

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
                    res[i] = _union(res[i], s)
        for t in ts:
            if t.dim() > 0 and id(t) in self.param_names and t.numel() > 1:
                self.mark_raw(t)
        if out is not None:
            final = [r if r is not None else Space(out.shape[i], "bcast") for i, r in enumerate(res)]
            self.set(out, final)

    def r_linear(self, args, kwargs, out, flops) -> None:
        x = args[0] if args else kwargs["input"]
        w = args[1] if len(args) > 1 else kwargs["weight"]
        b = args[2] if len(args) > 2 else kwargs.get("bias")
        xd, wd = self.get(x), self.get(w)
        _union(xd[-1], wd[1])
        od = list(xd[:-1]) + [wd[0]]
        if isinstance(b, torch.Tensor):
            _union(self.get(b)[0], wd[0])
        self.set(out, od)
        self.record_op("linear", flops, list(od) + [wd[1]])

    def r_conv(self, args, kwargs, out, flops) -> None:
        x = args[0] if args else kwargs["input"]
        w = args[1] if len(args) > 1 else kwargs["weight"]
        b = args[2] if len(args) > 2 else kwargs.get("bias")
        groups = args[6] if len(args) > 6 else kwargs.get("groups", 1)
        xd, wd = self.get(x), self.get(w)
        cdim = x.dim() - w.dim() + 1  # 1 for batched input, 0 for unbatched
        cin, cout = x.shape[cdim], w.shape[0]
        od = list(xd[:cdim]) + [wd[0]] + [Space(n, "conv-spatial") for n in out.shape[cdim + 1:]]
        for k in wd[2:]:
            _fix(k, "")
        if groups == 1:
            _union(xd[cdim], wd[1])
        elif groups == cin and w.shape[1] == 1 and cout == cin:
            _union(xd[cdim], wd[0])  # depthwise: channels pass through
            _fix(wd[1], "")
        else:
            where = self.current_module()
            _fix(xd[cdim], f"grouped convolution (groups={groups}) in {where}")
            _fix(wd[0], f"grouped convolution (groups={groups}) in {where}")
            _fix(wd[1], f"grouped convolution (groups={groups}) in {where}")
        if isinstance(b, torch.Tensor):
            _union(self.get(b)[0], wd[0])
        self.set(out, od)
        self.record_op("conv", flops, od + list(wd[1:]))

    def r_batch_norm(self, args, kwargs, out) -> None:
        x = args[0] if args else kwargs["input"]
        xd = list(self.get(x))
        cdim = 1 if x.dim() > 1 else 0
        for i, key in ((1, "running_mean"), (2, "running_var"), (3, "weight"), (4, "bias")):
            t = args[i] if len(args) > i else kwargs.get(key)
            if isinstance(t, torch.Tensor):
                _union(self.get(t)[0], xd[cdim])
        self.set(out, xd)

    def r_layer_norm(self, args, kwargs, out) -> None:
        x = args[0] if args else kwargs["input"]
        shape = args[1] if len(args) > 1 else kwargs["normalized_shape"]
        shape = (shape,) if isinstance(shape, int) else tuple(shape)
        xd = list(self.get(x))
        k = len(shape)
        for i, key in ((2, "weight"), (3, "bias")):
            t = args[i] if len(args) > i else kwargs.get(key)
            if isinstance(t, torch.Tensor):
                for a, b in zip(self.get(t), xd[-k:]):
                    _union(a, b)
        if k > 1:  # stats over several dims: keep them all
            for s in xd[-k:]:
                _fix(s, f"layer_norm over {k} dims in {self.current_module()}")
        self.set(out, xd)

    def r_rms_norm(self, args, kwargs, out) -> None:
        self.r_layer_norm(args[:2] + ((args[2],) if len(args) > 2 else ()), kwargs, out)

    def r_group_norm(self, args, kwargs, out) -> None:
        x = args[0] if args else kwargs["input"]
        g = args[1] if len(args) > 1 else kwargs["num_groups"]
        xd = list(self.get(x))
        for i, key in ((2, "weight"), (3, "bias")):
            t = args[i] if len(args) > i else kwargs.get(key)
            if isinstance(t, torch.Tensor):
                _union(self.get(t)[0], xd[1])
        if g != x.shape[1]:
            _fix(xd[1], f"group_norm with {g} groups over {x.shape[1]} channels in {self.current_module()}")
        self.set(out, xd)

    def r_embedding(self, args, kwargs, out) -> None:
        idx = args[0] if args else kwargs["input"]
        w = args[1] if len(args) > 1 else kwargs["weight"]
        wd = self.get(w)
        _fix(wd[0], "embedding rows (vocabulary)")
        self.set(out, list(self.get(idx)) + [wd[1]])

    def r_matmul(self, a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, flops: float, name: str) -> None:
        ad, bd = list(self.get(a)), list(self.get(b))
        for t in (a, b):
            if id(t) in self.param_names:
                self.mark_raw(t)
        if a.dim() == 1 or b.dim() == 1:
            if a.dim() == 1 and b.dim() == 1:
                _union(ad[0], bd[0])
                self.set(out, [])
                return
            if a.dim() == 1:
                _union(ad[0], bd[-2])
                od = bd[:-2] + [bd[-1]]
            else:
                _union(ad[-1], bd[-1])
                od = ad[:-1]
            self.set(out, od)
            self.record_op(name, flops, list(od) + [ad[-1] if a.dim() > 1 else ad[0]])
            return
        _union(ad[-1], bd[-2])
        ba, bb = ad[:-2], bd[:-2]
        nb = out.dim() - 2
        batch: list[Space] = []
        for i in range(nb):
            ia, ib = i - (nb - len(ba)), i - (nb - len(bb))
            sa = ba[ia] if ia >= 0 and a.shape[ia] == out.shape[i] else None
            sb = bb[ib] if ib >= 0 and b.shape[ib] == out.shape[i] else None
            if sa is not None and sb is not None:
                batch.append(_union(sa, sb))
            else:
                batch.append(sa or sb or Space(out.shape[i], "bcast"))
        od = batch + [ad[-2], bd[-1]]
        self.set(out, od)
        self.record_op(name, flops, od + [ad[-1]])
        if nb >= 1 and a.dim() == 4 and b.dim() == 4:
            _tag(batch[-1], "heads")
            _tag(ad[-1], "head_dim")

    def r_sdpa(self, args, kwargs, out, flops) -> None:
        q = args[0] if args else kwargs["query"]
        k = args[1] if len(args) > 1 else kwargs["key"]
        v = args[2] if len(args) > 2 else kwargs["value"]
        qd, kd, vd = list(self.get(q)), list(self.get(k)), list(self.get(v))
        _union(qd[-1], kd[-1])
        _union(kd[-2], vd[-2])  # key/value sequence
        _union(kd[-3], vd[-3])
        for i in range(q.dim() - 3):
            _union(qd[i], kd[i])
            _union(qd[i], vd[i])
        hq, hk = q.shape[-3], k.shape[-3]
        if hq == hk:
            _union(qd[-3], kd[-3])
            heads = qd[-3]
        else:  # grouped-query attention: query heads = kv heads x repeats
            rep = hq // hk
            parts = _split(qd[-3], [hk, rep], "product", f"gqa:{self.current_module()}")
            _union(parts[0], kd[-3])
            _fix(parts[1], "")
            heads = kd[-3]
        _tag(heads, "heads")
        _tag(qd[-1], "head_dim")
        _tag(vd[-1], "head_dim")
        mask = args[3] if len(args) > 3 else kwargs.get("attn_mask")
        if isinstance(mask, torch.Tensor):
            self.get(mask)
        od = qd[:-1] + [vd[-1]]
        self.set(out, od)
        dq, dv = q.shape[-1], v.shape[-1]
        lk = kd[-2]
        base = qd[:-1]
        self.record_op("sdpa_qk", flops * dq / (dq + dv), base + [lk, qd[-1]])
        self.record_op("sdpa_av", flops * dv / (dq + dv), base + [lk, vd[-1]])

    def r_reduce(self, name, args, kwargs, out) -> None:
        src = args[0] if args else kwargs["input"]
        dim = kwargs.get("dim", args[1] if len(args) > 1 and not isinstance(args[1], bool) else None)
        if name in ("norm",):
            dim = kwargs.get("dim", args[2] if len(args) > 2 else None)
        sd = list(self.get(src))
        if dim is None:
            red = list(range(src.dim()))
        else:
            red = [_norm_dim(d, src.dim()) for d in ((dim,) if isinstance(dim, int) else dim)]
        for d in red:
            _fix(sd[d], f"{name} over this dim in {self.current_module() or 'model'}")
        for o in _tensors(out):
            if o.dim() == src.dim():
                self.set(o, [Space(1, "keepdim") if i in red else s for i, s in enumerate(sd)])
            elif o.dim() == src.dim() - len(red):
                self.set(o, [s for i, s in enumerate(sd) if i not in red])
            else:
                self.set(o, self.fresh(o))

    def r_permute(self, name, args, kwargs, out) -> None:
        src = args[0]
        sd = list(self.get(src))
        n = src.dim()
        if name == "permute":
            perm = args[1:] if len(args) > 1 and isinstance(args[1], int) else (args[1] if len(args) > 1 else kwargs["dims"])
            od = [sd[_norm_dim(p, n)] for p in perm]
        elif name in ("transpose", "transpose_", "swapaxes", "swapdims"):
            d0 = _norm_dim(args[1] if len(args) > 1 else kwargs["dim0"], n)
            d1 = _norm_dim(args[2] if len(args) > 2 else kwargs["dim1"], n)
            od = list(sd)
            od[d0], od[d1] = od[d1], od[d0]
        elif name == "t":
            od = sd[::-1]
        else:  # movedim
            srcd = args[1] if len(args) > 1 else kwargs["source"]
            dst = args[2] if len(args) > 2 else kwargs["destination"]
            srcd = [srcd] if isinstance(srcd, int) else list(srcd)
            dst = [dst] if isinstance(dst, int) else list(dst)
            srcd = [_norm_dim(d, n) for d in srcd]
            dst = [_norm_dim(d, n) for d in dst]
            od: list[Space | None] = [None] * n
            for s_, d_ in zip(srcd, dst):
                od[d_] = sd[s_]
            rest = iter([sd[i] for i in range(n) if i not in srcd])
            od = [o if o is not None else next(rest) for o in od]
        self.set(out, list(od))

    def r_reshape(self, name, args, kwargs, out) -> None:
        src = args[0]
        sd = list(self.get(src))
        ins = list(src.shape)
        outs = list(out.shape)
        # explicit ints in the requested shape (for attribute updates on export)
        explicit: list[int] = []
        if name in ("view", "reshape"):
            req = args[1:]
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
            if len(gi) == 1 and len(gj_nz) == 1:
                od[gj_nz[0]] = sd[gi[0]]
            elif len(gj_nz) == 1:
                od[gj_nz[0]] = _make_composite("product", [sd[k] for k in gi], f"merge:{self.current_module()}")
            elif len(gi) == 1:
                parts = _split(sd[gi[0]], [outs[k] for k in gj_nz], "product", f"split:{self.current_module()}")
                for k, p in zip(gj_nz, parts):
                    od[k] = p
                    if explicit and k < len(explicit) and explicit[k] == outs[k]:
                        self.reshapes.append(ReshapeRecord(self.current_module(), outs[k], p))
            else:
                merged = _make_composite("product", [sd[k] for k in gi], f"merge:{self.current_module()}")
                parts = _split(merged, [outs[k] for k in gj_nz], "product", f"split:{self.current_module()}")
                for k, p in zip(gj_nz, parts):
                    od[k] = p
        self.set(out, [s if s is not None else Space(outs[k], "unit") for k, s in enumerate(od)])

    def r_cat(self, args, kwargs, out) -> None:
        ts = list(args[0] if args else kwargs["tensors"])
        dim = kwargs.get("dim", args[1] if len(args) > 1 else 0)
        ts = [t for t in ts if t.numel() > 0 or t.dim() == out.dim()]
        dim = _norm_dim(dim, out.dim())
        labs = [list(self.get(t)) for t in ts]
        for t in ts:
            self.mark_raw(t) if id(t) in self.param_names else None
        od: list[Space] = []
        for d in range(out.dim()):
            if d == dim:
                od.append(_make_composite("concat", [lab[d] for lab in labs], f"cat:{self.current_module()}")
                          if len(labs) > 1 else labs[0][d])
            else:
                s = labs[0][d]
                for lab in labs[1:]:
                    s = _union(s, lab[d])
                od.append(s)
        self.set(out, od)

    def r_split(self, name, args, kwargs, out) -> None:
        src = args[0]
        outs = _tensors(out)
        sd = list(self.get(src))
        if name == "unbind":
            dim = _norm_dim(kwargs.get("dim", args[1] if len(args) > 1 else 0), src.dim())
            _fix(sd[dim], f"unbind in {self.current_module()}")
            for o in outs:
                self.set(o, sd[:dim] + sd[dim + 1:])
            return
        dim = kwargs.get("dim", args[2] if len(args) > 2 else 0)
        dim = _norm_dim(dim, src.dim())
        sizes = [o.shape[dim] for o in outs]
        parts = _split(sd[dim], sizes, "concat", f"split:{self.current_module()}") if len(outs) > 1 else [sd[dim]]
        for o, p in zip(outs, parts):
            self.set(o, sd[:dim] + [p] + sd[dim + 1:])
        size_arg = args[1] if len(args) > 1 else kwargs.get("split_size_or_sections", kwargs.get("split_size"))
        if name == "split" and isinstance(size_arg, int) and len(outs) > 1:
            self.reshapes.append(ReshapeRecord(self.current_module(), size_arg, parts[0]))

    def r_getitem(self, args, out) -> None:
        src, idx = args[0], args[1]
        sd = list(self.get(src))
        if not isinstance(idx, tuple):
            idx = (idx,)
        if any(isinstance(i, torch.Tensor) and i.dtype != torch.bool for i in idx) or \
                any(isinstance(i, (list,)) for i in idx):
            # advanced integer indexing: keep dims that are plainly sliced only if shapes line up
            return self.unknown("__getitem__(tensor index)", (src,), {}, out)
        # expand Ellipsis
        n_real = sum(1 for i in idx if i is not None and i is not Ellipsis and not (isinstance(i, torch.Tensor)))
        bool_dims = sum(i.dim() for i in idx if isinstance(i, torch.Tensor))
        if bool_dims:
            return self.unknown("__getitem__(mask index)", (src,), {}, out)
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
                _fix(sd[d], f"integer index in {self.current_module() or 'model'}")
                d += 1
                continue
            if isinstance(i, slice):
                start, stop, step = i.indices(src.shape[d])
                if (start, stop, step) == (0, src.shape[d], 1):
                    od.append(sd[d])
                else:
                    _fix(sd[d], f"slice in {self.current_module() or 'model'}")
                    od.append(Space(len(range(start, stop, step)), "slice", fixed=True))
                d += 1
                continue
            raise TraceError(f"internal: index {i!r}")
        if len(od) != out.dim():
            return self.unknown("__getitem__", (src,), {}, out)
        self.set(out, od)


# --------------------------------------------------------------------------- module-level hooks
def _leaf_kind(m: nn.Module) -> str | None:
    """Layers that are traced as one unit (their insides are not followed)."""
    if is_rmsnorm(m):
        return "rmsnorm"
    if _is_hf_conv1d(m):
        return "hf_conv1d"
    if isinstance(m, nn.MultiheadAttention):
        return "mha"
    return None


_LAYER_KINDS: list[tuple[type, str]] = [
    (nn.Linear, "linear"), (nn.Conv1d, "conv"), (nn.Conv2d, "conv"), (nn.Conv3d, "conv"),
    (nn.modules.batchnorm._BatchNorm, "batchnorm"), (nn.LayerNorm, "layernorm"), (nn.GroupNorm, "groupnorm"),
    (nn.Embedding, "embedding"),
]


def layer_kind(m: nn.Module) -> str | None:
    """The kind of a known layer whose output channels dmscale can mask and slice."""
    k = _leaf_kind(m)
    if k in ("rmsnorm", "hf_conv1d"):
        return k
    for cls, kind in _LAYER_KINDS:
        if isinstance(m, cls):
            return kind
    return None


def _first_tensor(obj: Any) -> torch.Tensor | None:
    if isinstance(obj, torch.Tensor):
        return obj
    if isinstance(obj, (tuple, list)) and obj and isinstance(obj[0], torch.Tensor):
        return obj[0]
    return None


def trace(model: nn.Module, example_inputs: tuple, example_kwargs: dict | None = None,
          depth_containers: Iterable[str] | None = None,
          depth_blocks: Iterable[Iterable[str]] | None = None) -> TraceResult:
    """Run ``model`` once on the example inputs and return the coupled-dimension structure.

    ``depth_containers`` limits automatic block discovery to these containers; ``depth_blocks``
    declares stages of removable blocks by module name (each must keep its input's shape).
    """
    example_kwargs = example_kwargs or {}
    tr = _Tracer(model)
    names = {id(m): n for n, m in model.named_modules()}
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

    def pre(mod, args, kwargs):
        name = names.get(id(mod), "?")
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
                tr._block_in_tensor = getattr(tr, "_block_in_tensor", {})
                tr._block_in_tensor[name] = spec[2]
            tr.block_stack.append(name)
        kind = _leaf_kind(mod)
        if kind is not None and tr.leaf_depth == 0:
            tr.leaf_flop_start.append(tr.counter.total)
        if kind is not None:
            tr.leaf_depth += 1
        return None

    def post(mod, args, kwargs, output):
        name = names.get(id(mod), "?")
        kind = _leaf_kind(mod)
        if kind is not None:
            tr.leaf_depth -= 1
            if tr.leaf_depth == 0:
                flops = tr.counter.total - tr.leaf_flop_start.pop()
                x = args[0] if args else next((v for v in kwargs.values() if isinstance(v, torch.Tensor)), None)
                _leaf_rule(tr, mod, kind, name, x, output, flops)
        if layer_kind(mod) is not None and tr.leaf_depth == 0:
            y = _first_tensor(output)
            if y is not None and name not in tr.layer_outputs:
                tr.layer_outputs[name] = list(tr.get(y))
        info = containers.get(id(mod))
        if info is not None and tr.block_stack and tr.block_stack[-1] == name:
            tr.block_stack.pop()
            x = getattr(tr, "_block_in_tensor", {}).get(name)
            y = _first_tensor(output)
            tr.block_shapes_ok[name] = x is not None and y is not None and tuple(x.shape) == tuple(y.shape)
        tr.module_stack.pop()
        return None

    # residual detection: an add whose operand is the block's own input
    orig_rule = tr.rule

    def rule_with_residual(name, func, args, kwargs, out, flops):
        if name in ("add", "add_", "__add__", "__radd__", "__iadd__") and tr.block_stack:
            ids = {id(t) for t in _tensors((args, kwargs))}
            for b in tr.block_stack:
                if tr.block_inputs.get(b) in ids:
                    tr.residual_blocks.add(b)
        return orig_rule(name, func, args, kwargs, out, flops)

    tr.rule = rule_with_residual  # type: ignore[method-assign]

    for m in model.modules():
        handles.append(m.register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(m.register_forward_hook(post, with_kwargs=True))
    was_training = model.training
    model.eval()  # never update BatchNorm statistics while tracing
    try:
        with torch.no_grad(), tr.counter, tr:
            inputs = tuple(example_inputs)
            for t in _tensors((inputs, example_kwargs)):
                for s in tr.get(t):
                    _fix(s, "model input")
            out = model(*inputs, **example_kwargs)
        for t in _tensors(_model_outputs(out)):
            for s in tr.get(t):
                _fix(s, "model output")
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
        kind = layer_kind(mod)
        if kind is None:
            continue
        rec = _layer_record(tr, mod, mname, kind)
        if rec is not None:
            rec.tied = any(owners.get(id(p), 0) > 1 for p in mod._parameters.values() if p is not None)
            tr.layers[mname] = rec
    for n in declared:
        if n not in tr.candidate_blocks:
            raise ValueError(f"depth_blocks: block {n!r} did not run on example_inputs with a tensor input")
        if not tr.block_shapes_ok.get(n):
            raise ValueError(f"depth_blocks: block {n!r} changes the shape of its input, so it cannot be removed")
        tr.candidate_blocks[n].declared = True
    blocks = [b for n, b in tr.candidate_blocks.items()
              if (n in tr.residual_blocks or n in declared) and tr.block_shapes_ok.get(n)]
    # a container of removable blocks is not itself removable: keep the innermost
    blocks = [b for b in blocks if not any(o.name.startswith(b.name + ".") for o in blocks)]
    known = {"weight", "bias", "running_mean", "running_var", "num_batches_tracked"}
    mods = dict(model.named_modules())
    for rec in tr.params.values():
        rec.raw = rec.attr not in known or layer_kind(mods.get(rec.module, nn.Identity())) is None
    # blocks nested in other removable blocks of the same container family are fine; order by container/index
    blocks.sort(key=lambda b: (b.container, b.index))
    # report only ops that cost pruning freedom: they touched a dimension some parameter lives in
    unsupported = {op: mods for op, mods in tr.unsupported.items()
                   if any(leaf.owned and leaf.size > 1 for s in tr.unsupported_spaces.get(op, []) for leaf in s.leaves())}
    return TraceResult(tr.params, tr.layers, tr.ops, blocks, tr.reshapes, unsupported, tr.counter.total)


def _model_outputs(out: Any) -> Any:
    if isinstance(out, dict):
        return list(out.values())
    if hasattr(out, "to_tuple"):
        return out.to_tuple()
    return out


_STD_FORWARD = {
    "linear": nn.Linear.forward, "conv": None, "batchnorm": nn.modules.batchnorm._BatchNorm.forward,
    "layernorm": nn.LayerNorm.forward, "groupnorm": nn.GroupNorm.forward, "embedding": nn.Embedding.forward,
}


def _layer_record(tr: _Tracer, mod: nn.Module, mname: str, kind: str) -> LayerRecord | None:
    """Where the output channels of a known layer live, read off its traced output."""
    w = getattr(mod, "weight", None)
    key = f"{mname}.weight" if mname else "weight"
    prec = tr.params.get(key)
    if prec is None or not isinstance(w, torch.Tensor):
        return None
    out_space = prec.dims[1] if kind in ("embedding", "hf_conv1d") else prec.dims[0]
    labels = tr.layer_outputs.get(mname)
    dims: dict[int, Space] = {}
    if labels is not None:
        n = len(labels)
        for i, s in enumerate(labels):
            if s.find() is out_space.find():
                dims[i - n] = out_space
    if not dims:
        _fix(out_space, f"output channels of {type(mod).__name__} '{mname}' not found in its output")
        return None
    norm_space = None
    if kind in ("layernorm", "rmsnorm"):
        std = _STD_FORWARD.get(kind)
        custom = std is not None and type(mod).forward is not std
        if w.dim() != 1 or custom or list(dims) != [-1]:
            _fix(out_space, f"{type(mod).__name__} '{mname}' normalises in a way dmscale does not model")
            return None
        norm_space = prec.dims[0]
    return LayerRecord(mname, kind, dims, norm_space=norm_space, blocks=prec.blocks)


def _leaf_rule(tr: _Tracer, mod: nn.Module, kind: str, name: str, x: torch.Tensor | None, output: Any,
               flops: float) -> None:
    """Label the output of a layer traced as one unit."""
    y = _first_tensor(output)
    if kind == "rmsnorm":
        w = getattr(mod, "weight", None)
        xd = list(tr.get(x))
        if isinstance(w, torch.Tensor) and w.dim() == 1:
            _union(tr.get(w)[0], xd[-1])
        if y is not None and tuple(y.shape) == tuple(x.shape):
            tr.set(y, xd)
        return
    if kind == "hf_conv1d":
        w = mod.weight
        xd, wd = tr.get(x), tr.get(w)
        _union(xd[-1], wd[0])
        b = getattr(mod, "bias", None)
        if isinstance(b, torch.Tensor):
            _union(tr.get(b)[0], wd[1])
        od = list(xd[:-1]) + [wd[1]]
        tr.set(y, od)
        tr.record_op("hf_conv1d", flops, od + [wd[0]])
        return
    # unsupported-as-a-unit layers (nn.MultiheadAttention): fix everything they touch
    ins = [x] if isinstance(x, torch.Tensor) else []
    for t in ins + _tensors(output):
        for s in tr.get(t):
            _fix(s, f"{type(mod).__name__} '{name}' is not searched")
    for p in mod.parameters():
        for s in tr.get(p):
            _fix(s, f"{type(mod).__name__} '{name}' is not searched")
    tr.record_op(type(mod).__name__, flops, [])
