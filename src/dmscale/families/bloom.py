"""BLOOM: a fused ``query_key_value`` viewed as (heads, 3, head_dim). ALiBi slopes are computed from the
model's head count, so heads stay fixed (tied to the bias); hidden, FFN and layers are searched."""

from .base import register_family
from .common import Attn, Mlp, Stack, Transformer


class Bloom(Transformer):
    model_types = ("bloom",)
    searched = "hidden, FFN, layers (heads fixed: ALiBi)"
    hidden_keys = ("hidden_size",)
    stacks = (Stack("h", "n_layer",
                    attention=(Attn("self_attention", q="self_attention.query_key_value", o="self_attention.dense",
                                    attrs={"num_heads": "heads", "head_dim": "head_dim", "split_size": "inner",
                                           "hidden_size": "hidden"},
                                    config={"n_head": "heads"}),),
                    mlp=(Mlp("mlp", down="mlp.dense_4h_to_h", attrs={}, config={}),),
                    layer_attrs={"num_heads": "heads"}),)
    model_attrs = {"transformer": {"embed_dim": "hidden", "num_heads": "heads"}}

    def update_layer(self, ctx, st, layer, name, orig, hidden):
        row = super().update_layer(ctx, st, layer, name, orig, hidden)
        if layer.mlp.dense_4h_to_h.in_features != 4 * hidden:
            ctx.inexact.append("BLOOM's config fixes the FFN width at 4 x hidden_size")
        return row


BLOOM = register_family(Bloom())
