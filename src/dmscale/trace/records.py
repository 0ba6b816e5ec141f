"""What a trace produces: records of parameters, known layers, FLOP-carrying ops, removable blocks."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .spaces import Space

if TYPE_CHECKING:
    from ..layers.spec import LayerSpec

__all__ = ["OpRecord", "ParamRecord", "LayerRecord", "BlockRecord", "ReshapeRecord", "SizeAttrRecord", "LostDim",
           "TraceResult"]


@dataclass
class OpRecord:
    """A FLOP-carrying op: its FLOPs at full size and the dim spaces its FLOPs scale with."""

    name: str
    flops: float
    dims: list[Space]
    blocks: tuple[str, ...]
    module: str


@dataclass
class ParamRecord:
    """A parameter or buffer with the space of each of its dims."""

    name: str  # qualified name in the model
    module: str
    attr: str
    dims: list[Space]
    is_buffer: bool
    blocks: tuple[str, ...] = ()
    raw: bool = False  # used outside a known layer (needs a parametrisation to be masked)


@dataclass
class LayerRecord:
    """A known layer (one with a :class:`~dmscale.layers.LayerSpec`): where its output channels are."""

    module: str
    kind: str
    out_dims: dict[int, Space]  # negative dim index of the layer's output -> space
    norm_space: Space | None = None  # for LN/RMSNorm: the normalised (last) dim
    blocks: tuple[str, ...] = ()
    tied: bool = False  # weight shared with another module: mask values cannot be folded into it
    spec: "LayerSpec | None" = None  # the spec that describes this layer


@dataclass
class BlockRecord:
    """A removable residual block inside a container (ModuleList / Sequential)."""

    name: str
    container: str
    index: int
    input_spec: tuple[str, Any]  # ('arg', i) or ('kw', name)
    declared: bool = False  # named by the user (no residual check; replaced by SkipBlock on export)


@dataclass
class ReshapeRecord:
    """An explicit int in a view/reshape that sized a split dimension (for attribute updates)."""

    module: str
    value: int
    space: Space


@dataclass
class SizeAttrRecord:
    """An attribute of a module that holds the kept size of a space (a grouped conv's ``groups``)."""

    module: str
    attr: str
    space: Space


@dataclass
class LostDim:
    """A dimension that could have been searched but is fixed: what fixed it and what that costs.

    ``size`` is the number of elements of the dimension (channels, heads); ``params`` the number
    of parameter elements in the tensors that have it (what pruning it would have shrunk);
    ``reasons`` name the op and the module that fixed it; ``members`` the parameter dims in it.
    """

    name: str
    size: int
    params: int
    reasons: list[str]
    members: list[str]

    def __str__(self) -> str:
        why = "; ".join(self.reasons) or "fixed"
        return f"{self.name} ({self.size} elements, {self.params:,} parameters): {why}"


@dataclass
class TraceResult:
    """Everything the search and export need to know about the model's dimensions."""

    params: dict[str, ParamRecord]
    layers: dict[str, LayerRecord]
    ops: list[OpRecord]
    blocks: list[BlockRecord]
    reshapes: list[ReshapeRecord]
    unsupported: dict[str, list[str]]  # op name -> modules where seen
    total_flops: float
    size_attrs: list[SizeAttrRecord] = field(default_factory=list)
    lost: list[LostDim] = field(default_factory=list)  # searchable-looking dims that are fixed, and why

    def lost_text(self) -> str:
        """The lost dimensions, one per line (empty when none)."""
        return "".join(f"\n  {d}" for d in self.lost)
