"""Deprecated: moved to ``dmscale.app.cli`` (this path goes away in 0.3)."""

import importlib
import sys
import warnings

warnings.warn("dmscale.cli moved to dmscale.app.cli; the old path goes away in 0.3", DeprecationWarning, stacklevel=2)
sys.modules[__name__] = importlib.import_module("dmscale.app.cli")
