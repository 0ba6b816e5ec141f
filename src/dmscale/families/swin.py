"""Swin: stages of window-attention blocks (``encoder.layers.i.blocks``) with a learned relative position
bias per head, passed to the attention as its mask.

The bias is a table (relative positions, heads) indexed by a constant buffer; the layer spec below
traces it as one unit whose head dim is the table's, so the bias follows the heads the search keeps
(for any module holding a ``relative_position_bias_table`` and a ``relative_position_index``, e.g.
BEiT's). The config describes a stage by ``depths[i]`` and ``num_heads[i]``; stage widths follow
``embed_dim`` x 2^i and the FFN ``mlp_ratio``: a search that changes those gets an inexact config.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ..layers.builtin import opaque_unit
from ..layers.spec import LayerSpec, register_matcher
from ..trace.registry import first_tensor
from ..trace.spaces import Space, union
from .base import register_family
from .common import Attn, Mlp, Stack, Transformer


def is_relative_position_bias(m: nn.Module) -> bool:
    """A module computing a per-head bias from a (positions, heads) table indexed by a constant buffer."""
    t = getattr(m, "relative_position_bias_table", None)
    return isinstance(t, nn.Parameter) and t.dim() == 2 and isinstance(getattr(m, "relative_position_index", None),
                                                                       torch.Tensor)


def _bias_unit(tr, mod: nn.Module, name: str, x, output, flops: float) -> None:
    """The output's one dim of the table's head count is the table's head dim; every other dim is fixed."""
    y = first_tensor(output)
    table = mod.relative_position_bias_table
    heads = table.shape[1]
    hits = [i for i, n in enumerate(y.shape) if n == heads] if isinstance(y, torch.Tensor) else []
    if len(hits) != 1:
        return opaque_unit(tr, mod, name, x, output, flops)
    td = tr.get(table)
    out = [Space(n, f"bias:{name}", fixed=n > 1) for n in y.shape]
    out[hits[0]] = td[1]
    union(td[0], Space(table.shape[0], f"bias rows:{name}", fixed=True))
    tr.set(y, out)


RELATIVE_POSITION_BIAS = LayerSpec("relative_position_bias", trace_unit=_bias_unit)
register_matcher(is_relative_position_bias, RELATIVE_POSITION_BIAS)


class Swin(Transformer):
    model_types = ("swin",)
    searched = "heads (with their relative position bias), FFN, blocks per stage, stage widths"
    hidden_keys = ("embed_dim",)
    stacks = (Stack("blocks", "depths[]",
                    attention=(Attn("attention", q="attention.q_proj", o="attention.o_proj", k="attention.k_proj",
                                    attrs={"num_attention_heads": "heads", "head_dim": "head_dim"},
                                    config={"num_heads[]": "heads"}),),
                    mlp=(Mlp("mlp", down="mlp.fc2", attrs={}, config={}),), lists=()),)


SWIN = register_family(Swin())
