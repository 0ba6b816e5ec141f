"""GPT-J: separate q/k/v/out projections; ``rotary_dim`` (the rotary part of a head) is never touched."""

from .base import register_family
from .common import Attn, Mlp, Stack, Transformer


class GPTJ(Transformer):
    model_types = ("gptj",)
    searched = "hidden, heads, FFN, layers"
    hidden_keys = ("n_embd",)
    stacks = (Stack("h", "n_layer",
                    attention=(Attn("attn", q="attn.q_proj", o="attn.out_proj", k="attn.k_proj",
                                    attrs={"num_attention_heads": "heads", "head_dim": "head_dim",
                                           "embed_dim": "hidden"},
                                    config={"n_head": "heads"}),),
                    mlp=(Mlp("mlp", down="mlp.fc_out", attrs={}, config={"n_inner": "inter"}),)),)
    model_attrs = {"transformer": {"embed_dim": "hidden"}}


GPTJ_FAMILY = register_family(GPTJ())
