"""dmscale: scale neural networks to a budget in both directions.

Down: Differentiable Model Scaling (``DMS``) searches width and depth under a FLOPs/params
target and exports a physically smaller model. Up: ``upscale`` widens a trained model into a
larger one computing the same function, with μP optimizer scaling (``mup_optimizer``).

``import dmscale`` loads the core, μP and serialization layers only (torch, numpy,
safetensors). Names from the recipes and app layers are imported on first use.
"""

from __future__ import annotations

import importlib
import sys

from .export import ExportError
from .resources import count
from .schedule import Schedule, Target
from .search import DMS, DMSConfig
from .space import GroupBounds
from .topk import differentiable_topk
from .trace import TraceError
from .layers import LayerSpec, register_layer
from . import families  # noqa: F401  (Hugging Face model families and the layer specs they register)
from .mup import (UpscaleError, coord_check, infer_width_info, mup_optimizer, mup_param_groups, set_base, upscale,
                  upscale_optimizer_state, width_info)
from .serialization import LoadError, load, save

__version__ = "0.1.0"

__all__ = ["DMS", "DMSConfig", "recalibrate_bn", "Target", "Schedule", "GroupBounds", "count", "save", "load",
           "LoadError", "differentiable_topk",
           "ExportError", "TraceError", "__version__", "upscale", "width_info", "upscale_optimizer_state",
           "UpscaleError", "mup_optimizer", "mup_param_groups", "coord_check", "infer_width_info", "register_layer",
           "LayerSpec", "set_base"]

# Names that live in upper layers (recipes, app): imported lazily so that `import dmscale` stays light.
_LAZY: dict[str, str] = {"recalibrate_bn": "dmscale.recipes.bn"}

# Modules that moved in 0.2: the old import paths keep working for one release.
_MOVED = {
    "tracing": "dmscale.trace.tracer",
    "io": "dmscale.serialization.format",
    "checkpoint": "dmscale.serialization.checkpoint",
    "llm": "dmscale.recipes.llm",
    "baselines": "dmscale.recipes.baselines",
    "pipelines": "dmscale.app.pipelines",
    "config": "dmscale.app.config",
    "cli": "dmscale.app.cli",
    "data": "dmscale.app.datasets",
    "zoo": "dmscale.app.zoo",
    "report": "dmscale.app.report",
}


# `dmscale.upscale` is the function; its old module path still imports (without rebinding it).
sys.modules.setdefault(__name__ + ".upscale", sys.modules[__name__ + ".mup.upscale"])


def __getattr__(name: str):
    if name in _LAZY:
        mod = importlib.import_module(_LAZY[name])
        val = getattr(mod, name)
        globals()[name] = val
        return val
    if name in _MOVED:
        import warnings

        warnings.warn(f"dmscale.{name} moved to {_MOVED[name]}; the old path goes away in 0.3",
                      DeprecationWarning, stacklevel=2)
        return importlib.import_module(_MOVED[name])
    raise AttributeError(f"module 'dmscale' has no attribute {name!r}")
