"""EfficientNet: MBConv blocks whose widths and repeats the config derives from ``width_coefficient`` /
``depth_coefficient``, so a searched width or depth cannot be written in it (the config check marks
such an export inexact: store it with ``dmscale.save``). The squeeze-excitation sizes are updated."""

from .base import Family, register_family, set_attrs


class EfficientNet(Family):
    model_types = ("efficientnet",)

    def describe(self) -> str:
        return "channels of every block (expansion, squeeze-excitation, projection), blocks"

    def update(self, ctx):
        for mod in ctx.exported.modules():
            if hasattr(mod, "dim_se") and hasattr(mod, "reduce") and hasattr(mod, "expand"):
                set_attrs(mod, {"dim": int(mod.reduce.weight.shape[1]), "dim_se": int(mod.reduce.weight.shape[0])})


EFFICIENTNET = register_family(EfficientNet())
