"""Deprecated: moved to ``dmscale.serialization.format`` (this path goes away in 0.3)."""

import importlib
import sys
import warnings

warnings.warn("dmscale.io moved to dmscale.serialization.format; the old path goes away in 0.3", DeprecationWarning, stacklevel=2)
sys.modules[__name__] = importlib.import_module("dmscale.serialization.format")
