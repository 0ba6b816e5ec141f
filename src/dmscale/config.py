"""Deprecated: moved to ``dmscale.app.config`` (this path goes away in 0.3)."""

import importlib
import sys
import warnings

warnings.warn("dmscale.config moved to dmscale.app.config; the old path goes away in 0.3", DeprecationWarning, stacklevel=2)
sys.modules[__name__] = importlib.import_module("dmscale.app.config")
