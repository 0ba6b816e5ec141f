"""MobileViT: MobileNetV2 inverted residuals and MobileViT blocks (``mobilevit.encoder.layer``); each
MobileViT block unfolds its feature map into patches for a small BERT-style transformer
(``transformer.layer``: ``attention.attention.{query,key,value}``, ``attention.output.dense``,
``intermediate.dense``, ``output.dense``) and folds them back.

The config describes the transformer widths by ``hidden_sizes[i]`` and the convolution widths by
``neck_hidden_sizes`` (stem, each encoder stage, the final 1x1 expansion); the head count
``num_attention_heads`` is shared by all blocks (head dim = width / heads), the FFN is ``mlp_ratio``
x width, the inverted residuals expand by ``expand_ratio`` and the block counts are fixed by the
architecture: a search that changes those gets an inexact config (store the export with
``dmscale.save``).
"""

from __future__ import annotations

import torch.nn as nn

from .base import register_family
from .common import BERT_ATTN, Attn, Mlp, Stack, Transformer

MOBILEVIT_ATTN = Attn("attention.attention", q="attention.attention.query", o="attention.output.dense",
                      k="attention.attention.key",
                      attrs=dict(BERT_ATTN.attrs), config=dict(BERT_ATTN.config))


def _last_conv_width(module: nn.Module) -> int | None:
    convs = [m for m in module.modules() if isinstance(m, nn.Conv2d)]
    return int(convs[-1].weight.shape[0]) if convs else None


class MobileViT(Transformer):
    model_types = ("mobilevit",)
    searched = "transformer widths, heads, FFN, transformer layers, convolution channels, inverted-residual blocks"
    hidden_keys = ()
    stacks = (Stack("transformer.layer", None, attention=(MOBILEVIT_ATTN,),
                    mlp=(Mlp("intermediate", down="output.dense", attrs={}, config={}),), lists=()),)

    def extra(self, ctx, hidden):
        orig = ctx.orig_config
        enc_name = next(iter(ctx.find_stacks("encoder.layer")), None)
        if enc_name is None:
            return
        stages = list(ctx.exported.get_submodule(enc_name))
        widths = [int(s.layernorm.weight.shape[0]) for s in stages if hasattr(s, "transformer")]
        if len(widths) == len(orig.hidden_sizes):
            ctx.set_config("hidden_sizes", type(orig.hidden_sizes)(widths))
        base = enc_name.rpartition(".")[0].rpartition(".")[0]  # the MobileViTModel
        model = ctx.exported.get_submodule(base) if base else ctx.exported
        parts = [getattr(model, "conv_stem", None), *stages, getattr(model, "conv_1x1_exp", None)]
        neck = [_last_conv_width(p) if p is not None else None for p in parts]
        if None not in neck and len(neck) == len(orig.neck_hidden_sizes):
            ctx.set_config("neck_hidden_sizes", type(orig.neck_hidden_sizes)(neck))
        removed = [n for n, m in ctx.model.named_modules()
                   if n.startswith(enc_name + ".") and isinstance(m, nn.ModuleList) and ctx.dropped(n)]
        if removed:
            ctx.inexact.append("MobileViT's architecture fixes the number of blocks per stage (blocks removed "
                               "in " + ", ".join(removed) + ")")


MOBILEVIT = register_family(MobileViT())
