"""Atomic checkpoints of plain state (tensors, numbers, strings, dicts, lists), loaded without unpickling code."""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

import torch

from dmscale.serialization.atomic import atomic_write_bytes, read_regular_file

__all__ = ["save_checkpoint", "load_checkpoint", "CheckpointError"]


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: missing, corrupted, not a regular file or not a dict, or (checked by the
    recipes) not this model's / run's (keys, shapes, step, seed). The message names the file."""


def save_checkpoint(path: str | os.PathLike[str], state: dict[str, Any]) -> Path:
    """Write ``state`` atomically (temp file, fsync, rename): a crash never leaves a half-written file."""
    buf = io.BytesIO()
    torch.save(state, buf)
    return atomic_write_bytes(path, buf.getvalue())


def load_checkpoint(path: str | os.PathLike[str], map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint with ``weights_only=True`` (no arbitrary code runs), with errors that name the file.

    A FIFO or device is refused without blocking; an empty, truncated or foreign file and one that
    does not hold a dict raise :class:`CheckpointError`.
    """
    p = Path(path)
    try:
        raw = read_regular_file(p, what="checkpoint", exc=CheckpointError)
    except FileNotFoundError:
        raise FileNotFoundError(f"checkpoint not found: {p}") from None
    if not raw:
        raise CheckpointError(f"checkpoint {str(p)!r} is empty (0 bytes): the run was killed while creating it "
                              "or the file was truncated; delete it to restart that phase")
    try:
        state = torch.load(io.BytesIO(bytes(raw)), map_location=map_location, weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"checkpoint {str(p)!r} is corrupted or not a dmscale checkpoint: "
                              f"{type(exc).__name__}: {str(exc)[:300]}") from exc
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {str(p)!r} does not hold a dict (got {type(state).__name__})")
    return state
