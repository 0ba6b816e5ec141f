"""Encoder-decoder and encoder stacks in the BART layout (BART, Whisper): ``self_attn`` / ``encoder_attn``
with ``{q,k,v,out}_proj`` and an explicit ``num_heads``, ``fc1``/``fc2`` on the layer."""

from .base import register_family
from .common import Attn, Mlp, Stack, Transformer


def _attn(module: str, heads_key: str) -> Attn:
    return Attn(module, q=f"{module}.q_proj", o=f"{module}.out_proj", k=f"{module}.k_proj",
                attrs={"num_heads": "heads", "head_dim": "head_dim", "embed_dim": "hidden"},
                config={heads_key: "heads"})


def _stack(side: str) -> Stack:
    attn = (_attn("self_attn", f"{side}_attention_heads"),)
    if side == "decoder":
        attn += (_attn("encoder_attn", "decoder_attention_heads"),)
    return Stack(f"{side}.layers", f"{side}_layers", attention=attn,
                 mlp=(Mlp("", down="fc2", attrs={}, config={f"{side}_ffn_dim": "inter"}),),
                 layer_attrs={"embed_dim": "hidden"}, lists=())


class Seq2Seq(Transformer):
    model_types = ("bart", "whisper")
    searched = "hidden, heads, FFN, layers (encoder and decoder)"
    hidden_keys = ("d_model",)
    stacks = (_stack("encoder"), _stack("decoder"))


SEQ2SEQ = register_family(Seq2Seq())
