"""DistilBERT: ``attention.{q,k,v,out}_lin`` and ``ffn.lin1``/``lin2`` in ``transformer.layer``."""

from .base import register_family
from .common import Attn, Mlp, Stack, Transformer


class DistilBert(Transformer):
    model_types = ("distilbert",)
    searched = "hidden, heads, FFN, layers"
    hidden_keys = ("dim",)
    stacks = (Stack("transformer.layer", "n_layers",
                    attention=(Attn("attention", q="attention.q_lin", o="attention.out_lin",
                                    attrs={"n_heads": "heads", "attention_head_size": "head_dim", "dim": "hidden"},
                                    config={"n_heads": "heads"}),),
                    mlp=(Mlp("ffn", down="ffn.lin2", attrs={}, config={"hidden_dim": "inter"}),)),)

    def extra(self, ctx, hidden):
        tr = getattr(getattr(ctx.exported, "distilbert", ctx.exported), "transformer", None)
        if tr is not None and type(getattr(tr, "n_layers", None)) is int:
            tr.n_layers = len(tr.layer)


DISTILBERT = register_family(DistilBert())
