"""Layer specs: one :class:`LayerSpec` per layer type says how dmscale traces, masks, exports,
describes and widens it. ``dmscale.register_layer(MyLayer, spec)`` adds a user's own class.
"""

from .spec import (LayerSpec, TensorWidening, Widening, layer_kind, register_layer, register_matcher, spec_for,
                   unregister_layer)
from .predicates import is_hf_conv1d, is_rmsnorm
from .builtin import linear_unit, opaque_unit
from .norms import NormForm, identify_norm, norm_candidate, norm_spec
from .rnn import RNN_SPEC
from .mha import MULTIHEAD_ATTENTION, PrunedMultiheadAttention
from .grn import GRN_SPEC, is_grn

__all__ = ["LayerSpec", "Widening", "TensorWidening", "register_layer", "unregister_layer", "register_matcher",
           "spec_for", "layer_kind", "linear_unit", "opaque_unit", "is_rmsnorm", "is_hf_conv1d", "NormForm", "identify_norm",
           "norm_candidate", "norm_spec", "RNN_SPEC", "MULTIHEAD_ATTENTION", "PrunedMultiheadAttention", "GRN_SPEC", "is_grn"]
