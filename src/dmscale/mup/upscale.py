"""μpscaling: function-preserving widening of every hidden dimension by an integer factor.

Copy-and-split (arXiv 2602.10545): each hidden unit is duplicated ``k`` times in adjacent
positions and fan-in weights are divided by ``k``, so at zero noise the wide model computes
exactly the same function.  Attention is widened by duplicating whole heads (head dim fixed).
Width multipliers per parameter are kept in a side table (see :func:`width_info`), not on tensors.
"""

from __future__ import annotations

import copy
import math
import numbers
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "upscale",
    "width_info",
    "set_width_info",
    "upscale_optimizer_state",
    "upscale_cli",
    "UpscaleError",
    "WIDTH_ATTR",
]

WIDTH_ATTR = "_dmscale_width"  # plain attribute on the model: survives deepcopy, invisible to state_dict
CONFIG_KEY = "dmscale_width"  # mirrored into an HF config so save_pretrained/from_pretrained keep it

# Direct nn.Parameters (not owned by a leaf layer) whose last dim is the hidden width.
_EMBEDDING_LIKE_PARAMS = {
    "cls_token", "class_token", "position_embeddings", "pos_embed", "pos_embedding",
    "mask_token", "dist_token", "register_tokens",
}
# Integer attributes of non-torch modules and HF configs that hold a hidden size / head count.
_SCALED_MODULE_ATTRS = (
    "embed_dim", "hidden_size", "intermediate_size", "num_heads", "num_attention_heads",
    "num_key_value_heads", "all_head_size", "split_size", "n_embd",
)
_SCALED_CONFIG_ATTRS = (
    "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "n_inner",
    "n_embd", "n_head",
    "embedding_size", "hidden_sizes", "pooler_output_size", "d_model", "ffn_dim",
)
_FINAL_NORM_NAMES = ("ln_f", "norm", "final_layernorm", "final_layer_norm", "layernorm")


class UpscaleError(ValueError):
    """Raised when a model (or one of its modules) cannot be widened exactly."""


@dataclass
class _Plan:
    """How one parameter/buffer is widened: index maps per dim, rescale, noise fan-in, μP factors."""

    maps: list[tuple[int, Tensor]]
    scale: float = 1.0
    k_in: int = 1
    k_out: int = 1
    noise_fan_in: int | None = None  # fan-in of the wide tensor; None: no noise (biases, norms, readout)


@dataclass
class _Ctx:
    """State shared by the module rules while planning one upscale."""

    k: int
    fixed_in: set[str]
    fixed_out: set[str]
    in_override: dict[str, Tensor] = field(default_factory=dict)
    out_override: dict[str, Tensor] = field(default_factory=dict)
    plans: dict[int, tuple[Tensor, _Plan]] = field(default_factory=dict)  # id(tensor) -> (tensor, plan)
    attr_updates: list[tuple[Any, str, Any]] = field(default_factory=list)


def _unit_map(n: int, k: int) -> Tensor:
    """Index map duplicating each of n units k times in adjacent positions."""
    return torch.arange(n).repeat_interleave(k)


def _head_map(n_heads: int, head_dim: int, k: int) -> Tensor:
    """Index map duplicating whole heads (adjacent copies), each head keeping head_dim units."""
    heads = torch.arange(n_heads).repeat_interleave(k)
    return (heads[:, None] * head_dim + torch.arange(head_dim)[None, :]).reshape(-1)


def _gqa_query_map(n_q: int, n_kv: int, head_dim: int, k: int) -> Tensor:
    """Query-head map for grouped-query attention: each KV-head copy serves one copy of its whole group.

    Copying query heads adjacently would give KV copies unequal gradients (copy 0 would serve
    only copies of the group's first query head), so the group of g query heads is repeated k times.
    """
    g = n_q // n_kv
    j = torch.arange(n_q * k)
    heads = (j // (g * k)) * g + j % g
    return (heads[:, None] * head_dim + torch.arange(head_dim)[None, :]).reshape(-1)


def _unwrap(model: nn.Module) -> nn.Module:
    """Strip torch.compile / DDP wrappers so parameter names match the plain module."""
    while True:
        if hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        elif type(model).__name__ in ("DistributedDataParallel", "DataParallel") and hasattr(model, "module"):
            model = model.module
        else:
            return model


def _is_hf_conv1d(m: nn.Module) -> bool:
    """True for transformers' GPT-2 style Conv1D (a Linear with transposed weight)."""
    return type(m).__name__ == "Conv1D" and hasattr(m, "nf") and hasattr(m, "nx")


def _is_rmsnorm(m: nn.Module) -> bool:
    """True for torch.nn.RMSNorm and HF *RMSNorm classes with a 1-D weight."""
    if isinstance(m, getattr(nn, "RMSNorm", ())):
        return True
    w = getattr(m, "weight", None)
    return type(m).__name__.endswith("RMSNorm") and isinstance(w, Tensor) and w.dim() == 1


_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
_INST = (nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)


def _is_weight_layer(m: nn.Module) -> bool:
    """Layers that map an input feature dim to an output feature dim (decide model in/out)."""
    return isinstance(m, (nn.Linear, nn.Embedding, nn.MultiheadAttention) + _CONV) or _is_hf_conv1d(m)


def _is_norm(m: nn.Module) -> bool:
    """Normalisation layers handled by repeat-without-rescale."""
    return isinstance(m, _BN + _INST + (nn.LayerNorm, nn.GroupNorm)) or _is_rmsnorm(m)


def _in_out_sizes(m: nn.Module) -> tuple[int, int]:
    """(input features, output features) of a weight layer."""
    if isinstance(m, nn.Linear):
        return m.in_features, m.out_features
    if isinstance(m, _CONV):
        return m.in_channels, m.out_channels
    if _is_hf_conv1d(m):
        return m.nx, m.nf
    if isinstance(m, nn.Embedding):
        return m.num_embeddings, m.embedding_dim
    if isinstance(m, nn.MultiheadAttention):
        return m.embed_dim, m.embed_dim
    raise UpscaleError(f"not a weight layer: {type(m).__name__}")


# --------------------------------------------------------------------------- planning


def _maps_for(ctx: _Ctx, name: str, m: nn.Module) -> tuple[Tensor | None, Tensor | None]:
    """Input / output index maps of a weight layer (None = dimension kept fixed)."""
    n_in, n_out = _in_out_sizes(m)
    in_map = None if name in ctx.fixed_in else ctx.in_override.get(name, _unit_map(n_in, ctx.k))
    out_map = None if name in ctx.fixed_out else ctx.out_override.get(name, _unit_map(n_out, ctx.k))
    if isinstance(m, nn.Embedding):
        in_map = None  # token / position index space is data, never widened
    return in_map, out_map


def _add(ctx: _Ctx, t: Tensor | None, plan: _Plan) -> None:
    """Register a plan for a tensor (tied tensors are planned once, consistently)."""
    if t is None:
        return
    prev = ctx.plans.get(id(t))
    if prev is not None:
        return
    ctx.plans[id(t)] = (t, plan)


def _plan_matrix(ctx: _Ctx, name: str, m: nn.Module, w: Tensor, out_dim: int, in_dim: int) -> tuple[int, int]:
    """Plan a (out, in, ...) or transposed weight: rows/cols copied, fan-in divided by k_in."""
    in_map, out_map = _maps_for(ctx, name, m)
    n_in, n_out = w.shape[in_dim], w.shape[out_dim]
    maps = []
    k_in = k_out = 1
    if out_map is not None:
        maps.append((out_dim, out_map))
        k_out = len(out_map) // n_out
    if in_map is not None:
        maps.append((in_dim, in_map))
        k_in = len(in_map) // n_in
    rest = int(math.prod(s for d, s in enumerate(w.shape) if d not in (in_dim, out_dim)))
    fan_in = n_in * k_in * rest
    readout = out_map is None and in_map is not None
    _add(ctx, w, _Plan(maps, 1.0 / k_in, k_in, k_out, None if readout else fan_in))
    bias = getattr(m, "bias", None)
    if isinstance(bias, Tensor):
        _add(ctx, bias, _Plan([(0, out_map)] if out_map is not None else [], 1.0, 1, k_out))
    return k_in, k_out


def _plan_leaf(ctx: _Ctx, name: str, m: nn.Module) -> None:
    """Plan the parameters, buffers and size attributes of one supported layer."""
    k = ctx.k
    if isinstance(m, nn.Linear):
        k_in, k_out = _plan_matrix(ctx, name, m, m.weight, 0, 1)
        ctx.attr_updates += [(m, "in_features", m.in_features * k_in), (m, "out_features", m.out_features * k_out)]
    elif _is_hf_conv1d(m):
        k_in, k_out = _plan_matrix(ctx, name, m, m.weight, 1, 0)
        ctx.attr_updates += [(m, "nx", m.nx * k_in), (m, "nf", m.nf * k_out)]
    elif isinstance(m, _CONV):
        if name in ctx.in_override or name in ctx.out_override:
            raise UpscaleError(f"{name}: head-structured maps are not supported for convolutions")
        if getattr(m, "padding_mode", "zeros") not in ("zeros", "reflect", "replicate", "circular"):
            raise UpscaleError(f"{name}: unsupported padding_mode {m.padding_mode!r}")
        in_map, out_map = _maps_for(ctx, name, m)
        g = m.groups
        maps: list[tuple[int, Tensor]] = []
        k_in = 1
        k_out = 1 if out_map is None else k
        if out_map is not None:
            maps.append((0, out_map))
        new_groups = g
        if in_map is not None:
            if g > 1 and g == m.in_channels:  # depthwise: stay depthwise, fan-in unchanged
                new_groups = g * k
                if out_map is None:
                    raise UpscaleError(f"{name}: depthwise conv with a fixed output cannot be widened")
            else:  # dense or grouped: widen channels inside each group, rescale fan-in
                maps.append((1, _unit_map(m.in_channels // g, k)))
                k_in = k
        fan_in = (m.in_channels // g) * (k_in) * int(math.prod(m.kernel_size))
        readout = out_map is None and in_map is not None
        _add(ctx, m.weight, _Plan(maps, 1.0 / k_in, k_in, k_out, None if readout else fan_in))
        if m.bias is not None:
            _add(ctx, m.bias, _Plan([(0, out_map)] if out_map is not None else [], 1.0, 1, k_out))
        kin_ch = 1 if in_map is None else k
        ctx.attr_updates += [
            (m, "in_channels", m.in_channels * kin_ch),
            (m, "out_channels", m.out_channels * k_out),
            (m, "groups", new_groups),
        ]
    elif isinstance(m, nn.Embedding):
        if m.max_norm is not None:
            raise UpscaleError(f"{name}: Embedding(max_norm=...) is not width-invariant")
        in_map, out_map = _maps_for(ctx, name, m)
        if out_map is None:
            return
        _add(ctx, m.weight, _Plan([(1, out_map)], 1.0, 1, k, 1))
        ctx.attr_updates.append((m, "embedding_dim", m.embedding_dim * k))
    elif isinstance(m, nn.MultiheadAttention):
        if not m._qkv_same_embed_dim or m.bias_k is not None or m.kdim != m.embed_dim:
            raise UpscaleError(f"{name}: MultiheadAttention with kdim/vdim or add_bias_kv is not supported")
        E, H, dh = m.embed_dim, m.num_heads, m.head_dim
        hm = _head_map(H, dh, k)
        qkv = torch.cat([hm + j * E for j in range(3)])
        in_map = None if name in ctx.fixed_in else _unit_map(E, k)
        maps = [(0, qkv)] + ([(1, in_map)] if in_map is not None else [])
        k_in = 1 if in_map is None else k
        _add(ctx, m.in_proj_weight, _Plan(maps, 1.0 / k_in, k_in, k, E * k_in))
        if m.in_proj_bias is not None:
            _add(ctx, m.in_proj_bias, _Plan([(0, qkv)], 1.0, 1, k))
        ctx.in_override[name + ".out_proj"] = hm
        ctx.attr_updates += [(m, "embed_dim", E * k), (m, "kdim", E * k), (m, "vdim", E * k), (m, "num_heads", H * k)]
    elif _is_norm(m):
        n = _norm_size(name, m)
        mp = _unit_map(n, k)
        for attr in ("weight", "bias"):
            t = getattr(m, attr, None)
            if isinstance(t, Tensor):
                _add(ctx, t, _Plan([(0, mp)], 1.0, 1, k))
        for attr in ("running_mean", "running_var"):
            t = getattr(m, attr, None)
            if isinstance(t, Tensor):
                _add(ctx, t, _Plan([(0, mp)], 1.0, 1, k))
        if isinstance(m, _BN + _INST):
            ctx.attr_updates.append((m, "num_features", n * k))
        elif isinstance(m, nn.GroupNorm):
            ctx.attr_updates.append((m, "num_channels", n * k))
        elif hasattr(m, "normalized_shape"):
            ctx.attr_updates.append((m, "normalized_shape", (n * k,)))
    else:
        raise UpscaleError(f"{name}: no upscaling rule for {type(m).__name__}")


def _norm_size(name: str, m: nn.Module) -> int:
    """Number of features a norm layer normalises (only 1-D normalized shapes are supported)."""
    if isinstance(m, _BN + _INST):
        return m.num_features
    if isinstance(m, nn.GroupNorm):
        return m.num_channels
    shape = getattr(m, "normalized_shape", None)
    if shape is not None:
        shape = tuple(shape) if isinstance(shape, Sequence) else (shape,)
        if len(shape) != 1:
            raise UpscaleError(f"{name}: {type(m).__name__} over {len(shape)} dims is not supported")
        return int(shape[0])
    return int(m.weight.shape[0])


def _plan_attention(ctx: _Ctx, name: str, m: nn.Module) -> bool:
    """Set head-duplicating maps for q/k/v/o of a known attention block; True if handled."""
    k = ctx.k
    children = dict(m.named_children())
    if all(c in children for c in ("q_proj", "k_proj", "v_proj", "o_proj")):
        dh = getattr(m, "head_dim", None) or getattr(m, "attention_head_size", None)
        if not isinstance(dh, int):
            raise UpscaleError(f"{name}: attention block without an integer head_dim attribute")
        q, kk = children["q_proj"], children["k_proj"]
        nq, nkv = _in_out_sizes(q)[1] // dh, _in_out_sizes(kk)[1] // dh
        if nq % nkv:
            raise UpscaleError(f"{name}: {nq} query heads not a multiple of {nkv} KV heads")
        qmap = _gqa_query_map(nq, nkv, dh, k)
        ctx.out_override[f"{name}.q_proj"] = qmap
        ctx.out_override[f"{name}.k_proj"] = _head_map(nkv, dh, k)  # KV heads copied with their query group
        ctx.out_override[f"{name}.v_proj"] = _head_map(nkv, dh, k)
        ctx.in_override[f"{name}.o_proj"] = qmap
        return True
    if "c_attn" in children and "c_proj" in children and hasattr(m, "split_size"):  # GPT-2
        if getattr(m, "is_cross_attention", False) or "q_attn" in children:
            raise UpscaleError(f"{name}: GPT-2 cross-attention is not supported")
        E, dh = m.embed_dim, m.head_dim
        hm = _head_map(E // dh, dh, k)
        ctx.out_override[f"{name}.c_attn"] = torch.cat([hm + j * E for j in range(3)])
        ctx.in_override[f"{name}.c_proj"] = hm
        return True
    return False


def _leaf_order(model: nn.Module, example_inputs: Any) -> list[str] | None:
    """Execution order of modules on example inputs (None if no inputs or the forward fails)."""
    if example_inputs is None:
        return None
    order: list[str] = []
    hooks = [
        mod.register_forward_pre_hook(lambda _m, _a, n=n: order.append(n))
        for n, mod in model.named_modules()
        if _is_weight_layer(mod) or _is_norm(mod)
    ]
    try:
        _run(model, example_inputs)
    finally:
        for h in hooks:
            h.remove()
    return order


def _run(model: nn.Module, inputs: Any) -> Any:
    """Call a model on a tensor, tuple of args, or dict of kwargs, in eval mode without grad."""
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            if isinstance(inputs, Mapping):
                return model(**inputs)
            if isinstance(inputs, (tuple, list)):
                return model(*inputs)
            return model(inputs)
    finally:
        model.train(was)


def _plan(model: nn.Module, k: int, keep_in: Sequence[str], keep_out: Sequence[str],
          example_inputs: Any) -> _Ctx:
    """Build the widening plan for every parameter and buffer of the model."""
    named = dict(model.named_modules())
    order = _leaf_order(model, example_inputs)
    if order is None:
        order = [n for n, mod in named.items() if _is_weight_layer(mod) or _is_norm(mod)]
    weight_layers = [n for n in order if _is_weight_layer(named[n])]
    if not weight_layers:
        raise UpscaleError(f"{type(model).__name__}: no Linear/Conv/Embedding layer to widen")
    fixed_in = {weight_layers[0], *keep_in}
    fixed_out = {weight_layers[-1], *keep_out}
    get_out = getattr(model, "get_output_embeddings", None)
    head = get_out() if callable(get_out) else None
    head_name = None
    if isinstance(head, nn.Module):
        head_name = next((n for n, mod in named.items() if mod is head), None)
        if head_name:
            fixed_out.add(head_name)
    for n in list(fixed_in) + list(fixed_out):
        if n not in named:
            raise UpscaleError(f"keep_in/keep_out names unknown module {n!r}")
    ctx = _Ctx(k, fixed_in, fixed_out)
    for n, mod in named.items():
        _plan_attention(ctx, n, mod)
    first = order.index(weight_layers[0])
    last = order.index(weight_layers[-1])
    outer_norms = {n for i, n in enumerate(order) if _is_norm(named[n]) and (i < first or i > last)}
    for n, mod in named.items():
        if _is_weight_layer(mod) or _is_norm(mod):
            if n in outer_norms:  # a norm on raw inputs or on the outputs: not hidden
                for t in list(mod.parameters(recurse=False)) + list(mod.buffers(recurse=False)):
                    _add(ctx, t, _Plan([], 1.0, 1, 1))
            else:
                _plan_leaf(ctx, n, mod)
    # direct parameters of container modules (ViT cls token, position embeddings, ...)
    for n, mod in named.items():
        if _is_weight_layer(mod) or _is_norm(mod):
            continue
        for pn, p in mod.named_parameters(recurse=False):
            full = f"{n}.{pn}" if n else pn
            if p is None or id(p) in ctx.plans:
                continue
            if pn in _EMBEDDING_LIKE_PARAMS:
                _add(ctx, p, _Plan([(p.dim() - 1, _unit_map(p.shape[-1], k))], 1.0, 1, k))
            else:
                raise UpscaleError(
                    f"{full}: parameter of {type(mod).__name__} has no upscaling rule "
                    "(supported: Linear, Conv1d/2d/3d, HF Conv1D, Embedding, MultiheadAttention, norms)"
                )
    for n, p in model.named_parameters():
        if id(p) not in ctx.plans:
            raise UpscaleError(f"{n}: parameter not covered by any upscaling rule")
    # non-torch modules: scale their hidden-size / head-count attributes
    for n, mod in named.items():
        if type(mod).__module__.startswith("torch.nn"):
            continue
        for attr in _SCALED_MODULE_ATTRS:
            v = mod.__dict__.get(attr)
            if isinstance(v, int) and not isinstance(v, bool):
                ctx.attr_updates.append((mod, attr, v * k))
    return ctx


# --------------------------------------------------------------------------- applying


def _expand(t: Tensor, maps: list[tuple[int, Tensor]]) -> Tensor:
    """Copy a tensor along its widened dims with index maps (no rescale)."""
    for dim, idx in maps:
        t = t.index_select(dim, idx.to(t.device))
    return t


def _tied_heads(model: nn.Module) -> list[tuple[str, nn.Module, str]]:
    """(head name, head module, embedding name) for Linear heads sharing an Embedding's weight."""
    emb = {id(m.weight): n for n, m in model.named_modules() if isinstance(m, nn.Embedding)}
    out = []
    for n, m in model.named_modules():
        if isinstance(m, nn.Linear) and id(m.weight) in emb:
            out.append((n, m, emb[id(m.weight)]))
    return out


class _LogitScale:
    """Forward hook multiplying a tied readout's output by a constant (μP output multiplier)."""

    def __init__(self, mult: float) -> None:
        self.mult = mult

    def __call__(self, module: nn.Module, args: Any, output: Tensor) -> Tensor:
        return output * self.mult


def _final_norm(model: nn.Module) -> tuple[str, nn.Module] | None:
    """The final norm of an HF decoder (applied right before the LM head), if recognisable."""
    base = getattr(model, "base_model", None)
    if base is None or base is model:
        return None
    prefix = next((n for n, m in model.named_modules() if m is base), None)
    for nm in _FINAL_NORM_NAMES:
        mod = getattr(base, nm, None)
        if isinstance(mod, nn.Module) and _is_norm(mod):
            return (f"{prefix}.{nm}" if prefix else nm), mod
    return None


def _flatten_outputs(out: Any) -> list[Tensor]:
    """Tensors of a model output (logits preferred for HF ModelOutput)."""
    if isinstance(out, Tensor):
        return [out]
    logits = getattr(out, "logits", None)
    if isinstance(logits, Tensor):
        return [logits]
    if isinstance(out, Mapping):
        return [t for v in out.values() for t in _flatten_outputs(v)]
    if isinstance(out, (tuple, list)):
        return [t for v in out for t in _flatten_outputs(v)]
    return []


def _auto_inputs(model: nn.Module) -> list[Any]:
    """Candidate example inputs guessed from the model's first layer (for the equivalence check)."""
    cfg = getattr(model, "config", None)
    main = getattr(model, "main_input_name", None)
    if cfg is not None and main == "input_ids":
        v = int(getattr(cfg, "vocab_size", 16))
        return [{"input_ids": torch.randint(0, v, (2, 7)), "use_cache": False}]
    if cfg is not None and main == "pixel_values":
        c = int(getattr(cfg, "num_channels", 3))
        s = getattr(cfg, "image_size", 32)
        s = s if isinstance(s, int) else int(s[0])
        return [{"pixel_values": torch.randn(2, c, s, s)}]
    first = next((m for m in model.modules() if _is_weight_layer(m)), None)
    dt = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    if isinstance(first, nn.Linear):
        return [torch.randn(3, first.in_features, dtype=dt)]
    if isinstance(first, nn.Embedding):
        return [torch.randint(0, first.num_embeddings, (2, 7))]
    if isinstance(first, nn.Conv1d):
        return [torch.randn(2, first.in_channels, s, dtype=dt) for s in (32, 64)]
    if isinstance(first, nn.Conv2d):
        return [torch.randn(2, first.in_channels, s, s, dtype=dt) for s in (32, 28, 64, 224)]
    return []


def _check_equal(small: nn.Module, big: nn.Module, example_inputs: Any) -> bool:
    """Assert big(x) == small(x); returns False if no input could be run through the small model."""
    candidates = [example_inputs] if example_inputs is not None else _auto_inputs(small)
    for x in candidates:
        try:
            ref = _flatten_outputs(_run(small, x))
        except Exception:  # noqa: BLE001 - guessed inputs may not fit the model
            if example_inputs is not None:
                raise
            continue
        got = _flatten_outputs(_run(big, x))
        if len(ref) != len(got) or any(a.shape != b.shape for a, b in zip(ref, got)):
            raise UpscaleError(
                f"{type(small).__name__}: widened model changed the output shape "
                f"({[tuple(a.shape) for a in ref]} -> {[tuple(b.shape) for b in got]}); "
                "an output layer was widened: pass keep_out=[...]"
            )
        for a, b in zip(ref, got):
            if not a.is_floating_point():
                continue
            tol = 1e-3 if a.dtype in (torch.float16, torch.bfloat16) else 1e-4
            scale = max(1.0, float(a.abs().max()))
            err = float((a - b).abs().max())
            if not err <= tol * scale * 10:
                raise UpscaleError(
                    f"{type(small).__name__}: widened model is not function-preserving (max |diff| {err:.3g}). "
                    "Likely an unsupported reshape, e.g. flattening conv feature maps into a Linear, "
                    "a custom attention, or an input/output layer that needs keep_in/keep_out."
                )
        return True
    return False


def upscale(
    model: nn.Module,
    width: int | float = 2,
    noise: float = 0.0,
    *,
    example_inputs: Any = None,
    check: bool = True,
    keep_in: Sequence[str] = (),
    keep_out: Sequence[str] = (),
    seed: int | None = None,
) -> nn.Module:
    """Return a new model with every hidden dim ×width that computes the same function at noise=0.

    example_inputs (tensor, tuple of args or dict of kwargs) sets the input/output layers by
    execution order and is used to verify function preservation; without it registration order
    and guessed inputs are used.  keep_in/keep_out name extra layers whose input/output is data.
    """
    if isinstance(width, bool) or not isinstance(width, numbers.Real) or width != int(width) or width < 1:
        raise ValueError(f"upscale: width must be a positive integer factor, got {width!r}")
    if not (isinstance(noise, numbers.Real) and noise >= 0 and math.isfinite(noise)):
        raise ValueError(f"upscale: noise must be a finite number >= 0, got {noise!r}")
    k = int(width)
    small = _unwrap(model)
    big = copy.deepcopy(small)
    prev = width_info(small) or {}
    ctx = _plan(big, k, keep_in, keep_out, example_inputs)
    names = {id(p): n for n, p in big.named_parameters()}
    names.update({id(b): n for n, b in big.named_buffers()})
    params: dict[str, tuple[int, int]] = {}
    maps: dict[str, list[tuple[int, Tensor]]] = {}
    noise_plans: list[tuple[Tensor, _Plan]] = []
    with torch.no_grad():
        for t, plan in ctx.plans.values():
            new = _expand(t.data, plan.maps)
            if plan.scale != 1.0:
                new = new * plan.scale
            t.data = new.contiguous()
            n = names[id(t)]
            maps[n] = plan.maps
            if isinstance(t, nn.Parameter):
                params[n] = (plan.k_in, plan.k_out)
                if plan.noise_fan_in is not None:
                    noise_plans.append((t, plan))
        for mod, attr, val in ctx.attr_updates:
            setattr(mod, attr, val)
        # tied readout: keep it tied, scale the logits by 1/k (fold into the final norm when possible)
        fold = None
        for hname, head, ename in _tied_heads(big):
            head.in_features = head.weight.shape[1]
            fn = _final_norm(big)
            if fn is not None and len(_tied_heads(big)) == 1:
                fname, norm = fn
                for attr in ("weight", "bias"):
                    t = getattr(norm, attr, None)
                    if isinstance(t, Tensor):
                        t.mul_(1.0 / k)
                        params[names[id(t)]] = (k, 1)  # logit multiplier lives here: fan-in-like factor
                fold = fname
            else:
                head.register_forward_hook(_LogitScale(1.0 / k))
                fold = f"hook:{hname}"
        if check:
            verified = _check_equal(small, big, example_inputs)
            if not verified:
                warnings.warn(
                    f"upscale: could not run {type(small).__name__} on guessed inputs; function preservation "
                    "was not verified (pass example_inputs=...)", stacklevel=2)
        if noise > 0:
            gen = torch.Generator(device="cpu")
            if seed is not None:
                gen.manual_seed(seed)
            else:
                gen.seed()
            for t, plan in noise_plans:
                z = torch.randn(t.shape, generator=gen, dtype=torch.float64).to(t.dtype).to(t.device)
                t.add_(z * (noise / math.sqrt(plan.noise_fan_in) * plan.scale))
    _update_config(big, k)
    # compose with an earlier upscale so μP factors stay relative to the original base
    prev_params = prev.get("params", {})
    total = {n: (kin * prev_params.get(n, (1, 1))[0], kout * prev_params.get(n, (1, 1))[1])
             for n, (kin, kout) in params.items()}
    set_width_info(big, {"width": k * int(prev.get("width", 1)), "params": total, "fold": fold}, maps, params)
    return big


def _update_config(model: nn.Module, k: int) -> None:
    """Scale hidden sizes / head counts in an HF config so from_pretrained rebuilds the wide model."""
    cfg = getattr(model, "config", None)
    if cfg is None or not hasattr(cfg, "to_dict"):
        return
    d = cfg.to_dict()
    if "head_dim" in d and d["head_dim"] is None and "hidden_size" in d and "num_attention_heads" in d:
        cfg.head_dim = d["hidden_size"] // d["num_attention_heads"]
    amap = getattr(cfg, "attribute_map", {}) or {}
    canon = list(dict.fromkeys(amap.get(a, a) for a in _SCALED_CONFIG_ATTRS))
    for attr in canon:
        if attr not in d:
            continue
        v = getattr(cfg, attr)
        if isinstance(v, int) and not isinstance(v, bool):
            setattr(cfg, attr, v * k)
        elif isinstance(v, (list, tuple)) and all(isinstance(x, int) for x in v):
            setattr(cfg, attr, type(v)(x * k for x in v))


# --------------------------------------------------------------------------- side table


def set_width_info(model: nn.Module, info: dict[str, Any], maps: dict[str, list] | None = None,
                   step: dict[str, tuple[int, int]] | None = None) -> None:
    """Store width multipliers on the model (plain attribute) and in its HF config (if any)."""
    m = _unwrap(model)
    info = {"width": int(info.get("width", 1)), "fold": info.get("fold"),
            "params": {n: (int(a), int(b)) for n, (a, b) in info["params"].items()}}
    if maps is not None:  # in-memory only: index maps and factors of the last upscale step
        info["maps"] = maps
        info["step"] = step or {}
    object.__setattr__(m, WIDTH_ATTR, info)
    cfg = getattr(m, "config", None)
    if cfg is not None and hasattr(cfg, "to_dict"):
        setattr(cfg, CONFIG_KEY, {"width": info["width"], "fold": info["fold"],
                                  "params": {n: [a, b] for n, (a, b) in info["params"].items()}})


def width_info(model: nn.Module) -> dict[str, Any] | None:
    """Width multipliers of an upscaled model: {'width', 'params': {name: (k_in, k_out)}, ...} or None."""
    m = _unwrap(model)
    info = m.__dict__.get(WIDTH_ATTR)
    if info is not None:
        return info
    cfg = getattr(m, "config", None)
    raw = getattr(cfg, CONFIG_KEY, None) if cfg is not None else None
    if isinstance(raw, Mapping) and "params" in raw:
        info = {"width": int(raw.get("width", 1)), "fold": raw.get("fold"),
                "params": {n: (int(a), int(b)) for n, (a, b) in raw["params"].items()}}
        object.__setattr__(m, WIDTH_ATTR, info)
        return info
    return None


# --------------------------------------------------------------------------- optimizer state


def upscale_optimizer_state(small_opt: torch.optim.Optimizer, big_opt: torch.optim.Optimizer,
                            small: nn.Module, big: nn.Module) -> None:
    """Copy optimizer state from the base run into the wide model's optimizer (SGD/Adam/AdamW).

    Step counts are copied, first moments (momentum_buffer, exp_avg) ÷ k_out and second moments
    (exp_avg_sq, max_exp_avg_sq) ÷ k_out², so training continues exactly as the base would.
    """
    info = width_info(big)
    if info is None or "maps" not in info:
        raise UpscaleError("upscale_optimizer_state: big model was not produced by dmscale.upscale in this process")
    small, big = _unwrap(small), _unwrap(big)
    big_params = dict(big.named_parameters())
    for n, p in small.named_parameters():
        st = small_opt.state.get(p)
        if not st:
            continue
        q = big_params[n]
        mp = info["maps"][n]
        k_out = info["step"][n][1]
        new: dict[str, Any] = {}
        for key, v in st.items():
            if isinstance(v, Tensor) and v.shape == p.shape and p.dim() > 0:
                e = _expand(v, mp)
                e = e / (k_out ** 2) if key in ("exp_avg_sq", "max_exp_avg_sq") else e / k_out
                new[key] = e.clone()
            elif isinstance(v, Tensor):
                new[key] = v.clone()
            else:
                new[key] = copy.deepcopy(v)
        big_opt.state[q] = new


# --------------------------------------------------------------------------- CLI


def upscale_cli(args_list: Sequence[str] | None = None) -> int:
    """`upscale MODEL --width K --noise S --out DIR`: widen an HF model dir or a dmscale-saved model dir."""
    import argparse
    import os

    from dmscale.serialization.format import load as dms_load
    from dmscale.serialization.format import save as dms_save

    ap = argparse.ArgumentParser(prog="dmscale upscale", description=upscale_cli.__doc__)
    ap.add_argument("model", help="HF model directory (config.json) or a dmscale.save directory (structure.json)")
    ap.add_argument("--width", type=float, default=2, help="integer width factor")
    ap.add_argument("--noise", type=float, default=1e-3, help="perturbation scale sigma-bar")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", required=True, help="output directory")
    ap.add_argument("--trust", action="append", default=[], metavar="PACKAGE",
                    help="also load model classes from this package (dmscale.load(..., trust=[...])); repeatable")
    a = ap.parse_args(args_list)
    if os.path.isdir(a.model) and os.path.exists(os.path.join(a.model, "config.json")):
        import transformers

        cfg = transformers.AutoConfig.from_pretrained(a.model)
        arch = (getattr(cfg, "architectures", None) or ["AutoModel"])[0]
        cls = getattr(transformers, arch, transformers.AutoModel)
        model = cls.from_pretrained(a.model)
        big = upscale(model, a.width, a.noise, seed=a.seed)
        big.save_pretrained(a.out)
    else:
        model = dms_load(a.model, trust=a.trust)  # safetensors + JSON, allowlisted classes: never runs file code
        big = upscale(model, a.width, a.noise, seed=a.seed)
        dms_save(big, a.out)
    n0 = sum(p.numel() for p in model.parameters())
    n1 = sum(p.numel() for p in big.parameters())
    print(f"upscaled x{int(a.width)}: {n0:,} -> {n1:,} parameters, saved to {a.out}")
    return 0
