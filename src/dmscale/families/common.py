"""Shared logic of the families: a transformer described by its layer stacks, attentions and MLPs.

A family that follows one of these patterns is a few lines: name the layer stacks, where each
layer's attention and MLP projections are, which module attributes hold which size *by
meaning*, and which config keys describe them. The engine (:class:`Transformer`) measures every
kept layer from its sliced weights and the trace (heads = output projection's input / head_dim;
head_dim from the part of the query projection the attention op tagged, so a rotary dimension or
any other int that happens to equal the head count is never touched), sets the attributes,
renumbers ``layer_idx``, filters per-layer config lists, and writes the config: global keys
(hidden size, layer counts) always, per-layer keys (heads, FFN width) when every layer agrees.

Meanings: ``heads`` (query heads), ``kv_heads``, ``head_dim``, ``inner`` (heads x head_dim),
``kv_inner`` (kv_heads x head_dim), ``kv_groups`` (heads / kv_heads), ``inter`` (FFN width),
``hidden`` (model width), ``layers`` (number of layers of the stack).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch.nn as nn

from ..errors import ExportError
from .base import ExportContext, Family, iter_module_names, set_attrs
from .generic import filter_layer_lists, in_features, out_features, renumber_layers

__all__ = ["Attn", "Mlp", "Stack", "Transformer", "LLAMA_ATTN", "LLAMA_MLP", "decoder", "llama_like", "bert_like",
           "head_dim_of", "sub"]


@dataclass(frozen=True)
class Attn:
    """One attention of a layer. Paths are relative to the layer module.

    ``module`` holds the size attributes (``attrs``: attribute -> meaning); ``q`` is the query
    projection (or the fused qkv one) whose output carries heads x head_dim; ``o`` the output
    projection (heads = its input width / head_dim); ``k`` the key projection (kv heads = its
    output width / head_dim; None: ``kv_heads`` gives them, else they equal the heads).
    ``config``: config key -> meaning, for keys that describe one layer.
    """

    module: str
    q: str
    o: str
    k: str | None = None
    attrs: Mapping[str, str] = field(default_factory=dict)
    config: Mapping[str, str] = field(default_factory=dict)
    kv_heads: Callable[[nn.Module, dict[str, int]], int] | None = None  # (attention module, sizes) -> kv heads


@dataclass(frozen=True)
class Mlp:
    """The FFN of a layer: ``down`` is the projection whose input width is the FFN width."""

    module: str
    down: str
    attrs: Mapping[str, str] = field(default_factory=lambda: {"intermediate_size": "inter"})
    config: Mapping[str, str] = field(default_factory=lambda: {"intermediate_size": "inter"})


@dataclass(frozen=True)
class Stack:
    """A ModuleList of layers (named ``path`` or ending in ``.path``) and the config key counting them."""

    path: str
    count: str | None = "num_hidden_layers"
    attention: tuple[Attn, ...] = ()
    mlp: tuple[Mlp, ...] = ()
    layer_attrs: Mapping[str, str] = field(default_factory=dict)
    lists: tuple[str, ...] = ("layer_types",)  # config lists with one entry per layer


def sub(module: nn.Module, path: str) -> nn.Module | None:
    """``module``'s submodule at ``path`` ('' is the module itself), or None."""
    if not path:
        return module
    try:
        return module.get_submodule(path)
    except AttributeError:
        return None


def head_dim_of(ctx: ExportContext, param: str, dim: int, old: int) -> int | None:
    """Kept size of the head dim (``old`` elements at full size) inside ``param``'s dim ``dim``: the outermost
    part of that size made only of elements an attention op tagged 'head_dim' (rotary halves included;
    q | k | v parts of a fused projection excluded). None: no such part (the head dim is not searched)."""
    s = ctx.param_space(param, dim)
    if s is None:
        return None

    def walk(node):
        r = node.find()
        if r.size == old and all("head_dim" in leaf.tags and "heads" not in leaf.tags for leaf in r.leaves()):
            return r
        for c in r.children:
            hit = walk(c)
            if hit is not None:
                return hit
        return None

    hit = walk(s)
    return ctx.kept(hit) if hit is not None else None


def _list_key(key: str, j: int) -> tuple[str, int | None]:
    """``'depths[]'`` -> ('depths', j): entry j of a per-stack config list; other keys -> (key, None)."""
    return (key[:-2], j) if key.endswith("[]") else (key, None)


def _write(ctx: ExportContext, key: str, j: int | None, value: Any, per_layer: bool, create: bool = False) -> None:
    """Write config ``key`` (entry ``j`` of it when it is a per-stack list)."""
    if j is None:
        ctx.set_config(key, value, per_layer=per_layer, create=create)
        return
    old = getattr(ctx.config, key, None)
    if isinstance(old, (list, tuple)) and j < len(old):
        new = list(old)
        new[j] = value
        ctx.set_config(key, type(old)(new), per_layer=per_layer)


def _qname(*parts: str) -> str:
    return ".".join(p for p in parts if p)


def _out_dim(m: nn.Module) -> int:
    return 1 if type(m).__name__ == "Conv1D" else 0


class Transformer(Family):
    """A family described by its layer stacks (see the module docstring).

    ``hidden_keys``: config keys holding the model width (written whenever it changed);
    ``create_keys``: per-layer keys written even where the config lacks them (models that read
    ``getattr(config, "head_dim", ...)``); ``model_attrs``: attributes of model-level modules
    (``{"transformer": {"embed_dim": "hidden"}}``). Override :meth:`update_layer`,
    :meth:`attention_extra`, :meth:`extra` or :meth:`~Family.before_drop` for what the pattern does
    not cover.
    """

    stacks: tuple[Stack, ...] = ()
    hidden_keys: tuple[str, ...] = ("hidden_size",)
    create_keys: tuple[str, ...] = ()  # per-layer keys written even when the config lacks them (read by getattr)
    # model-level modules' attributes: {module path (suffix): {attribute: meaning}}; 'heads' when all layers agree
    model_attrs: Mapping[str, Mapping[str, str]] = {}
    searched: str = "hidden, heads, FFN, layers"

    def describe(self) -> str:
        return self.searched

    # -- measuring
    def attention_sizes(self, ctx: ExportContext, layer: nn.Module, name: str, orig: nn.Module,
                        spec: Attn) -> dict[str, int]:
        """heads, kv_heads, head_dim, inner, kv_inner, kv_groups of one exported attention."""
        q, o = sub(layer, spec.q), sub(layer, spec.o)
        oq, oo = sub(orig, spec.q), sub(orig, spec.o)
        if q is None or o is None or oq is None or oo is None:
            raise ExportError(f"{type(self).__name__}: layer '{name}' has no '{spec.q}' / '{spec.o}'")
        hd_old = self._old_head_dim(ctx, orig, spec)
        hd = head_dim_of(ctx, _qname(name, spec.q, "weight"), _out_dim(oq), hd_old) or hd_old
        inner = in_features(o)
        if inner is None or inner % hd:
            raise ExportError(f"{type(self).__name__}: '{_qname(name, spec.o)}' takes {inner} inputs, not a multiple "
                              f"of the head dim {hd}")
        sizes = {"head_dim": hd, "heads": inner // hd, "inner": inner}
        if spec.k is not None:
            kout = out_features(sub(layer, spec.k))
            sizes["kv_heads"] = (kout // hd) if kout is not None else sizes["heads"]
        elif spec.kv_heads is not None:
            sizes["kv_heads"] = int(spec.kv_heads(sub(layer, spec.module), sizes))
        else:
            sizes["kv_heads"] = sizes["heads"]
        sizes["kv_inner"] = sizes["kv_heads"] * hd
        if sizes["kv_heads"] and sizes["heads"] % sizes["kv_heads"]:
            raise ExportError(f"{type(self).__name__}: '{_qname(name, spec.module)}' keeps {sizes['heads']} query "
                              f"heads for {sizes['kv_heads']} key/value heads (not a multiple)")
        sizes["kv_groups"] = sizes["heads"] // max(1, sizes["kv_heads"])
        return sizes

    def _old_head_dim(self, ctx: ExportContext, orig: nn.Module, spec: Attn) -> int:
        om = sub(orig, spec.module)
        for attr, meaning in spec.attrs.items():
            if meaning == "head_dim" and isinstance(getattr(om, attr, None), int):
                return int(getattr(om, attr))
        heads = next((getattr(om, a) for a, m in spec.attrs.items() if m == "heads"
                      and isinstance(getattr(om, a, None), int)), None)
        if heads is None:
            heads = next((getattr(ctx.orig_config, k) for k, m in spec.config.items() if m == "heads"
                          and isinstance(getattr(ctx.orig_config, k, None), int)), None)
        inner = in_features(sub(orig, spec.o))
        if not heads or inner is None:
            raise ExportError(f"{type(self).__name__}: cannot tell the head dim of '{spec.module}'")
        return inner // int(heads)

    def hidden_size(self, ctx: ExportContext) -> int | None:
        """The exported model width: the output width of a kept layer's attention output projection."""
        for st in self.stacks:
            for _, layer in (lay for cname in ctx.find_stacks(st.path) for lay in ctx.layers(cname)):
                for spec in st.attention:
                    w = out_features(sub(layer, spec.o))
                    if w is not None:
                        return w
        return None

    # -- updating
    def update(self, ctx: ExportContext) -> None:
        hidden = self.hidden_size(ctx)
        old_hidden = next((getattr(ctx.orig_config, k) for k in self.hidden_keys
                           if isinstance(getattr(ctx.orig_config, k, None), int)), None)
        if hidden is None:
            hidden = old_hidden
        per_key: dict[tuple[str, int | None], list[Any]] = {}
        counts: dict[tuple[str, int | None], int] = {}
        orig_mods = dict(ctx.model.named_modules())
        for st in self.stacks:
            for j, cname in enumerate(ctx.find_stacks(st.path)):
                layers = ctx.layers(cname)
                for i, layer in layers:
                    name = f"{cname}.{i}"
                    row = self.update_layer(ctx, st, layer, name, orig_mods[name], hidden)
                    for key, v in row.items():
                        per_key.setdefault(_list_key(key, j), []).append(v)
                    if len(self.stacks) > 1 or "[]" in "".join(row):
                        row = {"stack": cname, **{_list_key(k, j)[0]: v for k, v in row.items()}}
                    ctx.layer_sizes.append(row)
                renumber_layers(layers)
                kept = [i for i, _ in layers]
                filter_layer_lists(ctx, kept, len(orig_mods[cname]), st.lists)
                if st.count is not None:
                    ck = _list_key(st.count, j)
                    counts[ck] = counts.get(ck, 0) + len(kept)
        if hidden is not None and hidden != old_hidden:
            for k in self.hidden_keys:
                ctx.set_config(k, hidden)
        for (key, j), n in counts.items():
            _write(ctx, key, j, n, per_layer=False)
        for (key, j), vals in per_key.items():
            if len(set(vals)) == 1:
                _write(ctx, key, j, vals[0], per_layer=True, create=key in self.create_keys)
            elif vals:
                ctx.nonuniform.append(key if j is None else f"{key}[{j}]")
        heads = {v for (key, _), vals in per_key.items() for v in vals
                 if any(a.config.get(key) == "heads" for st in self.stacks for a in st.attention[:1])}
        values = {"hidden": hidden, "heads": heads.pop() if len(heads) == 1 else None}
        for path, attrs in self.model_attrs.items():
            for name in iter_module_names(ctx.exported, (path,)):
                set_attrs(ctx.exported.get_submodule(name), {a: values.get(m) for a, m in attrs.items()})
        self.extra(ctx, hidden)

    def update_layer(self, ctx: ExportContext, st: Stack, layer: nn.Module, name: str, orig: nn.Module,
                     hidden: int | None) -> dict[str, Any]:
        """Set the size attributes of one kept layer; return its per-layer config values (key -> value)."""
        row: dict[str, Any] = {}
        first: dict[str, Any] = {"hidden": hidden}
        for n, spec in enumerate(st.attention):
            if sub(layer, spec.module) is None or sub(layer, spec.o) is None:
                continue
            sizes = self.attention_sizes(ctx, layer, name, orig, spec)
            sizes["hidden"] = hidden
            if n == 0:
                first = sizes
            set_attrs(sub(layer, spec.module), {a: sizes.get(m) for a, m in spec.attrs.items()})
            row.update({key: sizes[m] for key, m in spec.config.items()})
            heads_key = next((k for k, m in spec.config.items() if m == "heads"), None)
            width = out_features(sub(layer, spec.o))  # this layer's model width (a Swin stage's own)
            if heads_key and "head_dim" not in spec.config.values() and width is not None \
                    and sizes["inner"] != width and "head_dim" not in self.create_keys:
                ctx.inexact.append(f"{type(ctx.config).__name__} derives head_dim = hidden / {heads_key}, the "
                                   f"export has {sizes['heads']} heads of {sizes['head_dim']} in a width of {width}")
            self.attention_extra(ctx, layer, sub(layer, spec.module), sizes)
        for spec in st.mlp:
            down = sub(layer, spec.down)
            if sub(layer, spec.module) is None or down is None:
                continue
            vals = {"inter": in_features(down), "hidden": hidden}
            set_attrs(sub(layer, spec.module), {a: vals.get(m) for a, m in spec.attrs.items()})
            row.update({key: vals[m] for key, m in spec.config.items()})
        set_attrs(layer, {a: first.get(m) for a, m in st.layer_attrs.items()})
        return row

    def attention_extra(self, ctx: ExportContext, layer: nn.Module, attn: nn.Module, sizes: dict[str, int]) -> None:
        """Per-attention updates the pattern does not cover (default: none)."""

    def extra(self, ctx: ExportContext, hidden: int | None) -> None:
        """Model-level updates the pattern does not cover (default: none)."""


# --------------------------------------------------------------------------- presets
LLAMA_ATTN = Attn("self_attn", q="self_attn.q_proj", o="self_attn.o_proj", k="self_attn.k_proj",
                  attrs={"head_dim": "head_dim", "num_key_value_groups": "kv_groups", "num_heads": "heads",
                         "num_key_value_heads": "kv_heads", "hidden_size": "hidden"},
                  config={"num_attention_heads": "heads", "num_key_value_heads": "kv_heads", "head_dim": "head_dim"})
LLAMA_MLP = Mlp("mlp", down="mlp.down_proj", attrs={"intermediate_size": "inter", "hidden_size": "hidden"})


def decoder(path: str = "layers", attention: Attn = LLAMA_ATTN, mlp: Mlp = LLAMA_MLP,
            lists: tuple[str, ...] = ("layer_types",)) -> Stack:
    """A Llama-style decoder stack: ``layers.i.self_attn.{q,k,v,o}_proj``, ``layers.i.mlp.*``."""
    return Stack(path, "num_hidden_layers", (attention,), (mlp,), {"hidden_size": "hidden"}, lists)


def llama_like(*model_types: str, searched: str = "hidden, heads (KV groups), FFN, layers", **overrides: Any) -> Transformer:
    """A family for a Llama-like decoder (Llama, Mistral, Qwen2/3, ...)."""
    cls = type(f"LlamaLike_{'_'.join(model_types)}", (Transformer,),
               {"model_types": tuple(model_types), "stacks": (decoder(),), "searched": searched,
                "create_keys": ("head_dim",), **overrides})
    return cls()


BERT_ATTN = Attn("attention.self", q="attention.self.query", o="attention.output.dense",
                 attrs={"num_attention_heads": "heads", "attention_head_size": "head_dim", "all_head_size": "inner"},
                 config={"num_attention_heads": "heads"})
BERT_MLP = Mlp("intermediate", down="output.dense", attrs={}, config={"intermediate_size": "inter"})


def bert_like(*model_types: str, path: str = "encoder.layer", searched: str = "hidden, heads, FFN, layers",
              **overrides: Any) -> Transformer:
    """A family for a BERT-like encoder (BERT, RoBERTa, XLM-R, ELECTRA, ...)."""
    cls = type(f"BertLike_{'_'.join(model_types)}", (Transformer,),
               {"model_types": tuple(model_types), "stacks": (Stack(path, attention=(BERT_ATTN,), mlp=(BERT_MLP,)),),
                "searched": searched, **overrides})
    return cls()
