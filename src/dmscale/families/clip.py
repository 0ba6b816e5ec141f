"""CLIP's vision tower (``clip_vision_model``): ``self_attn.{q,k,v,out}_proj``, ``mlp.fc1``/``fc2``; the
class embedding, patch and position embeddings carry the model width."""

from .base import register_family
from .common import Attn, Mlp, Stack, Transformer


class ClipVision(Transformer):
    model_types = ("clip_vision_model",)
    searched = "hidden, heads, FFN, layers"
    stacks = (Stack("encoder.layers",
                    attention=(Attn("self_attn", q="self_attn.q_proj", o="self_attn.out_proj", k="self_attn.k_proj",
                                    attrs={"num_heads": "heads", "head_dim": "head_dim", "embed_dim": "hidden"},
                                    config={"num_attention_heads": "heads"}),),
                    mlp=(Mlp("mlp", down="mlp.fc2", attrs={}, config={"intermediate_size": "inter"}),),
                    layer_attrs={"embed_dim": "hidden"}),)
    model_attrs = {"embeddings": {"embed_dim": "hidden"}}


CLIP_VISION = register_family(ClipVision())
