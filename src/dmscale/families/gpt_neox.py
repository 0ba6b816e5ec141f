"""GPT-NeoX / Pythia: a fused ``query_key_value`` viewed as (heads, 3 x head_size) and chunked.

``rotary_ndims`` (the rotary part of a head) is never touched: only ``head_size`` holds the head dim.
"""

from .base import register_family
from .common import Attn, Mlp, Stack, Transformer


class GPTNeoX(Transformer):
    model_types = ("gpt_neox",)
    searched = "hidden, heads (fused query_key_value), FFN, layers"
    stacks = (Stack("layers", attention=(Attn("attention", q="attention.query_key_value", o="attention.dense",
                                              attrs={"head_size": "head_dim"},
                                              config={"num_attention_heads": "heads"}),),
                    mlp=(Mlp("mlp", down="mlp.dense_4h_to_h", attrs={}),)),)


GPT_NEOX = register_family(GPTNeoX())
