"""Mixture-of-experts: fused expert weights, and the Qwen2-MoE family.

Hugging Face stores the experts of one layer as two 3-D parameters, ``gate_up_proj`` (experts,
2 x FFN, hidden) and ``down_proj`` (experts, hidden, FFN), and routes tokens with data-dependent
indexing (or a grouped matmul kernel). The layer spec below traces such a module as one unit:
the FFN width is searched (the same channels in every expert of the layer, so the fused
weights stay rectangular), the hidden dims are tied to the layer's input and output, and the
expert count stays fixed, with a warning that names it.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn as nn

from ..layers.spec import LayerSpec, register_matcher
from ..trace.registry import first_tensor
from ..trace.rules.shape import equal_parts
from ..trace.spaces import align, fix, union
from .base import register_family, set_attrs
from .common import LLAMA_ATTN, LLAMA_MLP, Mlp, Stack, Transformer, sub

__all__ = ["is_fused_experts", "FUSED_EXPERTS", "SparseMoe", "GROUPED_MM_ALIGN"]

GROUPED_MM_ALIGN = 8


def is_fused_experts(m: nn.Module) -> bool:
    """A module holding its experts as ``gate_up_proj`` (E, 2I, H) and ``down_proj`` (E, H, I) parameters."""
    gu, down = getattr(m, "gate_up_proj", None), getattr(m, "down_proj", None)
    if not (isinstance(gu, nn.Parameter) and isinstance(down, nn.Parameter) and gu.dim() == 3 and down.dim() == 3):
        return False
    e, two_i, h = gu.shape
    return down.shape[0] == e and two_i % 2 == 0 and tuple(down.shape[1:]) == (h, two_i // 2)


def _experts_unit(tr, mod: nn.Module, name: str, x: torch.Tensor | None, output, flops: float) -> None:
    """gate_up[2] and down[1] are the hidden dim of the input and output; gate_up[1] = FFN | FFN = down[2]."""
    gd, dd = tr.get(mod.gate_up_proj), tr.get(mod.down_proj)
    xd = list(tr.get(x))
    union(xd[-1], gd[2])
    union(dd[1], xd[-1])
    inter = equal_parts(gd[1], 2, f"experts:{name}")[0]  # gate | up: channel i of both kept together
    union(inter, dd[2])
    n = mod.gate_up_proj.shape[0]
    reason = f"{type(mod).__name__} '{name}': the expert count ({n}) is not searched"
    union(gd[0], dd[0])
    fix(gd[0], reason)
    inter.find().tags.add("act")  # the FFN channels are an activation inside the unit
    # Hugging Face runs fused experts with a grouped matmul whose strides must be multiples of 16 bytes:
    # kept FFN and hidden widths stay multiples of 8 (16 bytes in bf16/fp16, 32 in fp32)
    for s in (inter, xd[-1]):
        align(s, GROUPED_MM_ALIGN)
    y = first_tensor(output)
    if y is not None and y.dim() == x.dim():
        tr.set(y, xd[:-1] + [dd[1]])
    tr.record_op("moe_experts", flops, [inter, xd[-1]])
    warnings.warn(f"dmscale: the number of experts of {type(mod).__name__} ({n}) is kept fixed; the experts' "
                  "FFN width is searched (the same channels in every expert of a layer)", stacklevel=2)


FUSED_EXPERTS = LayerSpec("moe_experts", trace_unit=_experts_unit,
                          size_attrs=lambda m: {"intermediate_dim": m.down_proj.shape[2],
                                                "hidden_dim": m.down_proj.shape[1]})
register_matcher(is_fused_experts, FUSED_EXPERTS)


class SparseMoe(Transformer):
    """Llama-like attention; sparse layers with fused experts (``mlp.experts``) and a router (``mlp.gate``, whose
    ``hidden_dim`` its forward reads in a reshape), optionally dense MLP layers and a shared expert.

    ``expert_key``: the config key of the experts' FFN width (Mixtral and OLMoE reuse ``intermediate_size``,
    the Qwen MoE models have ``moe_intermediate_size``)."""

    expert_key = "moe_intermediate_size"
    create_keys = ("head_dim",)
    searched = "hidden, heads (KV groups), expert FFN (expert count fixed), layers"

    def __init__(self, *model_types: str, expert_key: str | None = None, shared_expert: bool = False) -> None:
        self.model_types = model_types
        if expert_key is not None:
            self.expert_key = expert_key
        mlps = [Mlp("mlp", down="mlp.down_proj", attrs=LLAMA_MLP.attrs, config={"intermediate_size": "inter"})]
        if shared_expert:
            mlps.insert(0, Mlp("mlp.shared_expert", down="mlp.shared_expert.down_proj", attrs=LLAMA_MLP.attrs,
                               config={"shared_expert_intermediate_size": "inter"}))
            self.searched = ("hidden, heads (KV groups), expert FFN (expert count fixed), shared-expert FFN, "
                             "layers")
        self.stacks = (Stack("layers", attention=(LLAMA_ATTN,), mlp=tuple(mlps), layer_attrs={"hidden_size": "hidden"}),)

    def update_layer(self, ctx, st, layer, name, orig, hidden):
        row = super().update_layer(ctx, st, layer, name, orig, hidden)
        experts = sub(layer, "mlp.experts")
        if experts is not None and is_fused_experts(experts):
            inter = int(experts.down_proj.shape[2])
            set_attrs(experts, {"intermediate_dim": inter, "hidden_dim": hidden})
            set_attrs(sub(layer, "mlp.gate"), {"hidden_dim": hidden})
            row[self.expert_key] = inter
        return row


QWEN2_MOE = register_family(SparseMoe("qwen2_moe", shared_expert=True))
SPARSE_MOE = register_family(SparseMoe("qwen3_moe"))
# Mixtral and OLMoE: the experts' width is the config's intermediate_size (no dense layers)
MIXTRAL = register_family(SparseMoe("mixtral", "olmoe", expert_key="intermediate_size"))
