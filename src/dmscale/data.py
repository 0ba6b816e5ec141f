"""Deprecated: moved to ``dmscale.app.datasets`` (this path goes away in 0.3)."""

import importlib
import sys
import warnings

warnings.warn("dmscale.data moved to dmscale.app.datasets; the old path goes away in 0.3", DeprecationWarning, stacklevel=2)
sys.modules[__name__] = importlib.import_module("dmscale.app.datasets")
