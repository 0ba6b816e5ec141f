"""ConvNeXt V1/V2: stages (``encoder.stages.i.layers``) of depthwise-conv blocks with an inverted FFN
(``pwconv1``/``pwconv2``, V2 with a global response norm). The config describes a stage by
``depths[i]`` and ``hidden_sizes[i]``; the FFN is always 4 x the stage width there."""

from .base import register_family
from .common import Stack, Transformer
from .generic import out_features


class ConvNext(Transformer):
    model_types = ("convnext", "convnextv2")
    searched = "stage widths, blocks per stage, FFN (V1; V2 pending a GRN rule)"
    hidden_keys = ()
    stacks = (Stack("layers", "depths[]", lists=()),)

    def extra(self, ctx, hidden):
        widths = list(getattr(ctx.orig_config, "hidden_sizes", []))
        names = ctx.find_stacks("encoder.stages")
        stages = ctx.exported.get_submodule(names[0]) if names else []
        for j, stage in enumerate(stages):
            for layer in stage.layers:
                widths[j] = int(layer.dwconv.weight.shape[0])
                if out_features(layer.pwconv1) != 4 * widths[j]:
                    ctx.inexact.append("ConvNeXt's config fixes the FFN width at 4 x the stage width")
            ds = getattr(stage, "downsampling_layer", None)
            convs = [m for m in ds.modules() if hasattr(m, "out_channels")] if ds is not None else []
            if convs:
                widths[j] = int(convs[-1].weight.shape[0])
        if widths:
            ctx.set_config("hidden_sizes", widths)


CONVNEXT = register_family(ConvNext())
