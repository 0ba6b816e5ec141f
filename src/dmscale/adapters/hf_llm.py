"""Hugging Face decoder-only LLM adapter: make an exported model's config and layer indices consistent.

Tracing and slicing already produce an exported model that computes the hard-masked supernet.
What tracing cannot know is the bookkeeping Hugging Face keeps outside the weights:

* ``self_attn.layer_idx`` indexes the KV cache (``DynamicCache`` has one slot per layer of
  ``config.num_hidden_layers``), so after removing layers the survivors are renumbered 0..L-1;
* ``config.layer_types`` (Qwen2, Mistral-style sliding/full attention per layer) is indexed by
  position in the model loop, so the entries of removed layers are dropped;
* the config's sizes (``hidden_size``, ``intermediate_size``, ``num_attention_heads``,
  ``num_key_value_heads``; GPT-2's ``n_embd``/``n_inner``/``n_head``) are set when every layer
  has the same size. Per-layer sizes that differ cannot be written in an HF config: then the
  config keeps the supernet's values, ``config.dmscale_layer_sizes`` lists the real ones, and
  the model must be stored with ``dmscale.save`` (which rebuilds it without the config).
"""

from __future__ import annotations

import sys

from typing import Any

import torch.nn as nn

from . import register_post_export

__all__ = ["is_hf_causal_lm", "decoder_layers", "layer_sizes", "uniform_sizes", "fix_hf_export",
           "LAYER_SIZE_KEYS"]

LAYER_SIZE_KEYS = ("num_attention_heads", "num_key_value_heads", "intermediate_size")


def is_hf_causal_lm(model: nn.Module) -> bool:
    """True for a Hugging Face ``PreTrainedModel`` with a decoder config (what this adapter edits)."""
    if "transformers" not in sys.modules:  # an HF model implies transformers was imported; don't pay for it
        return False
    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover - transformers is optional
        return False
    cfg = getattr(model, "config", None)
    return isinstance(model, PreTrainedModel) and cfg is not None and hasattr(cfg, "num_hidden_layers")


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


def _out_features(m: nn.Module | None) -> int | None:
    if m is None:
        return None
    if isinstance(m, nn.Linear):
        return m.out_features
    w = getattr(m, "weight", None)
    if type(m).__name__ == "Conv1D" and w is not None:  # HF GPT-2 Conv1D stores (in, out)
        return int(w.shape[1])
    return None


def layer_sizes(layer: nn.Module) -> dict[str, int | None]:
    """Heads, KV heads and MLP width of one decoder layer, read from its weights."""
    attn = _attention(layer)
    out: dict[str, int | None] = {k: None for k in LAYER_SIZE_KEYS}
    if attn is not None:
        hd = int(attn.head_dim)
        q = _out_features(getattr(attn, "q_proj", None))
        k = _out_features(getattr(attn, "k_proj", None))
        if q is not None:
            out["num_attention_heads"] = q // hd
            out["num_key_value_heads"] = (k // hd) if k is not None else q // hd
        elif getattr(attn, "c_attn", None) is not None:  # GPT-2 fused qkv
            n = _out_features(attn.c_attn)
            if n is not None:
                out["num_attention_heads"] = out["num_key_value_heads"] = n // 3 // hd
    mlp = getattr(layer, "mlp", None)
    if mlp is not None:
        for nm in ("gate_proj", "up_proj", "c_fc", "fc1", "dense_h_to_4h"):
            f = _out_features(getattr(mlp, nm, None))
            if f is not None:
                out["intermediate_size"] = f
                break
    return out


def uniform_sizes(model: nn.Module) -> dict[str, int] | None:
    """The per-layer sizes when all layers agree (None when they differ or cannot be read)."""
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


def _hidden_size(model: nn.Module) -> int | None:
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    w = getattr(emb, "weight", None)
    return int(w.shape[1]) if w is not None else None


def _kept_layers(dms: Any, container: str, n_old: int) -> list[int]:
    """Original indices of the layers of ``container`` that the export keeps."""
    kept = list(range(n_old))
    for g in dms.groups:
        if g.kind != "depth":
            continue
        keep = dms.space.keep(g)
        drop = {b.index for b, k in zip(g.blocks, keep.tolist()) if not k and b.container == container}
        kept = [i for i in kept if i not in drop]
    return kept


def _set_int_attr(m: nn.Module, attr: str, old: int | None, new: int | None) -> None:
    if new is not None and isinstance(getattr(m, attr, None), int) and (old is None or getattr(m, attr) == old):
        setattr(m, attr, int(new))


def fix_hf_export(dms: Any, exported: nn.Module) -> None:
    """Renumber ``layer_idx``, filter ``layer_types`` and write uniform sizes into the exported config."""
    cfg = exported.config
    for m in exported.modules():  # a tied LM head is sliced through the embedding: sync its size attributes
        w = getattr(m, "weight", None)
        if isinstance(m, nn.Linear) and w is not None and w.dim() == 2:
            m.out_features, m.in_features = int(w.shape[0]), int(w.shape[1])
        elif isinstance(m, nn.Embedding) and w is not None:
            m.num_embeddings, m.embedding_dim = int(w.shape[0]), int(w.shape[1])
    found = decoder_layers(exported)
    if found is None:
        return
    cname, layers = found
    n_old = int(dms.model.config.num_hidden_layers)
    kept = _kept_layers(dms, cname, n_old)
    if len(kept) != len(layers):
        raise RuntimeError(f"hf_llm adapter: export has {len(layers)} layers in '{cname}' but the depth masks "
                           f"keep {len(kept)} of {n_old}")
    # KV-cache slots and per-layer attention types follow the new positions
    for new_i, layer in enumerate(layers):
        for m in layer.modules():
            if isinstance(getattr(m, "layer_idx", None), int):
                m.layer_idx = new_i
    old_types = getattr(cfg, "layer_types", None)
    if isinstance(old_types, (list, tuple)) and len(old_types) == n_old:
        cfg.layer_types = [old_types[i] for i in kept]
    mwl = getattr(cfg, "max_window_layers", None)
    if isinstance(mwl, int):
        cfg.max_window_layers = sum(1 for i in kept if i < mwl)
    cfg.num_hidden_layers = len(kept)

    old_hidden = int(dms.model.config.hidden_size)
    hidden = _hidden_size(exported)
    if hidden is not None and hidden != old_hidden:
        cfg.hidden_size = hidden
        for m in exported.modules():
            for attr in ("hidden_size", "embed_dim"):
                _set_int_attr(m, attr, old_hidden, hidden)
    per_layer = [layer_sizes(layer) for layer in layers]
    old_inter = getattr(dms.model.config, "intermediate_size", None)
    if old_inter is None and getattr(dms.model.config, "model_type", "") == "gpt2":
        old_inter = getattr(dms.model.config, "n_inner", None) or 4 * old_hidden
    for layer, sizes in zip(layers, per_layer):
        mlp = getattr(layer, "mlp", None)
        if mlp is not None:
            _set_int_attr(mlp, "intermediate_size", old_inter, sizes["intermediate_size"])
        attn = _attention(layer)
        hq, hk = sizes["num_attention_heads"], sizes["num_key_value_heads"]
        if attn is not None and hq and hk and isinstance(getattr(attn, "num_key_value_groups", None), int):
            # query heads per KV head: changes when the tracer let the repeat factor of repeat_kv be pruned
            if hq % hk:
                raise RuntimeError(f"hf_llm adapter: layer {attn.layer_idx} keeps {hq} query heads for {hk} "
                                   "key/value heads (not a multiple)")
            attn.num_key_value_groups = hq // hk
    uni = uniform_sizes(exported)
    if uni is not None:
        for k, v in uni.items():
            if k == "intermediate_size" and getattr(cfg, "model_type", "") == "gpt2":
                cfg.n_inner = v
            elif k == "num_key_value_heads" and not hasattr(cfg, "num_key_value_heads"):
                continue
            else:
                setattr(cfg, k, v)
        attn = _attention(layers[0]) if len(layers) else None
        hd = getattr(attn, "head_dim", None)
        if isinstance(hd, int) and getattr(cfg, "model_type", "") != "gpt2" and \
                (getattr(cfg, "head_dim", None) or cfg.hidden_size // max(1, cfg.num_attention_heads)) != hd:
            cfg.head_dim = hd  # Llama-style configs read head_dim, else derive hidden_size // heads
        if hasattr(cfg, "dmscale_layer_sizes"):
            delattr(cfg, "dmscale_layer_sizes")
    else:
        cfg.dmscale_layer_sizes = per_layer


register_post_export(is_hf_causal_lm, fix_hf_export)
