"""Deprecated: moved to ``dmscale.recipes.baselines`` (``uniform_width_model``: ``dmscale.app.pipelines``); this
path goes away in 0.3."""

import importlib
import warnings

warnings.warn("dmscale.baselines moved to dmscale.recipes.baselines; the old path goes away in 0.3", DeprecationWarning, stacklevel=2)
_new = importlib.import_module("dmscale.recipes.baselines")
bisect_max = _new.bisect_max
one_shot_prune = _new.one_shot_prune
uniform_width = _new.uniform_width
__all__ = ["bisect_max", "one_shot_prune", "uniform_width"]  # + uniform_width_model (lazy, below)


def __getattr__(name: str):
    if name == "uniform_width_model":  # needs a run directory: an app function now
        return importlib.import_module("dmscale.app.pipelines").uniform_width_model
    return getattr(_new, name)
