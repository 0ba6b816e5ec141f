"""Swin-V2: Swin's stages (``encoder.layers.i.blocks``) with cosine attention (``F.normalize`` of queries and
keys, a learned per-head ``logit_scale``) and a continuous position bias: a small MLP
(``continuous_position_bias_mlp``) maps relative coordinates to one bias per head. Its attention is laid out
like BERT's (``attention.self.{query,key,value}``, ``attention.output.dense``, ``intermediate`` / ``output``).

The head count reaches the bias MLP's output and ``logit_scale`` through the trace, so both follow the heads
the search keeps. The config describes a stage by ``depths[i]`` and ``num_heads[i]``; stage widths follow
``embed_dim`` x 2^i and the FFN ``mlp_ratio``: a search that changes those gets an inexact config.
"""

from __future__ import annotations

from .base import register_family
from .common import BERT_ATTN, Attn, Mlp, Stack, Transformer


class Swinv2(Transformer):
    model_types = ("swinv2",)
    searched = "heads (with their position-bias MLP output and logit scale), FFN, blocks per stage, stage widths"
    hidden_keys = ("embed_dim",)
    stacks = (Stack("blocks", "depths[]",
                    attention=(Attn("attention.self", q="attention.self.query", o="attention.output.dense",
                                    k="attention.self.key", attrs=dict(BERT_ATTN.attrs),
                                    config={"num_heads[]": "heads"}),),
                    mlp=(Mlp("intermediate", down="output.dense", attrs={}, config={}),), lists=()),)


SWINV2 = register_family(Swinv2())
