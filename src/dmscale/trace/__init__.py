"""Tracing: run a model once and label every tensor dimension with a union-find *space*."""

from .tracer import (BlockRecord, LayerRecord, OpRecord, ParamRecord, ReshapeRecord, Space, TraceError,
                     TraceResult, is_rmsnorm, layer_kind, trace)

__all__ = ["Space", "TraceResult", "TraceError", "trace", "is_rmsnorm", "layer_kind", "BlockRecord",
           "LayerRecord", "OpRecord", "ParamRecord", "ReshapeRecord"]
