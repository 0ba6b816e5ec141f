"""Pooling and resampling: channel and batch dims pass through; the spatial dims become new spaces."""

from __future__ import annotations

from ..registry import op_rule, tensors
from ..spaces import fix
from .conv import spatial

# op name -> number of trailing spatial dims (-1: every dim after batch and channel)
SPATIAL_DIMS = {
    "avg_pool1d": 1, "avg_pool2d": 2, "avg_pool3d": 3, "max_pool1d": 1, "max_pool2d": 2, "max_pool3d": 3,
    "adaptive_avg_pool1d": 1, "adaptive_avg_pool2d": 2, "adaptive_avg_pool3d": 3, "adaptive_max_pool1d": 1,
    "adaptive_max_pool2d": 2, "adaptive_max_pool3d": 3, "_max_pool1d": 1, "_max_pool2d": 2, "_max_pool3d": 3,
    "max_pool1d_with_indices": 1, "max_pool2d_with_indices": 2, "max_pool3d_with_indices": 3,
    "_adaptive_max_pool1d": 1, "_adaptive_max_pool2d": 2, "_adaptive_max_pool3d": 3, "lp_pool2d": 2, "lp_pool1d": 1,
    "pixel_shuffle": -1, "pixel_unshuffle": -1, "upsample": -1, "interpolate": -1, "upsample_nearest": -1, "upsample_bilinear": -1,
    "fractional_max_pool2d": 2, "fractional_max_pool2d_with_indices": 2,
}


@op_rule(*SPATIAL_DIMS)
def pool(tr, c) -> None:
    """Leading (batch, channel) dims pass through; spatial dims are new spaces. Outputs of another
    rank get fresh spaces. ``pixel_shuffle`` / ``pixel_unshuffle`` move channels into space (or back): the
    input's and the output's channel dims (C and C / r^2, or C x r^2) are both fixed."""
    src = c.args[0] if c.args else c.kwargs["input"]
    k = SPATIAL_DIMS[c.name]
    k = src.dim() - 2 if k < 0 else k
    sd = list(tr.get(src))
    shuffle = c.name in ("pixel_shuffle", "pixel_unshuffle")
    for o in tensors(c.out):
        if shuffle and o.dim() == src.dim() >= 3:
            channels = tr.fresh(o, c.name, fixed=True)[-3]  # fixed (with the reason) when larger than 1
            tr.set(o, sd[:-3] + [channels] + [spatial(n) for n in o.shape[-2:]])
        elif o.dim() == src.dim():
            tr.set(o, sd[: o.dim() - k] + [spatial(n) for n in o.shape[o.dim() - k:]])
        else:
            tr.set(o, tr.fresh(o))
    if shuffle and src.dim() >= 3:
        fix(sd[-3], c.name)
