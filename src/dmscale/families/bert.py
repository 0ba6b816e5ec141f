"""BERT-like encoders (BERT, RoBERTa, XLM-R, ELECTRA): ``attention.self.{query,key,value}``,
``attention.output.dense``, ``intermediate.dense`` / ``output.dense``. ELECTRA's token embeddings may be
narrower than the model (``embedding_size``, projected by ``embeddings_project``)."""

from .base import register_family
from .common import bert_like


class _EmbeddingSize:
    def extra(self, ctx, hidden):
        emb = ctx.exported.get_input_embeddings() if hasattr(ctx.exported, "get_input_embeddings") else None
        w = getattr(emb, "weight", None)
        if w is not None and hasattr(ctx.orig_config, "embedding_size"):
            ctx.set_config("embedding_size", int(w.shape[1]))


BERT = register_family(bert_like("bert", "roberta", "xlm-roberta"))
ELECTRA = register_family(type("Electra", (_EmbeddingSize, type(bert_like("electra"))), {})())
