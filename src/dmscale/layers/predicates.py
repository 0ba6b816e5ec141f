"""Duck-typed layer classes matched by name or attributes (no imports beyond torch: the tracer uses these)."""

from __future__ import annotations

import torch.nn as nn

__all__ = ["is_rmsnorm", "is_hf_conv1d"]


def is_rmsnorm(m: nn.Module) -> bool:
    """RMSNorm layers (torch's and the many custom classes named like it)."""
    return isinstance(m, getattr(nn, "RMSNorm", ())) or type(m).__name__.endswith("RMSNorm")


def is_hf_conv1d(m: nn.Module) -> bool:
    """Hugging Face's GPT-2 style ``Conv1D``: a Linear whose weight is stored (in, out)."""
    return type(m).__name__ == "Conv1D" and hasattr(m, "nf") and hasattr(m, "weight")
