"""Deprecated: moved to ``dmscale.recipes.llm`` (this path goes away in 0.3)."""

import importlib
import sys
import warnings

warnings.warn("dmscale.llm moved to dmscale.recipes.llm; the old path goes away in 0.3", DeprecationWarning, stacklevel=2)
sys.modules[__name__] = importlib.import_module("dmscale.recipes.llm")
