"""Vision transformers with ``attention.{q,k,v,o}_proj`` and ``mlp.fc1``/``fc2`` (ViT, ViT-MAE, DINOv2)."""

from .base import register_family
from .common import Attn, Mlp, Stack, Transformer

VIT_ATTN = Attn("attention", q="attention.q_proj", o="attention.o_proj", k="attention.k_proj",
                attrs={"num_attention_heads": "heads", "head_dim": "head_dim"},
                config={"num_attention_heads": "heads"})
VIT_MLP = Mlp("mlp", down="mlp.fc2", attrs={})


class ViT(Transformer):
    model_types = ("vit", "vit_mae")
    searched = "hidden, heads, FFN, layers"
    stacks = (Stack("layers", attention=(VIT_ATTN,), mlp=(VIT_MLP,)),)


class Dinov2(Transformer):
    model_types = ("dinov2",)
    searched = "hidden, heads, FFN, layers"
    stacks = (Stack("encoder.layer", attention=(VIT_ATTN,), mlp=(VIT_MLP,)),)

    def update_layer(self, ctx, st, layer, name, orig, hidden):
        row = super().update_layer(ctx, st, layer, name, orig, hidden)
        ratio = getattr(ctx.orig_config, "mlp_ratio", None)
        inter = getattr(getattr(layer.mlp, "fc1", None), "out_features", None)
        if ratio is not None and inter is not None and inter != int(hidden * ratio):
            ctx.inexact.append("DINOv2's config gives the FFN width as mlp_ratio x hidden_size")
        return row


VIT = register_family(ViT())
DINOV2 = register_family(Dinov2())
