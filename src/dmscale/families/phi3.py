"""Phi-3: a fused ``qkv_proj`` cut into q | k | v by slicing, and a fused ``gate_up_proj`` cut by ``chunk``.

The attention reads ``config.num_attention_heads`` at run time (the end of q in ``qkv_proj``), so
an attention whose kept heads differ from the model's config gets its own copy of the config
with its layer's head counts.
"""

from __future__ import annotations

import copy

from .base import register_family
from .common import LLAMA_ATTN, Attn, Mlp, Transformer, decoder
from .generic import out_features


def _kv_heads(attn, sizes):
    """(q + 2 kv) heads x head_dim = qkv_proj's output."""
    return (out_features(attn.qkv_proj) // sizes["head_dim"] - sizes["heads"]) // 2


class Phi3(Transformer):
    model_types = ("phi3",)
    create_keys = ("head_dim",)
    searched = "hidden, heads (fused qkv_proj), FFN (fused gate_up_proj), layers"
    stacks = (decoder(attention=Attn("self_attn", q="self_attn.qkv_proj", o="self_attn.o_proj",
                                     kv_heads=_kv_heads, attrs=LLAMA_ATTN.attrs, config=LLAMA_ATTN.config),
                      mlp=Mlp("mlp", down="mlp.down_proj", attrs={})),)

    def attention_extra(self, ctx, layer, attn, sizes):
        cfg = ctx.orig_config
        if (sizes["heads"], sizes["kv_heads"]) != (cfg.num_attention_heads, cfg.num_key_value_heads):
            own = copy.deepcopy(ctx.config)
            own.num_attention_heads, own.num_key_value_heads = sizes["heads"], sizes["kv_heads"]
            attn.config = own


PHI3 = register_family(Phi3())
