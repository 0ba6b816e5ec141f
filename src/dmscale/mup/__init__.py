"""μpscaling: widen a trained model into one computing the same function, and μP optimizer scaling."""

from .upscale import UpscaleError, set_width_info, upscale, upscale_optimizer_state, width_info
from .optim import coord_check, infer_width_info, mup_factors, mup_optimizer, mup_param_groups

__all__ = ["upscale", "width_info", "set_width_info", "upscale_optimizer_state", "UpscaleError", "mup_optimizer",
           "mup_param_groups", "mup_factors", "coord_check", "infer_width_info"]
