"""Llama-like decoders: ``layers.i.self_attn.{q,k,v,o}_proj`` with grouped-query heads and a gated MLP.

StableLM has the same layout with LayerNorms and a partial rotary embedding (``rotary_ndims``, a part of
the head dim that is not searched); its config derives the head dim as hidden_size / heads."""

from .base import register_family
from .common import llama_like

LLAMA = register_family(llama_like("llama", "mistral", "qwen2", "qwen3"))
STABLELM = register_family(llama_like("stablelm", create_keys=()))
