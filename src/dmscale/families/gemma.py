"""Gemma and Gemma-2: Llama-like layers; the embedding is scaled by sqrt(hidden_size) at construction.

The export keeps the supernet's scale (it computes the same function); a config with a pruned
``hidden_size`` would rebuild a different scale, so such an export's config is marked inexact
by the config check (store it with ``dmscale.save``).
"""

from .base import register_family
from .common import llama_like

GEMMA = register_family(llama_like("gemma", "gemma2"))
