"""OPT: ``q/k/v/out_proj`` viewed with an explicit ``num_heads``; the FFN is ``fc1``/``fc2`` on the layer."""

from .base import register_family
from .common import Attn, Mlp, Stack, Transformer


class OPT(Transformer):
    model_types = ("opt",)
    searched = "hidden, heads, FFN, layers"
    stacks = (Stack("layers", attention=(Attn("self_attn", q="self_attn.q_proj", o="self_attn.out_proj",
                                              k="self_attn.k_proj",
                                              attrs={"num_heads": "heads", "head_dim": "head_dim",
                                                     "embed_dim": "hidden"},
                                              config={"num_attention_heads": "heads"}),),
                    mlp=(Mlp("", down="fc2", attrs={}, config={"ffn_dim": "inter"}),),
                    layer_attrs={"embed_dim": "hidden"}),)

    def extra(self, ctx, hidden):
        # without a projection the token embedding width is the model width
        if getattr(ctx.orig_config, "word_embed_proj_dim", None) == getattr(ctx.orig_config, "hidden_size", None):
            ctx.set_config("word_embed_proj_dim", hidden)


OPT_FAMILY = register_family(OPT())
