"""Vision transformers with ``attention.{q,k,v,o}_proj`` and ``mlp.fc1``/``fc2`` (ViT, ViT-MAE, DeiT, BEiT, DINOv2).

BEiT's relative position bias (a per-head table) follows the heads by the layer spec in :mod:`.swin`."""

from .base import register_family
from .common import Attn, Mlp, Stack, Transformer

VIT_ATTN = Attn("attention", q="attention.q_proj", o="attention.o_proj", k="attention.k_proj",
                attrs={"num_attention_heads": "heads", "head_dim": "head_dim"},
                config={"num_attention_heads": "heads"})
VIT_MLP = Mlp("mlp", down="mlp.fc2", attrs={})


class ViT(Transformer):
    model_types = ("vit", "vit_mae", "deit")
    searched = "hidden, heads, FFN, layers"
    stacks = (Stack("layers", attention=(VIT_ATTN,), mlp=(VIT_MLP,)),)


class Beit(ViT):
    """BEiT is also a backbone: its config names one stage per layer."""

    model_types = ("beit",)

    def extra(self, ctx, hidden):
        remap_backbone_stages(ctx, ctx.find_stacks("layers")[0])


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

    def extra(self, ctx, hidden):
        remap_backbone_stages(ctx, ctx.find_stacks("encoder.layer")[0])


def remap_backbone_stages(ctx, container: str) -> None:
    """A backbone config names one stage per layer (``stage_names``, ``out_indices``): renumber them for the
    kept layers (a removed layer's output is the previous kept layer's output)."""
    cfg, orig = ctx.config, ctx.orig_config
    old = getattr(orig, "out_indices", None)
    if not isinstance(getattr(orig, "stage_names", None), list) or old is None:
        return
    kept = [i for i, _ in ctx.layers(container)]
    new: list[int] = []
    for idx in old:
        prev = [k for k, i in enumerate(kept) if i < idx]  # stage idx is the output of layer idx - 1
        j = prev[-1] + 1 if prev else 0
        if j not in new:
            new.append(j)
    cfg.stage_names = ["stem"] + [f"stage{i}" for i in range(1, len(kept) + 1)]
    cfg.out_indices = new


VIT = register_family(ViT())
BEIT = register_family(Beit())
DINOV2 = register_family(Dinov2())
