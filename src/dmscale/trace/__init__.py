"""Tracing: run a model once and label every tensor dimension with a union-find *space*.

``spaces`` (the union-find), ``registry`` (the op-rule table and :func:`op_rule`), ``rules/`` (the
built-in rules, one module per op family), ``tracer`` (the ``TorchFunctionMode`` and ``trace``)
and ``records`` (what a trace returns).

The package itself exports the rule machinery only. The tracer looks up layer specs
(``dmscale.layers``), and layer specs are written with the rule machinery, so the tracer sits above
``dmscale.layers`` and this package must not import it: use ``from dmscale.trace.tracer import trace``.
"""

from .spaces import Space, TraceError
from .records import BlockRecord, LayerRecord, OpRecord, ParamRecord, ReshapeRecord, TraceResult
from .registry import OpCall, op_rule, registered_ops, rule_for, unregister_op_rule

__all__ = ["Space", "TraceResult", "TraceError", "BlockRecord", "LayerRecord", "OpRecord", "ParamRecord",
           "ReshapeRecord", "op_rule", "OpCall", "rule_for", "registered_ops", "unregister_op_rule"]
