"""Ops that only read metadata (sizes, dtype, strides, Python conversions): no labels, nothing fixed."""

from __future__ import annotations

from ..registry import op_rule

METADATA = (
    "dim", "size", "numel", "__len__", "item", "tolist", "__bool__", "__index__", "__int__", "__float__",
    "__format__", "__hash__", "__repr__", "is_floating_point", "is_contiguous", "element_size", "stride",
    "data_ptr", "__contains__", "is_complex", "get_device",
)


@op_rule(*METADATA)
def metadata(tr, c) -> None:
    """Couples and fixes nothing (these ops return no tensor; a tensor result is left unlabelled)."""
    return None
