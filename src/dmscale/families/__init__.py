"""Hugging Face model families: what dmscale knows about one ``config.model_type``, one file each.

Tracing finds what can be searched in any model; a family adds what tracing cannot know: which
module attributes hold sizes and what they mean, which config keys describe them, and the
bookkeeping Hugging Face keeps outside the weights. ``export`` runs the model's family (see
:mod:`dmscale.families.base`); a model without one gets the generic fallback
(:mod:`dmscale.families.generic`). A new family is one file registering a
:class:`~dmscale.families.base.Family` (usually a :class:`~dmscale.families.common.Transformer`
built from the shared patterns) with :func:`register_family`; add its model type to
``_BUILTIN`` below and a row to the coverage matrix (``tests/test_coverage_hf.py``).
"""

from __future__ import annotations

import importlib

from .base import (INEXACT_KEYS, ExportContext, Family, config_describes_model, family_for,
                   register_family, registered_families, unregister_family)
from .common import Attn, Mlp, Stack, Transformer
from .generic import LAYER_SIZE_KEYS, decoder_layers, is_hf_causal_lm, layer_sizes, uniform_sizes

__all__ = ["Family", "ExportContext", "Transformer", "Attn", "Mlp", "Stack", "register_family", "unregister_family",
           "family_for", "registered_families", "config_describes_model", "INEXACT_KEYS",
           "decoder_layers", "uniform_sizes", "layer_sizes", "is_hf_causal_lm", "LAYER_SIZE_KEYS"]

# one module per family; none imports transformers (families match by ``config.model_type``)
_BUILTIN = ("llama", "gemma", "phi3", "moe", "gpt2", "gpt_neox", "gptj", "opt", "falcon", "bloom", "mpt", "bert",
            "distilbert", "t5", "vit", "clip", "seq2seq", "swin", "convnext", "efficientnet",
            "segformer", "mobilevit", "swinv2", "deberta")
for _name in _BUILTIN:
    importlib.import_module(f"{__name__}.{_name}")
