"""Helpers for the op-rule tests (``from ruletools import run_op, same, fixed, free``).

``run_op(fn, *tensors)`` wraps the tensors as parameters of a holder module (so their dims are
owned, unfixed spaces, like a model's weights), runs ``fn`` on them under the tracer and returns
``(tracer, params, output)``; ``tr.get(t)`` then gives the spaces of any tensor seen.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from dmscale.trace.tracer import Space, Tracer


class _Holder(nn.Module):
    def __init__(self, tensors) -> None:
        super().__init__()
        for i, t in enumerate(tensors):
            self.register_parameter(f"p{i}", nn.Parameter(t.clone(), requires_grad=t.is_floating_point()))


def run_op(fn, *tensors):
    holder = _Holder(tensors)
    params = [getattr(holder, f"p{i}") for i in range(len(tensors))]
    tr = Tracer(holder)
    with torch.no_grad(), tr.counter, tr:
        out = fn(*params)
    return tr, params, out


def same(a: Space, b: Space) -> bool:
    return a.find() is b.find()


def fixed(s: Space) -> bool:
    """Every element of the space is unprunable."""
    return all(leaf.fixed for leaf in s.leaves())


def free(s: Space) -> bool:
    """No part of the space is fixed."""
    return not any(leaf.fixed for leaf in s.leaves()) and not s.find().fixed
