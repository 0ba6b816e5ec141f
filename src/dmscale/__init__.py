"""dmscale: scale neural networks to a budget in both directions.

Down: Differentiable Model Scaling (``DMS``) searches width and depth under a FLOPs/params
target and exports a physically smaller model. Up: ``upscale`` widens a trained model into a
larger one computing the same function, with μP optimizer scaling (``mup_optimizer``).
"""

from .export import ExportError
from .io import load, save
from .resources import count
from .schedule import Schedule, Target
from .search import DMS
from .space import GroupBounds
from .topk import differentiable_topk
from .tracing import TraceError

__version__ = "0.1.0"

__all__ = ["DMS", "Target", "Schedule", "GroupBounds", "count", "save", "load", "differentiable_topk",
           "ExportError", "TraceError", "__version__"]

from .mup import coord_check, infer_width_info, mup_optimizer, mup_param_groups
from .upscale import UpscaleError, upscale, upscale_optimizer_state, width_info

__all__ += ["upscale", "width_info", "upscale_optimizer_state", "UpscaleError", "mup_optimizer",
            "mup_param_groups", "coord_check", "infer_width_info"]
