"""T5: blocks of positional sub-layers ``layer.0`` (self-attention), ``layer.1``
(cross-attention in the decoder), ``layer.-1`` (``DenseReluDense``).

Depth removes whole ``T5Block``s (the tracer never removes a sub-layer that is called by
position). The relative position bias lives in the first block of each stack and is shared by
all its blocks (so their self-attention heads are one searched dimension, tied to the bias's head
dim); when the first block is removed, the first kept block takes the bias over. The
cross-attention adds a zero bias made from ``n_heads`` and shared by the stack: its heads are one
searched dimension of the decoder too.
``model_dim`` (the LM-head input scale of tied embeddings) keeps the supernet's value.
"""

from .base import register_family
from .common import Attn, Mlp, Stack, Transformer, sub


def _attn(module: str) -> Attn:
    return Attn(module, q=f"{module}.q", o=f"{module}.o", k=f"{module}.k",
                attrs={"n_heads": "heads", "key_value_proj_dim": "head_dim", "inner_dim": "inner", "d_model": "hidden"},
                config={"num_heads": "heads", "d_kv": "head_dim"})


def _ffn(i: int) -> Mlp:
    return Mlp(f"layer.{i}.DenseReluDense", down=f"layer.{i}.DenseReluDense.wo", attrs={}, config={"d_ff": "inter"})


class T5(Transformer):
    model_types = ("t5",)
    searched = "hidden, self- and cross-attention heads (one group each per stack), FFN, blocks (encoder and decoder)"
    hidden_keys = ("d_model",)
    stacks = (Stack("encoder.block", "num_layers", attention=(_attn("layer.0.SelfAttention"),), mlp=(_ffn(1),), lists=()),
              Stack("decoder.block", "num_decoder_layers",
                    attention=(_attn("layer.0.SelfAttention"), _attn("layer.1.EncDecAttention")), mlp=(_ffn(2),),
                    lists=()))

    def before_drop(self, ctx):
        """The first kept block of a stack takes over the relative position bias of a removed first block."""
        for st in self.stacks:
            for cname in ctx.find_stacks(st.path):
                dropped = ctx.dropped(cname)
                blocks = ctx.exported.get_submodule(cname)
                kept = [i for i in range(len(blocks)) if i not in dropped]
                if not kept or kept[0] == 0:
                    continue
                src = sub(blocks[0], "layer.0.SelfAttention")
                dst = sub(blocks[kept[0]], "layer.0.SelfAttention")
                if getattr(src, "has_relative_attention_bias", False) and dst is not None:
                    dst.relative_attention_bias = src.relative_attention_bias
                    dst.has_relative_attention_bias = True


T5_FAMILY = register_family(T5())
