"""Per-family knowledge that tracing cannot infer: fix-ups applied to an exported model.

An adapter is a function ``fixup(dms, exported_model) -> None`` that edits the export in place
(e.g. a Hugging Face config's sizes, per-layer indices after layers were removed). Adapters
register themselves with ``register_post_export``; ``export_model`` runs every one whose
``applies(model)`` is true, before the export is checked against the hard-masked supernet.
"""

from __future__ import annotations

from typing import Any, Callable

import torch.nn as nn

__all__ = ["register_post_export", "post_export_fixups"]

_FIXUPS: list[tuple[Callable[[nn.Module], bool], Callable[[Any, nn.Module], None]]] = []


def register_post_export(applies: Callable[[nn.Module], bool], fixup: Callable[[Any, nn.Module], None]) -> None:
    """Register a fix-up run on exported models for which ``applies(original_model)`` is true."""
    _FIXUPS.append((applies, fixup))


def post_export_fixups(dms: Any, exported: nn.Module) -> None:
    """Run the registered fix-ups that apply to this model."""
    _load_builtin()
    for applies, fixup in _FIXUPS:
        if applies(dms.model):
            fixup(dms, exported)


_loaded = False


def _load_builtin() -> None:
    """Import the built-in adapters (optional dependencies stay optional)."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    import importlib

    for mod in ("dmscale.adapters.hf_llm",):
        try:
            importlib.import_module(mod)
        except ImportError:
            pass
