"""Errors shared by the core modules (no imports: every layer may raise them)."""

from __future__ import annotations

__all__ = ["ExportError"]


class ExportError(RuntimeError):
    """The exported model does not compute what the hard-masked supernet computes, or its config would not load."""
