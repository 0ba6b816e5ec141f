"""μpscaling: widen a trained model into one computing the same function, with μP relative to a fixed base.

``set_base`` records each parameter's μP base width on a model; ``upscale`` widens a model and keeps
its base; ``mup_optimizer`` / ``mup_param_groups`` give μP learning rates from the record;
``upscale_optimizer_state`` carries optimizer state into the wide model; ``coord_check`` measures
per-layer activation and update sizes across widths.
"""

from .plan import UpscaleError
from .base import ScaledReadout, infer_width_info, multipliers, set_base, width_info
from .upscale import NOISE_FORMS, upscale, upscale_maps, upscale_optimizer_state
from .optim import mup_factors, mup_optimizer, mup_param_groups
from .coord import coord_check, plot_coord_check

__all__ = ["set_base", "width_info", "multipliers", "upscale", "upscale_optimizer_state", "upscale_maps",
           "NOISE_FORMS", "UpscaleError", "ScaledReadout", "mup_optimizer", "mup_param_groups", "mup_factors",
           "coord_check", "plot_coord_check", "infer_width_info"]
