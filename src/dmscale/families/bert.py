"""BERT-like encoders (BERT, RoBERTa, XLM-R, ELECTRA, RoFormer, ESM, BigBird, RemBERT, MPNet):
``attention.self.{query,key,value}`` (MPNet: ``attention.attn.{q,k,v,o}``), ``attention.output.dense``,
``intermediate.dense`` / ``output.dense``. ELECTRA's and RoFormer's token embeddings may be narrower than the
model (``embedding_size``, projected by ``embeddings_project``), RemBERT's always are
(``input_embedding_size``, projected by ``embedding_hidden_mapping_in``). MPNet's encoder keeps the head count
of its shared relative position bias (``n_heads``); BigBird's embeddings keep the hidden size (a scale when
``rescale_embeddings``). ESM's contact head (unused by the classifiers) reads layers x heads attention maps: an
export that removes layers or heads keeps it whole and gets an inexact config."""

from .base import register_family
from .common import BERT_ATTN, BERT_MLP, Attn, Stack, bert_like


class _EmbeddingSize:
    embedding_key = "embedding_size"

    def extra(self, ctx, hidden):
        emb = ctx.exported.get_input_embeddings() if hasattr(ctx.exported, "get_input_embeddings") else None
        w = getattr(emb, "weight", None)
        if w is not None and hasattr(ctx.orig_config, self.embedding_key):
            ctx.set_config(self.embedding_key, int(w.shape[1]))


def _with_embedding_size(name: str, *model_types: str, key: str = "embedding_size", **overrides):
    base = type(bert_like(*model_types, **overrides))
    return type(name, (_EmbeddingSize, base), {"embedding_key": key})()


MPNET_ATTN = Attn("attention.attn", q="attention.attn.q", o="attention.attn.o", k="attention.attn.k",
                  attrs=dict(BERT_ATTN.attrs), config=dict(BERT_ATTN.config))

class _BigBird:
    def extra(self, ctx, hidden):
        emb = next((m for n, m in ctx.exported.named_modules() if n.endswith("embeddings")), None)
        if emb is None or hidden is None or getattr(emb, "hidden_size", hidden) == hidden:
            return
        if getattr(ctx.config, "rescale_embeddings", False):  # the scale sqrt(hidden_size) stays the supernet's
            ctx.inexact.append("BigBird rescales its embeddings by sqrt(hidden_size): the export keeps the "
                               "supernet's scale")
        else:
            emb.hidden_size = hidden


BERT = register_family(bert_like("bert", "roberta", "xlm-roberta", "esm"))
BIG_BIRD = register_family(type("BigBird", (_BigBird, type(bert_like("big_bird"))), {})())
ELECTRA = register_family(_with_embedding_size("Electra", "electra"))
ROFORMER = register_family(_with_embedding_size("RoFormer", "roformer"))
REMBERT = register_family(_with_embedding_size("RemBert", "rembert", key="input_embedding_size"))
MPNET = register_family(bert_like("mpnet", stacks=(Stack("encoder.layer", attention=(MPNET_ATTN,), mlp=(BERT_MLP,)),),
                                  model_attrs={"encoder": {"n_heads": "heads"}}))
