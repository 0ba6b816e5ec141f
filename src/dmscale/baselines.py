"""Deprecated: moved to ``dmscale.recipes.baselines`` (this path goes away in 0.3)."""

import importlib
import sys
import warnings

warnings.warn("dmscale.baselines moved to dmscale.recipes.baselines; the old path goes away in 0.3", DeprecationWarning, stacklevel=2)
sys.modules[__name__] = importlib.import_module("dmscale.recipes.baselines")
