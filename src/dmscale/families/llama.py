"""Llama-like decoders: ``layers.i.self_attn.{q,k,v,o}_proj`` with grouped-query heads and a gated MLP."""

from .base import register_family
from .common import llama_like

LLAMA = register_family(llama_like("llama", "mistral", "qwen2", "qwen3"))
