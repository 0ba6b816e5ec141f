"""Falcon: a fused ``query_key_value`` in three layouts (multi-head, multi-query with ``[..., [-2], :]``
slices, and the new grouped layout (kv heads, q per kv + 2, head_dim)).

With ALiBi the slopes are computed from the head count, so heads stay fixed (tied to the bias),
and the model divides the bias by ``sqrt(config.hidden_size // num_heads)`` at run time: the config
keeps the supernet's ``hidden_size`` then (the export computes the same function; its config is
marked inexact when the hidden size was pruned).
"""

from .base import register_family
from .common import Attn, Mlp, Stack, Transformer
from .generic import out_features


def _kv_heads(attn, sizes):
    """query_key_value's output = (heads + 2 kv heads) x head_dim (multi-head: 3 x heads)."""
    return (out_features(attn.query_key_value) // sizes["head_dim"] - sizes["heads"]) // 2


class Falcon(Transformer):
    model_types = ("falcon",)
    searched = "hidden, heads (fused query_key_value; fixed with ALiBi), FFN, layers"
    stacks = (Stack("h", attention=(Attn("self_attention", q="self_attention.query_key_value",
                                         o="self_attention.dense", kv_heads=_kv_heads,
                                         attrs={"num_heads": "heads", "num_kv_heads": "kv_heads",
                                                "head_dim": "head_dim", "split_size": "inner",
                                                "hidden_size": "hidden"},
                                         config={"num_attention_heads": "heads", "num_kv_heads": "kv_heads"}),),
                    mlp=(Mlp("mlp", down="mlp.dense_4h_to_h", attrs={}, config={"ffn_hidden_size": "inter"}),),
                    layer_attrs={"num_heads": "heads"}),)
    model_attrs = {"transformer": {"num_heads": "heads", "embed_dim": "hidden"}}

    def update(self, ctx):
        super().update(ctx)
        cfg, orig = ctx.config, ctx.orig_config
        if not cfg.new_decoder_architecture and not cfg.multi_query:
            cfg.num_kv_heads = cfg.num_attention_heads  # unused by this layout; the config ties them
        if cfg.alibi and cfg.hidden_size != orig.hidden_size:
            cfg.hidden_size = orig.hidden_size  # read at run time as heads x head_dim
            ctx.inexact.append("Falcon with ALiBi reads config.hidden_size // num_heads at run time; the "
                               "pruned hidden size cannot be written")


FALCON = register_family(Falcon())
