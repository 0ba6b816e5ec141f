"""Widening plan: for every parameter and buffer, how each dimension is copied when a model is μpscaled.

The plan is pure: it reads the model (and runs it once on ``example_inputs`` to learn the execution
order) but changes nothing.  :func:`dmscale.mup.upscale.upscale` applies it; :func:`dmscale.mup.base.set_base`
uses the same plan at factor 1 to learn which dimension of each parameter is its fan-in / fan-out.

Every widened dimension has a *role*: ``"hidden"`` (the model width: residual stream, channels),
``"ffn"`` (the inner dimension of a transformer MLP block), ``"heads"`` (the attention width), or the
name of a module whose output dimension gets its own factor (per-layer factors).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["UpscaleError", "ROLES", "ATTENTION_MODES", "Plan", "plan", "parse_width", "unwrap", "run_model",
           "is_norm", "is_weight_layer", "is_hf_conv1d", "expand", "final_norm", "tied_heads"]

ROLES = ("hidden", "ffn", "heads")
ATTENTION_MODES = ("duplicate_heads", "grow_head_dim")

# Direct nn.Parameters (not owned by a leaf layer) whose last dim is the hidden width.
_EMBEDDING_LIKE_PARAMS = {
    "cls_token", "class_token", "position_embeddings", "pos_embed", "pos_embedding",
    "mask_token", "dist_token", "register_tokens",
}
# Integer attributes of non-torch modules (HF attention / MLP blocks) and the role that scales them;
# "heads*" scale with the heads factor under duplicate_heads, "head_dim*" under grow_head_dim.
_MODULE_ATTR_ROLES = {
    "embed_dim": "hidden", "hidden_size": "hidden", "n_embd": "hidden",
    "intermediate_size": "ffn",
    "num_heads": "heads*", "num_attention_heads": "heads*", "num_key_value_heads": "heads*",
    "all_head_size": "heads", "split_size": "heads",
    "head_dim": "head_dim*", "attention_head_size": "head_dim*",
}
# HF config fields and their roles ("heads*": head counts; "head_dim*": head dims).
_CONFIG_ROLES = {
    "hidden_size": "hidden", "n_embd": "hidden", "d_model": "hidden", "embedding_size": "hidden",
    "hidden_sizes": "hidden", "pooler_output_size": "hidden",
    "intermediate_size": "ffn", "n_inner": "ffn", "ffn_dim": "ffn",
    "num_attention_heads": "heads*", "n_head": "heads*", "num_key_value_heads": "heads*",
    "head_dim": "head_dim*",
}
FINAL_NORM_NAMES = ("ln_f", "norm", "final_layernorm", "final_layer_norm", "layernorm")
# (up-projection child names, down-projection child name) of transformer MLP blocks: their inner dim is "ffn"
_FFN_PATTERNS = (
    (("c_fc",), "c_proj"),  # GPT-2
    (("gate_proj", "up_proj"), "down_proj"),  # Llama, Mistral, Qwen
    (("up_proj",), "down_proj"),
    (("fc1",), "fc2"),  # ViT/timm, OPT, CLIP
    (("linear1",), "linear2"),  # nn.TransformerEncoderLayer
    (("w1", "w3"), "w2"),
    (("intermediate.dense",), "output.dense"),  # HF BERT / ViT layers
)


class UpscaleError(ValueError):
    """Raised when a model (or one of its modules) cannot be widened exactly."""


@dataclass
class Plan:
    """How one parameter/buffer is widened: index maps per dim, rescale, noise fan-in, μP factors."""

    maps: list[tuple[int, Tensor]]
    scale: float = 1.0
    k_in: int = 1
    k_out: int = 1
    noise_fan_in: int | None = None  # fan-in of the wide tensor; None: no noise (biases, norms, readout)
    in_dim: int | None = None  # tensor dim that is the widened fan-in (None: fixed or not a matrix)
    out_dim: int | None = None  # tensor dim that is the widened fan-out
    in_role: str | None = None
    out_role: str | None = None


@dataclass
class _Ctx:
    """State shared by the module rules while planning one upscale."""

    factors: dict[str, int]
    attention: str
    fixed_in: set[str]
    fixed_out: set[str]
    in_role: dict[str, str] = field(default_factory=dict)
    out_role: dict[str, str] = field(default_factory=dict)
    norm_role: dict[str, str] = field(default_factory=dict)
    in_override: dict[str, Tensor] = field(default_factory=dict)
    out_override: dict[str, Tensor] = field(default_factory=dict)
    plans: dict[int, tuple[Tensor, Plan]] = field(default_factory=dict)  # id(tensor) -> (tensor, plan)
    attr_updates: list[tuple[Any, str, Any]] = field(default_factory=list)
    attention_modules: list[str] = field(default_factory=list)

    def f(self, role: str) -> int:
        """Integer factor of a role (ffn / heads / module roles default to the hidden factor)."""
        if role in self.factors:
            return self.factors[role]
        return self.factors["hidden"]


def parse_width(width: Any) -> dict[str, int]:
    """Validate ``width`` (an integer factor, or {role or module name: integer factor}) into a dict."""
    def check(key: str, v: Any) -> int:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v != int(v) or v < 1 or not math.isfinite(v):
            where = "width" if key == "hidden" and not isinstance(width, Mapping) else f"width[{key!r}]"
            raise ValueError(f"upscale: {where} must be a positive integer factor, got {v!r} "
                             "(only integer multiples are exact)")
        return int(v)

    if isinstance(width, Mapping):
        if not width:
            raise ValueError("upscale: width={} names no dimension; use e.g. {'hidden': 2, 'ffn': 4}")
        out = {}
        for key, v in width.items():
            if not isinstance(key, str) or not key:
                raise ValueError(f"upscale: width keys must be role or module names, got {key!r}")
            out[key] = check(key, v)
        out.setdefault("hidden", 1)
        return out
    return {"hidden": check("hidden", width)}


def unit_map(n: int, k: int) -> Tensor:
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


def unwrap(model: nn.Module) -> nn.Module:
    """Strip torch.compile / DDP wrappers so parameter names match the plain module (FSDP2 needs none)."""
    while True:
        if hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        elif type(model).__name__ in ("DistributedDataParallel", "DataParallel") and hasattr(model, "module"):
            model = model.module
        else:
            return model


def is_hf_conv1d(m: nn.Module) -> bool:
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


def is_weight_layer(m: nn.Module) -> bool:
    """Layers that map an input feature dim to an output feature dim (decide model in/out)."""
    return isinstance(m, (nn.Linear, nn.Embedding, nn.MultiheadAttention) + _CONV) or is_hf_conv1d(m)


def is_norm(m: nn.Module) -> bool:
    """Normalisation layers handled by repeat-without-rescale."""
    return isinstance(m, _BN + _INST + (nn.LayerNorm, nn.GroupNorm)) or _is_rmsnorm(m)


def _is_depthwise(m: nn.Module) -> bool:
    return isinstance(m, _CONV) and m.groups > 1 and m.groups == m.in_channels


def _in_out_sizes(m: nn.Module) -> tuple[int, int]:
    """(input features, output features) of a weight layer."""
    if isinstance(m, nn.Linear):
        return m.in_features, m.out_features
    if isinstance(m, _CONV):
        return m.in_channels, m.out_channels
    if is_hf_conv1d(m):
        return m.nx, m.nf
    if isinstance(m, nn.Embedding):
        return m.num_embeddings, m.embedding_dim
    if isinstance(m, nn.MultiheadAttention):
        return m.embed_dim, m.embed_dim
    raise UpscaleError(f"not a weight layer: {type(m).__name__}")


def run_model(model: nn.Module, inputs: Any) -> Any:
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


def expand(t: Tensor, maps: list[tuple[int, Tensor]]) -> Tensor:
    """Copy a tensor along its widened dims with index maps (no rescale)."""
    for dim, idx in maps:
        t = t.index_select(dim, idx.to(t.device))
    return t


def tied_heads(model: nn.Module) -> list[tuple[str, nn.Module, str]]:
    """(head name, head module, embedding name) for Linear heads sharing an Embedding's weight."""
    emb = {id(m.weight): n for n, m in model.named_modules() if isinstance(m, nn.Embedding)}
    return [(n, m, emb[id(m.weight)]) for n, m in model.named_modules()
            if isinstance(m, nn.Linear) and id(m.weight) in emb]


def final_norm(model: nn.Module) -> tuple[str, nn.Module] | None:
    """The final norm of an HF decoder (applied right before the LM head), if recognisable."""
    base = getattr(model, "base_model", None)
    if base is None or base is model:
        return None
    prefix = next((n for n, m in model.named_modules() if m is base), None)
    for nm in FINAL_NORM_NAMES:
        mod = getattr(base, nm, None)
        if isinstance(mod, nn.Module) and is_norm(mod):
            return (f"{prefix}.{nm}" if prefix else nm), mod
    return None


# --------------------------------------------------------------------------- rules


def _maps_for(ctx: _Ctx, name: str, m: nn.Module) -> tuple[Tensor | None, Tensor | None]:
    """Input / output index maps of a weight layer (None = dimension kept fixed)."""
    n_in, n_out = _in_out_sizes(m)
    in_map = None if name in ctx.fixed_in else ctx.in_override.get(name)
    if in_map is None and name not in ctx.fixed_in:
        in_map = unit_map(n_in, ctx.f(ctx.in_role.get(name, "hidden")))
    out_map = None if name in ctx.fixed_out else ctx.out_override.get(name)
    if out_map is None and name not in ctx.fixed_out:
        out_map = unit_map(n_out, ctx.f(ctx.out_role.get(name, "hidden")))
    if isinstance(m, nn.Embedding):
        in_map = None  # token / position index space is data, never widened
    return in_map, out_map


def _add(ctx: _Ctx, t: Tensor | None, plan: Plan) -> None:
    """Register a plan for a tensor (tied tensors are planned once, consistently)."""
    if t is None or id(t) in ctx.plans:
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
    roles = dict(in_role=ctx.in_role.get(name, "hidden") if in_map is not None else None,
                 out_role=ctx.out_role.get(name, "hidden") if out_map is not None else None)
    _add(ctx, w, Plan(maps, 1.0 / k_in, k_in, k_out, None if readout else fan_in,
                      in_dim if in_map is not None else None, out_dim if out_map is not None else None, **roles))
    bias = getattr(m, "bias", None)
    if isinstance(bias, Tensor):
        _add(ctx, bias, Plan([(0, out_map)] if out_map is not None else [], 1.0, 1, k_out,
                             out_dim=0 if out_map is not None else None, out_role=roles["out_role"]))
    return k_in, k_out


def _plan_conv(ctx: _Ctx, name: str, m: nn.Module) -> None:
    """Conv1d/2d/3d: dense and grouped convs widen channels inside each group, depthwise stays depthwise."""
    if name in ctx.in_override or name in ctx.out_override:
        raise UpscaleError(f"{name}: head-structured maps are not supported for convolutions")
    if getattr(m, "padding_mode", "zeros") not in ("zeros", "reflect", "replicate", "circular"):
        raise UpscaleError(f"{name}: unsupported padding_mode {m.padding_mode!r}")
    in_map, out_map = _maps_for(ctx, name, m)
    g = m.groups
    maps: list[tuple[int, Tensor]] = []
    k_in = 1
    k_out = 1 if out_map is None else len(out_map) // m.out_channels
    kin_ch = 1 if in_map is None else len(in_map) // m.in_channels
    if out_map is not None:
        maps.append((0, out_map))
    new_groups = g
    in_dim = None
    if in_map is not None:
        if _is_depthwise(m):  # depthwise: stay depthwise, fan-in unchanged
            if out_map is None:
                raise UpscaleError(f"{name}: depthwise conv with a fixed output cannot be widened")
            if k_out != kin_ch:
                raise UpscaleError(f"{name}: depthwise conv needs equal input and output factors, "
                                   f"got {kin_ch} and {k_out}")
            new_groups = g * kin_ch
        else:  # dense or grouped: widen channels inside each group, rescale fan-in
            maps.append((1, unit_map(m.in_channels // g, kin_ch)))
            k_in = kin_ch
            in_dim = 1
    fan_in = (m.in_channels // g) * k_in * int(math.prod(m.kernel_size))
    readout = out_map is None and in_map is not None
    out_role = ctx.out_role.get(name, "hidden") if out_map is not None else None
    in_role = ctx.in_role.get(name, "hidden") if in_dim is not None else None
    _add(ctx, m.weight, Plan(maps, 1.0 / k_in, k_in, k_out, None if readout else fan_in,
                             in_dim, 0 if out_map is not None else None, in_role, out_role))
    if m.bias is not None:
        _add(ctx, m.bias, Plan([(0, out_map)] if out_map is not None else [], 1.0, 1, k_out,
                               out_dim=0 if out_map is not None else None, out_role=out_role))
    ctx.attr_updates += [(m, "in_channels", m.in_channels * kin_ch), (m, "out_channels", m.out_channels * k_out),
                         (m, "groups", new_groups)]


def _plan_leaf(ctx: _Ctx, name: str, m: nn.Module) -> None:
    """Plan the parameters, buffers and size attributes of one supported layer."""
    if isinstance(m, nn.Linear):
        k_in, k_out = _plan_matrix(ctx, name, m, m.weight, 0, 1)
        ctx.attr_updates += [(m, "in_features", m.in_features * k_in), (m, "out_features", m.out_features * k_out)]
    elif is_hf_conv1d(m):
        k_in, k_out = _plan_matrix(ctx, name, m, m.weight, 1, 0)
        ctx.attr_updates += [(m, "nx", m.nx * k_in), (m, "nf", m.nf * k_out)]
    elif isinstance(m, _CONV):
        _plan_conv(ctx, name, m)
    elif isinstance(m, nn.Embedding):
        if m.max_norm is not None:
            raise UpscaleError(f"{name}: Embedding(max_norm=...) is not width-invariant")
        _, out_map = _maps_for(ctx, name, m)
        if out_map is None:
            return
        k = len(out_map) // m.embedding_dim
        _add(ctx, m.weight, Plan([(1, out_map)], 1.0, 1, k, 1, None, 1, None, ctx.out_role.get(name, "hidden")))
        ctx.attr_updates.append((m, "embedding_dim", m.embedding_dim * k))
    elif isinstance(m, nn.MultiheadAttention):
        _plan_mha(ctx, name, m)
    elif is_norm(m):
        n = _norm_size(name, m)
        role = ctx.norm_role.get(name, "hidden")
        k = ctx.f(role)
        mp = unit_map(n, k)
        for attr in ("weight", "bias", "running_mean", "running_var"):
            t = getattr(m, attr, None)
            if isinstance(t, Tensor):
                _add(ctx, t, Plan([(0, mp)], 1.0, 1, k, out_dim=0, out_role=role))
        if isinstance(m, _BN + _INST):
            ctx.attr_updates.append((m, "num_features", n * k))
        elif isinstance(m, nn.GroupNorm):
            ctx.attr_updates.append((m, "num_channels", n * k))
        elif hasattr(m, "normalized_shape"):
            ctx.attr_updates.append((m, "normalized_shape", (n * k,)))
    else:
        raise UpscaleError(f"{name}: no upscaling rule for {type(m).__name__}")


def _plan_mha(ctx: _Ctx, name: str, m: nn.MultiheadAttention) -> None:
    """torch MultiheadAttention: fused in_proj (q|k|v), heads duplicated; out_proj is a Linear."""
    if not m._qkv_same_embed_dim or m.bias_k is not None or m.kdim != m.embed_dim:
        raise UpscaleError(f"{name}: MultiheadAttention with kdim/vdim or add_bias_kv is not supported")
    E, H, dh = m.embed_dim, m.num_heads, m.head_dim
    kh, khid = ctx.f("heads"), ctx.f("hidden")
    if kh != khid:
        raise UpscaleError(f"{name}: nn.MultiheadAttention ties its attention width to the model width; "
                           f"width['heads']={kh} must equal the hidden factor {khid}")
    hm = _head_map(H, dh, kh)
    qkv = torch.cat([hm + j * E for j in range(3)])
    in_map = None if name in ctx.fixed_in else unit_map(E, khid)
    maps = [(0, qkv)] + ([(1, in_map)] if in_map is not None else [])
    k_in = 1 if in_map is None else khid
    _add(ctx, m.in_proj_weight, Plan(maps, 1.0 / k_in, k_in, kh, E * k_in, 1 if in_map is not None else None, 0,
                                     "hidden" if in_map is not None else None, "heads"))
    if m.in_proj_bias is not None:
        _add(ctx, m.in_proj_bias, Plan([(0, qkv)], 1.0, 1, kh, out_dim=0, out_role="heads"))
    ctx.in_override[name + ".out_proj"] = hm
    ctx.in_role[name + ".out_proj"] = "heads"
    ctx.attention_modules.append(name)
    ctx.attr_updates += [(m, "embed_dim", E * kh), (m, "kdim", E * kh), (m, "vdim", E * kh), (m, "num_heads", H * kh)]


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


def _has_rope(model: nn.Module) -> bool:
    """True if the model applies rotary position embeddings (an HF rotary_emb module or config rope)."""
    if any("rotary" in type(m).__name__.lower() or n.endswith("rotary_emb") for n, m in model.named_modules()):
        return True
    cfg = getattr(model, "config", None)
    return cfg is not None and getattr(cfg, "position_embedding_type", None) == "rotary"


def _attn_maps(ctx: _Ctx, n_heads: int, dh: int) -> Tensor:
    """Output map of one of q/k/v (n_heads x dh units) under the chosen attention mode."""
    k = ctx.f("heads")
    if ctx.attention == "duplicate_heads":
        return _head_map(n_heads, dh, k)
    return unit_map(n_heads * dh, k)  # grow_head_dim: each head's units copied inside the head


def _plan_attention(ctx: _Ctx, name: str, m: nn.Module, rope: bool) -> bool:
    """Set head maps for q/k/v/o of a known attention block; True if handled."""
    children = dict(m.named_children())
    grow = ctx.attention == "grow_head_dim"
    if all(c in children for c in ("q_proj", "k_proj", "v_proj", "o_proj")):
        dh = getattr(m, "head_dim", None) or getattr(m, "attention_head_size", None)
        if not isinstance(dh, int):
            raise UpscaleError(f"{name}: attention block without an integer head_dim attribute")
        q, kk = children["q_proj"], children["k_proj"]
        nq, nkv = _in_out_sizes(q)[1] // dh, _in_out_sizes(kk)[1] // dh
        if nq % nkv:
            raise UpscaleError(f"{name}: {nq} query heads not a multiple of {nkv} KV heads")
        if grow:
            if rope:
                raise UpscaleError(f"{name}: attention='grow_head_dim' is not function-preserving with rotary "
                                   "position embeddings (RoPE frequencies depend on head_dim); use "
                                   "attention='duplicate_heads'")
            qmap, kvmap = _attn_maps(ctx, nq, dh), _attn_maps(ctx, nkv, dh)
        else:
            qmap = _gqa_query_map(nq, nkv, dh, ctx.f("heads"))
            kvmap = _head_map(nkv, dh, ctx.f("heads"))  # KV heads copied with their query group
        for c, mp in (("q_proj", qmap), ("k_proj", kvmap), ("v_proj", kvmap)):
            ctx.out_override[f"{name}.{c}"] = mp
            ctx.out_role[f"{name}.{c}"] = "heads"
        ctx.in_override[f"{name}.o_proj"] = qmap
        ctx.in_role[f"{name}.o_proj"] = "heads"
        ctx.attention_modules.append(name)
        return True
    if "c_attn" in children and "c_proj" in children and hasattr(m, "split_size"):  # GPT-2
        if getattr(m, "is_cross_attention", False) or "q_attn" in children:
            raise UpscaleError(f"{name}: GPT-2 cross-attention is not supported")
        if ctx.f("heads") != ctx.f("hidden"):
            raise UpscaleError(f"{name}: GPT-2 ties its attention width to n_embd; width['heads']="
                               f"{ctx.f('heads')} must equal the hidden factor {ctx.f('hidden')}")
        E, dh = m.embed_dim, m.head_dim
        hm = _attn_maps(ctx, E // dh, dh)
        ctx.out_override[f"{name}.c_attn"] = torch.cat([hm + j * E for j in range(3)])
        ctx.out_role[f"{name}.c_attn"] = "heads"
        ctx.in_override[f"{name}.c_proj"] = hm
        ctx.in_role[f"{name}.c_proj"] = "heads"
        ctx.attention_modules.append(name)
        return True
    return False


def _module_order(model: nn.Module, example_inputs: Any) -> list[str] | None:
    """Execution order of weight/norm modules on example inputs (None if no inputs)."""
    if example_inputs is None:
        return None
    order: list[str] = []
    hooks = [mod.register_forward_pre_hook(lambda _m, _a, n=n: order.append(n))
             for n, mod in model.named_modules() if is_weight_layer(mod) or is_norm(mod)]
    try:
        run_model(model, example_inputs)
    finally:
        for h in hooks:
            h.remove()
    return list(dict.fromkeys(order))


def _assign_roles(ctx: _Ctx, named: dict[str, nn.Module], order: list[str]) -> None:
    """FFN roles from known block patterns; per-module roles from width keys; norm roles from order."""
    for n, mod in named.items():
        for ups, down in _FFN_PATTERNS:
            prefix = f"{n}." if n else ""
            if all(prefix + u in named for u in ups) and prefix + down in named:
                if not all(is_weight_layer(named[prefix + u]) for u in ups) or not is_weight_layer(named[prefix + down]):
                    continue
                for u in ups:
                    ctx.out_role.setdefault(prefix + u, "ffn")
                ctx.in_role.setdefault(prefix + down, "ffn")
                break
    pos = {n: i for i, n in enumerate(order)}
    for key in ctx.factors:
        if key in ROLES:
            continue
        if key not in named:
            close = [n for n in named if n and (key in n or n in key)][:5]
            raise ValueError(f"upscale: width key {key!r} is neither a role {ROLES} nor a module name"
                             + (f"; did you mean one of {close}?" if close else ""))
        mod = named[key]
        if not is_weight_layer(mod) or key in ctx.fixed_out or isinstance(mod, nn.MultiheadAttention):
            raise ValueError(f"upscale: width key {key!r}: only Linear/Conv/Conv1D layers with a hidden output "
                             "can take their own factor")
        if key in ctx.out_role:
            raise ValueError(f"upscale: width key {key!r}: its output dim already has role "
                             f"{ctx.out_role[key]!r}; set that role's factor instead")
        if key not in pos:
            raise UpscaleError(f"upscale: width key {key!r}: module is not run by the model")
        ctx.out_role[key] = key
        # the consumer of this output: the next weight layer in execution order (norms in between follow)
        for n in order[pos[key] + 1:]:
            m = named[n]
            if is_norm(m):
                ctx.norm_role[n] = key
                continue
            if not is_weight_layer(m):
                continue
            if n in ctx.in_role and ctx.in_role[n] != key:
                raise UpscaleError(f"upscale: width key {key!r}: its consumer {n!r} already reads role "
                                   f"{ctx.in_role[n]!r}")
            ctx.in_role[n] = key
            if _is_depthwise(m):  # passes the dimension through
                ctx.out_role[n] = key
                continue
            break
    last_out: str | None = None
    for n in order:
        m = named[n]
        if is_weight_layer(m):
            if _is_depthwise(m) and n not in ctx.out_role:
                ctx.out_role[n] = ctx.in_role.get(n, "hidden")
            last_out = None if n in ctx.fixed_out else ctx.out_role.get(n, "hidden")
        elif is_norm(m) and n not in ctx.norm_role:
            role = last_out or "hidden"
            ctx.norm_role[n] = "hidden" if role in ("heads", "ffn") else role


def plan(model: nn.Module, factors: dict[str, int], keep_in: Sequence[str] = (), keep_out: Sequence[str] = (),
         example_inputs: Any = None, attention: str = "duplicate_heads") -> _Ctx:
    """Build the widening plan for every parameter and buffer of the model (nothing is changed)."""
    if attention not in ATTENTION_MODES:
        raise ValueError(f"upscale: attention must be one of {ATTENTION_MODES}, got {attention!r}")
    named = dict(model.named_modules())
    order = _module_order(model, example_inputs)
    if order is None:
        order = [n for n, mod in named.items() if is_weight_layer(mod) or is_norm(mod)]
    weight_layers = [n for n in order if is_weight_layer(named[n])]
    if not weight_layers:
        raise UpscaleError(f"{type(model).__name__}: no Linear/Conv/Embedding layer to widen")
    fixed_in = {weight_layers[0], *keep_in}
    fixed_out = {weight_layers[-1], *keep_out}
    get_out = getattr(model, "get_output_embeddings", None)
    head = get_out() if callable(get_out) else None
    if isinstance(head, nn.Module):
        head_name = next((n for n, mod in named.items() if mod is head), None)
        if head_name:
            fixed_out.add(head_name)
    for n in list(fixed_in) + list(fixed_out):
        if n not in named:
            raise UpscaleError(f"keep_in/keep_out names unknown module {n!r}")
    ctx = _Ctx(dict(factors), attention, fixed_in, fixed_out)
    rope = _has_rope(model)
    for n, mod in named.items():
        _plan_attention(ctx, n, mod, rope)
    mha = [n for n, m in named.items() if isinstance(m, nn.MultiheadAttention)]
    if attention == "grow_head_dim" and mha:
        raise UpscaleError(f"{mha[0]}: nn.MultiheadAttention always scales logits by 1/sqrt(head_dim), so "
                           "attention='grow_head_dim' cannot be exact; use attention='duplicate_heads'")
    if attention == "grow_head_dim" and not ctx.attention_modules:
        raise UpscaleError(f"{type(model).__name__}: attention='grow_head_dim' but no supported attention block "
                           "(HF q/k/v/o_proj or GPT-2 c_attn/c_proj) was found")
    _assign_roles(ctx, named, order)
    first = order.index(weight_layers[0])
    last = order.index(weight_layers[-1])
    outer_norms = {n for i, n in enumerate(order) if is_norm(named[n]) and (i < first or i > last)}
    for n, mod in named.items():
        if is_weight_layer(mod) or is_norm(mod):
            if n in outer_norms:  # a norm on raw inputs or on the outputs: not hidden
                for t in list(mod.parameters(recurse=False)) + list(mod.buffers(recurse=False)):
                    _add(ctx, t, Plan([]))
            else:
                _plan_leaf(ctx, n, mod)
    khid = ctx.f("hidden")
    for n, mod in named.items():  # direct parameters of container modules (ViT cls token, position embeddings)
        if is_weight_layer(mod) or is_norm(mod):
            continue
        for pn, p in mod.named_parameters(recurse=False):
            full = f"{n}.{pn}" if n else pn
            if p is None or id(p) in ctx.plans:
                continue
            if pn in _EMBEDDING_LIKE_PARAMS:
                _add(ctx, p, Plan([(p.dim() - 1, unit_map(p.shape[-1], khid))], 1.0, 1, khid,
                                  out_dim=p.dim() - 1, out_role="hidden"))
            else:
                raise UpscaleError(
                    f"{full}: parameter of {type(mod).__name__} has no upscaling rule "
                    "(supported: Linear, Conv1d/2d/3d, HF Conv1D, Embedding, MultiheadAttention, norms)")
    for n, p in model.named_parameters():
        if id(p) not in ctx.plans:
            raise UpscaleError(f"{n}: parameter not covered by any upscaling rule")
    _plan_module_attrs(ctx, named)
    return ctx


def _attr_factor(ctx: _Ctx, role: str) -> int:
    """Factor of a size attribute: head counts grow only when heads are duplicated, head dims otherwise."""
    if role == "heads*":
        return ctx.f("heads") if ctx.attention == "duplicate_heads" else 1
    if role == "head_dim*":
        return ctx.f("heads") if ctx.attention == "grow_head_dim" else 1
    return ctx.f(role)


def _plan_module_attrs(ctx: _Ctx, named: dict[str, nn.Module]) -> None:
    """Scale hidden-size / head-count attributes of non-torch modules (HF attention and MLP blocks)."""
    attn = set(ctx.attention_modules)
    for n, mod in named.items():
        if type(mod).__module__.startswith("torch.nn"):
            continue
        for attr, role in _MODULE_ATTR_ROLES.items():
            v = mod.__dict__.get(attr)
            if isinstance(v, int) and not isinstance(v, bool):
                if attr == "embed_dim" and n in attn:
                    role = "heads"  # GPT-2 attention: embed_dim is the attention width
                f = _attr_factor(ctx, role)
                if f != 1:
                    ctx.attr_updates.append((mod, attr, v * f))
        if n in attn and ctx.attention == "grow_head_dim":
            s = mod.__dict__.get("scaling")
            if not isinstance(s, (int, float)) or isinstance(s, bool):
                raise UpscaleError(f"{n}: attention='grow_head_dim' needs the attention scale as a `scaling` "
                                   f"attribute on {type(mod).__name__} (to keep q.k/d exact); use "
                                   "attention='duplicate_heads'")
            ctx.attr_updates.append((mod, "scaling", float(s) / ctx.f("heads")))


def update_config(model: nn.Module, ctx: _Ctx) -> None:
    """Scale hidden sizes / head counts / head dims in an HF config so from_pretrained rebuilds the wide model."""
    cfg = getattr(model, "config", None)
    if cfg is None or not hasattr(cfg, "to_dict"):
        return
    d = cfg.to_dict()
    if "head_dim" in d and d["head_dim"] is None and "hidden_size" in d and "num_attention_heads" in d:
        cfg.head_dim = d["hidden_size"] // d["num_attention_heads"]
    amap = getattr(cfg, "attribute_map", {}) or {}
    if "n_inner" in d and d["n_inner"] is None and "n_embd" in d and ctx.f("ffn") != ctx.f("hidden"):
        cfg.n_inner = 4 * d["n_embd"]  # GPT-2's implicit 4 x n_embd, made explicit before scaling
    done = set()
    for attr, role in _CONFIG_ROLES.items():
        canon = amap.get(attr, attr)
        if canon in done or canon not in d:
            continue
        done.add(canon)
        f = _attr_factor(ctx, role)
        v = getattr(cfg, canon)
        if f == 1:
            continue
        if isinstance(v, int) and not isinstance(v, bool):
            setattr(cfg, canon, v * f)
        elif isinstance(v, (list, tuple)) and all(isinstance(x, int) for x in v):
            setattr(cfg, canon, type(v)(x * f for x in v))
