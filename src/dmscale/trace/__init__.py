"""Tracing: run a model once and label every tensor dimension with a union-find *space*.

``spaces`` (the union-find), ``registry`` (the op-rule table and :func:`op_rule`), ``rules/`` (the
built-in rules, one module per op family), ``tracer`` (the ``TorchFunctionMode`` and :func:`trace`)
and ``records`` (what a trace returns).
"""

from .spaces import Space, TraceError
from .records import BlockRecord, LayerRecord, OpRecord, ParamRecord, ReshapeRecord, TraceResult
from .registry import OpCall, op_rule, registered_ops, rule_for, unregister_op_rule
from .tracer import Tracer, is_rmsnorm, layer_kind, trace

__all__ = ["Space", "TraceResult", "TraceError", "trace", "is_rmsnorm", "layer_kind", "BlockRecord",
           "LayerRecord", "OpRecord", "ParamRecord", "ReshapeRecord", "op_rule", "OpCall", "rule_for",
           "registered_ops", "unregister_op_rule", "Tracer"]
