"""Atomic checkpoints of plain state (tensors, numbers, strings, dicts, lists), loaded without unpickling code."""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

import torch

from dmscale.serialization.format import atomic_write_bytes

__all__ = ["save_checkpoint", "load_checkpoint"]


def save_checkpoint(path: str | os.PathLike[str], state: dict[str, Any]) -> Path:
    """Write ``state`` atomically (temp file, fsync, rename): a crash never leaves a half-written file."""
    buf = io.BytesIO()
    torch.save(state, buf)
    return atomic_write_bytes(path, buf.getvalue())


def load_checkpoint(path: str | os.PathLike[str], map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint with ``weights_only=True`` (no arbitrary code runs), with clear errors."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"checkpoint not found: {p}")
    try:
        state = torch.load(p, map_location=map_location, weights_only=True)
    except Exception as exc:
        raise ValueError(f"checkpoint {p} is corrupted or not a dmscale checkpoint: {exc}") from exc
    if not isinstance(state, dict):
        raise ValueError(f"checkpoint {p} does not hold a dict (got {type(state).__name__})")
    return state
