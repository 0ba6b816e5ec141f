"""Is a model sharded (FSDP2) or a tensor a DTensor? Torch-only helpers shared by masking, export and distributed."""

from __future__ import annotations

from typing import Any

import torch.distributed as dist
import torch.nn as nn

__all__ = ["is_dtensor", "is_sharded", "fsdp_module_class"]

_DTENSOR: list[type | None] = []


def is_dtensor(t: Any) -> bool:
    """True for a ``torch.distributed.tensor.DTensor`` (also an ``nn.Parameter`` wrapping one)."""
    if not _DTENSOR:
        cls = None
        if dist.is_available():
            try:
                from torch.distributed.tensor import DTensor as cls
            except ImportError:  # pragma: no cover - torch without DTensor
                cls = None
        _DTENSOR.append(cls)
    return _DTENSOR[0] is not None and isinstance(t, _DTENSOR[0])


def fsdp_module_class() -> type | None:
    """``torch.distributed.fsdp.FSDPModule`` (the class ``fully_shard`` mixes in), or None without FSDP2."""
    if not dist.is_available():
        return None
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch without FSDP2
        return None
    return FSDPModule


def is_sharded(model: nn.Module) -> bool:
    """True when ``fully_shard`` was applied to ``model`` or a submodule, or a parameter is a DTensor."""
    fsdp = fsdp_module_class()
    if fsdp is not None and any(isinstance(m, fsdp) for m in model.modules()):
        return True
    return any(is_dtensor(p) for p in model.parameters())
