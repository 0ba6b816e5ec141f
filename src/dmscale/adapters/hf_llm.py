"""Deprecated: moved to :mod:`dmscale.families` (``generic`` for these helpers). Goes away in 0.3."""

from __future__ import annotations

import warnings

from ..families.generic import (LAYER_SIZE_KEYS, decoder_layers, is_hf_causal_lm, layer_sizes,  # noqa: F401
                                uniform_sizes)

__all__ = ["is_hf_causal_lm", "decoder_layers", "layer_sizes", "uniform_sizes", "LAYER_SIZE_KEYS"]

warnings.warn("dmscale.adapters.hf_llm moved to dmscale.families (decoder_layers, uniform_sizes, ...); the old "
              "path goes away in 0.3", DeprecationWarning, stacklevel=2)
