"""Helper for the layer tests: prune a model by setting its kept ratios (no training) and export it.

``prune_and_export(model, inputs)`` sets every group's ratio and a random importance, exports, and
checks what every export must satisfy: it equals the hard-masked supernet on the inputs, and its
FLOPs (``dmscale.count``) equal ``dms.resource(soft=False)``.
"""

from __future__ import annotations

import pytest
import torch

import dmscale


def prune_and_export(model, inputs, ratio: float = 0.6, seed: int = 0, example_kwargs=None, **kwargs):
    inputs = inputs if isinstance(inputs, tuple) else (inputs,)
    call = dict(example_kwargs or {})
    dms = dmscale.DMS(model, inputs, dmscale.Target(flops=0.9), total_steps=10, example_kwargs=call, **kwargs)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for g in dms.groups:
            dms.space.ratio(g).fill_(ratio)
            dms.space.importance(g).copy_(torch.rand(g.size, generator=gen))
    small = dms.export()
    model.eval()
    small.eval()
    with torch.no_grad(), dms.hard():
        ref = model(*inputs, **call)
    with torch.no_grad():
        got = small(*inputs, **call)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    assert float(dms.resource(soft=False)["flops"]) == pytest.approx(dmscale.count(small, inputs, call)["flops"], rel=1e-9)
    return dms, small


def load_trusting(path, module: str):
    """``dmscale.load``, trusting the test module that defines the model's classes where the loader asks."""
    import inspect

    if "trust" in inspect.signature(dmscale.load).parameters:
        return dmscale.load(path, trust=[module])
    return dmscale.load(path)


def search_to_budget(model, x, loss_fn, steps: int, flops: float = 0.5):
    """Search ``steps`` steps (Adam on weights and structure, ``loss_fn(output)``), project onto ``flops``, export;
    checks the export lands within [0.9 x, 1 x] of the FLOPs budget and equals the hard-masked supernet."""
    from dmscale.budget import within_budget

    dms = dmscale.DMS(model, (x,), dmscale.Target(flops=flops), total_steps=steps)
    opt = torch.optim.Adam(list(dms.weight_parameters()) + list(dms.structure_parameters()), lr=5e-2)
    for _ in range(steps):
        loss = dms.loss(loss_fn(model(x)))
        opt.zero_grad()
        loss.backward()
        opt.step()
        dms.step()
    dms.project(flops)
    small = dms.export()
    got = dmscale.count(small, (x,))["flops"] / dmscale.count(model, (x,))["flops"]
    assert within_budget(got, flops) and got >= flops * 0.9
    small.eval()
    with torch.no_grad(), dms.hard():
        ref = model.eval()(x)
    torch.testing.assert_close(small(x), ref, atol=1e-5, rtol=1e-5)
    return dms, small
