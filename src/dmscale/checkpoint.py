"""Deprecated: moved to ``dmscale.serialization.checkpoint`` (this path goes away in 0.3)."""

import importlib
import sys
import warnings

warnings.warn("dmscale.checkpoint moved to dmscale.serialization.checkpoint; the old path goes away in 0.3", DeprecationWarning, stacklevel=2)
sys.modules[__name__] = importlib.import_module("dmscale.serialization.checkpoint")
