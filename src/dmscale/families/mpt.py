"""MPT: a fused ``Wqkv`` reshaped with an explicit ``n_heads``; ALiBi (slopes from the head count) keeps
heads fixed. The config gives the FFN as ``expansion_ratio`` x d_model."""

from .base import register_family
from .common import Attn, Mlp, Stack, Transformer


class Mpt(Transformer):
    model_types = ("mpt",)
    searched = "hidden, FFN, layers (heads fixed: ALiBi)"
    hidden_keys = ("d_model",)
    stacks = (Stack("blocks", "n_layers",
                    attention=(Attn("attn", q="attn.Wqkv", o="attn.out_proj",
                                    attrs={"n_heads": "heads", "head_dim": "head_dim", "hidden_size": "hidden"},
                                    config={"n_heads": "heads"}),),
                    mlp=(Mlp("ffn", down="ffn.down_proj", attrs={}, config={}),),
                    layer_attrs={"num_heads": "heads"}),)
    model_attrs = {"transformer": {"hidden_size": "hidden", "num_heads": "heads"}}

    def update_layer(self, ctx, st, layer, name, orig, hidden):
        row = super().update_layer(ctx, st, layer, name, orig, hidden)
        if layer.ffn.down_proj.in_features != ctx.orig_config.expansion_ratio * hidden:
            ctx.inexact.append("MPT's config gives the FFN width as expansion_ratio x d_model")
        return row


MPT = register_family(Mpt())
