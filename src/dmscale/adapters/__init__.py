"""Deprecated: per-family export knowledge moved to :mod:`dmscale.families` (one file per HF model type).

``register_post_export`` still registers a fix-up ``fixup(dms, exported_model)`` that export runs on
models for which ``applies(original_model)`` is true (after the family's updates, before the export
check); ``dmscale.adapters.hf_llm`` re-exports the layer helpers from :mod:`dmscale.families.generic`.
This module goes away in 0.3.
"""

from __future__ import annotations

import warnings
from typing import Any, Callable

import torch.nn as nn

from ..families import base as _base
from ..families.base import _FIXUPS, post_export_fixups  # noqa: F401  (the registry lives in families now)

__all__ = ["register_post_export", "post_export_fixups"]


def register_post_export(applies: Callable[[nn.Module], bool], fixup: Callable[[Any, nn.Module], None]) -> None:
    """Deprecated: register a fix-up run on exports of models for which ``applies(original_model)`` is true."""
    warnings.warn("dmscale.adapters.register_post_export is deprecated: write a family "
                  "(dmscale.families.register_family) instead", DeprecationWarning, stacklevel=2)
    _base.register_post_export(applies, fixup)
