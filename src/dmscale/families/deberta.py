"""DeBERTa (v1) and DeBERTa-v2/v3: BERT's layer layout (``attention.output.dense``, ``intermediate.dense`` /
``output.dense``) with disentangled attention in ``attention.self``: v2 projects ``query_proj`` / ``key_proj`` /
``value_proj``, v1 one fused ``in_proj``. Both fold the heads into the batch dim before their ``bmm`` /
``matmul`` (the trace's matmul rule tags them heads) and project the shared relative embedding table
(``encoder.rel_embeddings``) per layer into per-head position keys and queries, pruned with the heads. The
embeddings keep their width in ``embedding_size`` (config key only when it differs from the hidden size);
the sequence classifiers' ``ContextPooler`` is ``pooler_hidden_size`` wide, in and out: an export whose pooler
output differs from its input width gets an inexact config."""

from .base import register_family
from .common import BERT_ATTN, BERT_MLP, Attn, Stack, Transformer, bert_like
from .generic import in_features, out_features


class _Deberta:
    def extra(self, ctx, hidden):
        emb = getattr(getattr(ctx.exported, "deberta", ctx.exported), "embeddings", None)
        words = getattr(emb, "word_embeddings", None)
        if isinstance(getattr(emb, "embedding_size", None), int) and words is not None:
            emb.embedding_size = int(words.weight.shape[1])
            if hidden is not None and emb.embedding_size != hidden:
                ctx.set_config("embedding_size", emb.embedding_size, create=True)
        dense = getattr(getattr(ctx.exported, "pooler", None), "dense", None)
        if dense is not None:
            width = out_features(dense)
            if in_features(dense) == width:
                ctx.set_config("pooler_hidden_size", width)
            else:
                ctx.inexact.append(f"ContextPooler maps {in_features(dense)} to {width} features: pooler_hidden_size "
                                   "describes one width")


def _deberta(name: str, model_type: str, q: str) -> Transformer:
    attn = Attn("attention.self", q=f"attention.self.{q}", o="attention.output.dense", attrs=dict(BERT_ATTN.attrs),
                config=dict(BERT_ATTN.config))
    base = type(bert_like(model_type, stacks=(Stack("encoder.layer", attention=(attn,), mlp=(BERT_MLP,)),)))
    return type(name, (_Deberta, base), {})()


DEBERTA_V2 = register_family(_deberta("DebertaV2", "deberta-v2", "query_proj"))
DEBERTA = register_family(_deberta("Deberta", "deberta", "in_proj"))
