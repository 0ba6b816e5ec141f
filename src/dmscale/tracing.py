"""Deprecated: moved to ``dmscale.trace.tracer`` (this path goes away in 0.3)."""

import importlib
import sys
import warnings

warnings.warn("dmscale.tracing moved to dmscale.trace.tracer; the old path goes away in 0.3", DeprecationWarning, stacklevel=2)
sys.modules[__name__] = importlib.import_module("dmscale.trace.tracer")
