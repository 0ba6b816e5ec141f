"""The fallback for Hugging Face models without a family file, and layer helpers shared with the families.

The fallback finds the decoder layers by their ``layer_idx`` attributes, renumbers them after
layers were removed, filters per-layer config lists, and writes the config sizes it can read off
the weights (hidden size; heads, KV heads and FFN width when every layer agrees). Module size
attributes are updated by :func:`dmscale.export` by value (the ints a module used in a
``view`` / ``reshape`` of a pruned dim); the export check catches a wrong guess, and the config
check (:mod:`dmscale.families.base`) marks a config that does not describe the export.
"""

from __future__ import annotations


import torch.nn as nn

from .base import ExportContext, hf_config, set_attrs

__all__ = ["is_hf_causal_lm", "decoder_layers", "layer_sizes", "uniform_sizes", "LAYER_SIZE_KEYS", "update_generic",
           "update_export",
           "out_features", "in_features", "renumber_layers", "filter_layer_lists"]

LAYER_SIZE_KEYS = ("num_attention_heads", "num_key_value_heads", "intermediate_size")


def is_hf_causal_lm(model: nn.Module) -> bool:
    """True for a Hugging Face ``PreTrainedModel`` with a decoder config."""
    cfg = hf_config(model)
    return cfg is not None and hasattr(cfg, "num_hidden_layers")


def _has_layer_idx(m: nn.Module) -> bool:
    return any(isinstance(getattr(s, "layer_idx", None), int) for s in m.modules())


def decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList] | None:
    """(name, ModuleList) of the decoder layers: the first ModuleList whose items carry ``layer_idx``."""
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) > 0 and all(_has_layer_idx(c) for c in mod):
            return name, mod
    return None


def _attention(layer: nn.Module) -> nn.Module | None:
    for m in layer.modules():
        if isinstance(getattr(m, "layer_idx", None), int) and isinstance(getattr(m, "head_dim", None), int):
            return m
    return None


def out_features(m: nn.Module | None) -> int | None:
    """Output width of a Linear / HF ``Conv1D`` (weight stored (in, out)) / Conv, from its weight."""
    w = getattr(m, "weight", None) if m is not None else None
    if not hasattr(w, "shape") or w.dim() < 2:
        return None
    return int(w.shape[1]) if type(m).__name__ == "Conv1D" else int(w.shape[0])


def in_features(m: nn.Module | None) -> int | None:
    """Input width of a Linear / HF ``Conv1D`` / Conv (times its groups), from its weight."""
    w = getattr(m, "weight", None) if m is not None else None
    if not hasattr(w, "shape") or w.dim() < 2:
        return None
    if type(m).__name__ == "Conv1D":
        return int(w.shape[0])
    return int(w.shape[1]) * int(getattr(m, "groups", 1) or 1)


def layer_sizes(layer: nn.Module) -> dict[str, int | None]:
    """Heads, KV heads and MLP width of one decoder layer, read from its weights."""
    attn = _attention(layer)
    out: dict[str, int | None] = {k: None for k in LAYER_SIZE_KEYS}
    if attn is not None:
        hd = int(attn.head_dim)
        q = out_features(getattr(attn, "q_proj", None))
        k = out_features(getattr(attn, "k_proj", None))
        if q is not None:
            out["num_attention_heads"] = q // hd
            out["num_key_value_heads"] = (k // hd) if k is not None else q // hd
        elif getattr(attn, "c_attn", None) is not None:  # GPT-2 fused qkv
            n = out_features(attn.c_attn)
            if n is not None:
                out["num_attention_heads"] = out["num_key_value_heads"] = n // 3 // hd
    mlp = getattr(layer, "mlp", None)
    if mlp is not None:
        for nm in ("gate_proj", "up_proj", "c_fc", "fc1", "dense_h_to_4h"):
            f = out_features(getattr(mlp, nm, None))
            if f is not None:
                out["intermediate_size"] = f
                break
    return out


def uniform_sizes(model: nn.Module) -> dict[str, int] | None:
    """The per-layer sizes when all decoder layers agree (None when they differ or cannot be read)."""
    found = decoder_layers(model)
    if found is None:
        return None
    sizes = [layer_sizes(layer) for layer in found[1]]
    out: dict[str, int] = {}
    for k in LAYER_SIZE_KEYS:
        vals = {s[k] for s in sizes}
        if len(vals) != 1 or None in vals:
            return None
        out[k] = int(next(iter(vals)))
    return out


def renumber_layers(layers: list[tuple[int, nn.Module]]) -> None:
    """KV-cache slots follow the new positions: every ``layer_idx`` inside layer i becomes i."""
    for new_i, (_, layer) in enumerate(layers):
        for m in layer.modules():
            if isinstance(getattr(m, "layer_idx", None), int):
                m.layer_idx = new_i


def filter_layer_lists(ctx: ExportContext, kept: list[int], n_old: int, keys: tuple[str, ...] = ("layer_types",)) -> None:
    """Per-layer config lists (``layer_types``) keep the entries of kept layers; ``max_window_layers`` counts them."""
    cfg, orig = ctx.config, ctx.orig_config
    for key in keys:
        old = getattr(orig, key, None)
        if isinstance(old, (list, tuple)) and len(old) == n_old:
            setattr(cfg, key, type(old)(old[i] for i in kept))
    mwl = getattr(orig, "max_window_layers", None)
    if isinstance(mwl, int) and hasattr(cfg, "max_window_layers"):
        cfg.max_window_layers = sum(1 for i in kept if i < mwl)


def _hidden_size(model: nn.Module) -> int | None:
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    w = getattr(emb, "weight", None)
    return int(w.shape[1]) if w is not None else None


def _set_int_attr(m: nn.Module, attr: str, old: int | None, new: int | None) -> None:
    if new is not None and isinstance(getattr(m, attr, None), int) and (old is None or getattr(m, attr) == old):
        setattr(m, attr, int(new))


def update_generic(ctx: ExportContext) -> None:
    """The fallback for an HF model without a family: decoder-layer bookkeeping and the sizes it can read."""
    exported, cfg = ctx.exported, ctx.config
    found = decoder_layers(ctx.model)
    if found is None or not hasattr(cfg, "num_hidden_layers"):
        return
    cname = found[0]
    layers = ctx.layers(cname)
    n_old = len(found[1])
    kept = [i for i, _ in layers]
    renumber_layers(layers)
    filter_layer_lists(ctx, kept, n_old)
    cfg.num_hidden_layers = len(kept)
    old_hidden = getattr(ctx.orig_config, "hidden_size", None)
    hidden = _hidden_size(exported)
    if hidden is not None and isinstance(old_hidden, int) and hidden != old_hidden:
        cfg.hidden_size = hidden
        for m in exported.modules():
            for attr in ("hidden_size", "embed_dim"):
                _set_int_attr(m, attr, old_hidden, hidden)
    per_layer = [layer_sizes(layer) for _, layer in layers]
    old_inter = getattr(ctx.orig_config, "intermediate_size", None)
    for (_, layer), sizes in zip(layers, per_layer):
        _set_int_attr(getattr(layer, "mlp", None), "intermediate_size", old_inter, sizes["intermediate_size"])
        attn = _attention(layer)
        hq, hk = sizes["num_attention_heads"], sizes["num_key_value_heads"]
        if attn is not None and hq and hk and isinstance(getattr(attn, "num_key_value_groups", None), int) \
                and hq % hk == 0:
            set_attrs(attn, {"num_key_value_groups": hq // hk})
    ctx.layer_sizes = [dict(s) for s in per_layer]
    for k in LAYER_SIZE_KEYS:
        vals = {s[k] for s in per_layer}
        if len(vals) == 1 and None not in vals:
            ctx.set_config(k, int(next(iter(vals))), per_layer=True)
        elif len(vals) > 1:
            ctx.nonuniform.append(k)
    attn = _attention(layers[0][1]) if layers else None
    hd = getattr(attn, "head_dim", None)
    heads = getattr(cfg, "num_attention_heads", None)
    derived = getattr(cfg, "head_dim", None) or (cfg.hidden_size // heads if heads else None)
    if isinstance(hd, int) and derived != hd:  # Llama-style attentions read getattr(config, "head_dim", ...)
        ctx.set_config("head_dim", hd, per_layer=True, create=True)



def update_export(ctx: ExportContext) -> None:
    """After blocks were dropped: the family's update, or for an HF model without one the generic fallback."""
    if ctx.family is not None:
        ctx.family.update(ctx)
    elif ctx.config is not None and hf_config(ctx.exported) is not None:
        update_generic(ctx)
