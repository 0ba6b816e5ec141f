"""SegFormer (MiT encoder): stages (``segformer.stages.i``) of an overlapping patch embedding, efficient
self-attention blocks (``blocks``; keys and values spatially reduced by a strided convolution) with a
Mix-FFN (``fc1`` -> depthwise conv -> ``fc2``), and a LayerNorm.

The config describes stage i by ``hidden_sizes[i]``, ``num_attention_heads[i]``, ``depths[i]`` and
``mlp_ratios[i]`` (FFN = width x an int ratio); the head dim is derived as width / heads. The image
classifier reads ``config.hidden_sizes[-1]`` in its forward, so the stage widths are always written;
the decode head of the segmentation model projects every stage to ``decoder_hidden_size``.

The width of a stage whose attention reduces keys and values (``sr_ratios[i] > 1``) is fixed at trace
time: ``SegformerSequenceReduction`` reshapes its convolution's output with the channel count of its
*input* (``reshape(batch, num_channels, -1)``), a size no trace can tie to the convolution, so the two
could only be pruned apart, and that export would not run. The layer spec below traces the module as
one unit and names this reason; the last stage (``sr_ratio`` 1 in every released SegFormer) keeps a
searched width.
"""

from __future__ import annotations

import torch.nn as nn

from ..layers.spec import LayerSpec, register_matcher
from ..trace.registry import tensors
from ..trace.spaces import fix
from .base import register_family
from .common import Attn, Mlp, Stack, Transformer
from .generic import in_features, out_features


def is_sequence_reduction(m: nn.Module) -> bool:
    return type(m).__name__ == "SegformerSequenceReduction"


def _reduction_unit(tr, mod: nn.Module, name: str, x, output, flops: float) -> None:
    """Every dim the module touches is fixed (its input's channels are its convolution's output size)."""
    why = (f"SegformerSequenceReduction '{name}' reshapes its convolution's output by its input's channel "
           "count (the stage width stays fixed)")
    for t in ([x] if x is not None else []) + tensors(output) + list(mod.parameters()):
        for s in tr.get(t):
            fix(s, why)
    tr.record_op("segformer_sequence_reduction", flops, [])


SEQUENCE_REDUCTION = LayerSpec("segformer_sequence_reduction", trace_unit=_reduction_unit)
register_matcher(is_sequence_reduction, SEQUENCE_REDUCTION)

SEGFORMER_ATTN = Attn("attention", q="attention.q_proj", o="attention.o_proj", k="attention.k_proj",
                      attrs={"num_attention_heads": "heads", "head_dim": "head_dim"},
                      config={"num_attention_heads[]": "heads"})


class Segformer(Transformer):
    model_types = ("segformer",)
    searched = "stage widths, heads, Mix-FFN, blocks per stage, decoder width"
    hidden_keys = ()
    stacks = (Stack("blocks", "depths[]", attention=(SEGFORMER_ATTN,),
                    mlp=(Mlp("mlp", down="mlp.fc2", attrs={}, config={}),), lists=()),)

    def update_layer(self, ctx, st, layer, name, orig, hidden):
        row = super().update_layer(ctx, st, layer, name, orig, hidden)
        width, inter = out_features(layer.mlp.fc2), in_features(layer.mlp.fc2)
        if inter % width:  # the config holds int ratios
            ctx.inexact.append(f"SegFormer's config gives the FFN width as an int mlp_ratio x the stage width, the "
                               f"export has {inter} in a width of {width}")
        else:
            row["mlp_ratios[]"] = inter // width
        return row

    def extra(self, ctx, hidden):
        names = ctx.find_stacks("stages")
        stages = ctx.exported.get_submodule(names[0]) if names else []
        widths = [int(stage.layer_norm.weight.shape[0]) for stage in stages]
        if widths:  # read by SegformerForImageClassification.forward: always the export's
            ctx.set_config("hidden_sizes", type(ctx.orig_config.hidden_sizes)(widths))
        head = next((m for n, m in ctx.exported.named_modules() if n.endswith("decode_head")), None)
        if head is not None and hasattr(head, "linear_fuse"):
            ctx.set_config("decoder_hidden_size", int(head.linear_fuse.weight.shape[0]))
            if {out_features(p.proj) for p in head.linear_projections} != {ctx.config.decoder_hidden_size}:
                ctx.inexact.append("SegFormer's config gives every stage projection of the decode head "
                                   "decoder_hidden_size outputs")


SEGFORMER = register_family(Segformer())
