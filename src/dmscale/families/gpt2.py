"""GPT-2: a fused ``c_attn`` (HF ``Conv1D``, weight stored (in, out)) split into q | k | v."""

from .base import register_family
from .common import Attn, Mlp, Stack, Transformer


class GPT2(Transformer):
    model_types = ("gpt2",)
    searched = "hidden, heads (fused c_attn), FFN, layers"
    hidden_keys = ("n_embd",)
    stacks = (Stack("h", "n_layer",
                    attention=(Attn("attn", q="attn.c_attn", o="attn.c_proj",
                                    attrs={"num_heads": "heads", "head_dim": "head_dim", "split_size": "inner",
                                           "embed_dim": "hidden"},
                                    config={"n_head": "heads"}),),
                    mlp=(Mlp("mlp", down="mlp.c_proj", attrs={}, config={"n_inner": "inter"}),)),)
    model_attrs = {"transformer": {"embed_dim": "hidden"}}


GPT2_FAMILY = register_family(GPT2())
