"""BatchNorm recalibration: re-estimate running statistics of a pruned (exported or masked) network.

A search (or one-shot pruning) changes which channels feed every BatchNorm, so the running
statistics the trained supernet accumulated no longer describe the network that will be evaluated.
``recalibrate_bn`` resets them and re-estimates them from a few batches as an exact average
(``momentum=None``), with the rest of the model in eval mode (dropout off) and no gradients.
"""

from __future__ import annotations

import contextlib
import numbers
from typing import Any, Callable, Iterable, Iterator

import torch
import torch.nn as nn
from torch.utils._pytree import tree_map

__all__ = ["recalibrate_bn", "batchnorms"]


def batchnorms(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """The BatchNorm layers of a model that keep running statistics."""
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


def _batches(batches: Iterable[Any] | Callable[[int], Any], num_batches: int | None) -> Iterator[Any]:
    if callable(batches) and not hasattr(batches, "__iter__"):
        if num_batches is None:
            raise ValueError("recalibrate_bn: batches is a function step -> batch, so num_batches is required")
        for i in range(num_batches):
            yield batches(i)
        return
    try:
        it = iter(batches)  # type: ignore[arg-type]
    except TypeError:
        raise TypeError("recalibrate_bn: batches must be an iterable of batches or a function step -> batch, "
                        f"got {type(batches).__name__}") from None
    for i, b in enumerate(it):
        if num_batches is not None and i >= num_batches:
            return
        yield b


def _to(obj: Any, device: torch.device | None) -> Any:
    if device is None:
        return obj
    return tree_map(lambda t: t.to(device) if isinstance(t, torch.Tensor) else t, obj)


def _run(model: nn.Module, batch: Any, device: torch.device | None, index: int) -> None:
    """One forward: a tensor is the input; (x, y, ...) uses x; a dict is passed as keyword arguments."""
    if isinstance(batch, torch.Tensor):
        model(_to(batch, device))
    elif isinstance(batch, (tuple, list)) and batch:
        x = batch[0]
        if isinstance(x, dict):
            model(**_to(x, device))
        elif isinstance(x, (tuple, list)):
            model(*_to(x, device))
        else:
            model(_to(x, device))
    elif isinstance(batch, dict):
        model(**_to(batch, device))
    else:
        raise TypeError(f"recalibrate_bn: batch {index} is a {type(batch).__name__}; expected a tensor, an (x, y) "
                        "tuple or a dict of keyword inputs")


@torch.no_grad()
def recalibrate_bn(model: Any, batches: Iterable[Any] | Callable[[int], Any], num_batches: int | None = None) -> Any:
    """Reset and re-estimate the running mean/var of every BatchNorm in ``model`` from ``batches``.

    ``model`` is an ``nn.Module`` (an export) or a ``dmscale.DMS`` (its model is run with hard
    masks, i.e. as the export will compute). ``batches`` is an iterable of inputs, ``(x, y)`` tuples
    or dicts of keyword inputs, or a function ``step -> batch`` (then ``num_batches`` is required);
    ``num_batches`` caps how many are used. The statistics become the exact average over the
    batches (per-batch mean, unbiased per-batch variance, as BatchNorm's cumulative mode computes).
    A model without BatchNorm is returned untouched (no batch is read). If no batch arrives or a
    forward fails, the previous statistics are restored. Returns ``model``.
    """
    from ..search import DMS

    dms = model if isinstance(model, DMS) else None
    net = dms.model if dms is not None else model
    if not isinstance(net, nn.Module):
        raise TypeError(f"recalibrate_bn: model must be an nn.Module or a dmscale.DMS, got {type(model).__name__}")
    if num_batches is not None and (isinstance(num_batches, bool) or not isinstance(num_batches, numbers.Integral)
                                    or num_batches < 1):
        raise ValueError(f"recalibrate_bn: num_batches must be a positive integer or None, got {num_batches!r}")
    bns = batchnorms(net)
    if not bns:
        return model
    p0 = next(iter(net.parameters()), None)
    device = p0.device if p0 is not None else None
    saved = [(m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone(), m.momentum) for m in bns]
    modes = {m: m.training for m in net.modules()}
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the batches
    net.eval()
    for m in bns:
        m.train()
    seen = 0
    ok = False
    try:
        with dms.hard() if dms is not None else contextlib.nullcontext():
            for i, batch in enumerate(_batches(batches, num_batches)):
                _run(net, batch, device, i)
                seen += 1
        if seen == 0:
            raise ValueError("recalibrate_bn: no batch was given (empty iterable); the statistics are unchanged")
        ok = True
    finally:
        for m, (mean, var, nbt, mom) in zip(bns, saved):
            m.momentum = mom
            if not ok:
                m.running_mean.copy_(mean)
                m.running_var.copy_(var)
                m.num_batches_tracked.copy_(nbt)
        for m, mode in modes.items():
            m.training = mode
    return model
