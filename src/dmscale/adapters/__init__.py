"""Deprecated: per-family export knowledge moved to :mod:`dmscale.families` (one file per HF model type).

``register_post_export`` still registers a fix-up ``fixup(dms, exported_model)`` that export runs on
models for which ``applies(original_model)`` is true (after the family's updates, before the export
check); ``dmscale.adapters.hf_llm`` re-exports the layer helpers from :mod:`dmscale.families.generic`.
This module goes away in 0.3.
"""

from __future__ import annotations

from typing import Any, Callable

import torch.nn as nn

__all__ = ["register_post_export", "post_export_fixups"]

_FIXUPS: list[tuple[Callable[[nn.Module], bool], Callable[[Any, nn.Module], None]]] = []


def register_post_export(applies: Callable[[nn.Module], bool], fixup: Callable[[Any, nn.Module], None]) -> None:
    """Register a fix-up run on exported models for which ``applies(original_model)`` is true."""
    import warnings

    warnings.warn("dmscale.adapters.register_post_export is deprecated: write a family "
                  "(dmscale.families.register_family) instead", DeprecationWarning, stacklevel=2)
    _FIXUPS.append((applies, fixup))


def post_export_fixups(dms: Any, exported: nn.Module) -> None:
    """Run the registered fix-ups that apply to this model."""
    for applies, fixup in _FIXUPS:
        if applies(dms.model):
            fixup(dms, exported)
