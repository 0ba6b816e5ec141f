"""Tensor creation: new tensors get new *fixed* spaces (export could not slice data made at run time).

``*_like`` of the same shape as its source is the exception: it shares the source's spaces. So
are zeros (``torch.zeros``, ``x.new_zeros``), e.g. an RNN's initial state: any slice of zeros is
zeros, so their dims may join a searched one; the ints that sized them are recorded so export
updates the attribute they came from (the export check catches a size it could not update).
"""

from __future__ import annotations

import torch

from ..registry import op_rule, tensors

LIKE = ("new_ones", "new_empty", "new_full", "new_tensor", "zeros_like", "ones_like",
        "empty_like", "full_like", "rand_like", "randn_like", "randint_like")
FACTORIES = ("arange", "ones", "empty", "full", "rand", "randn", "tensor", "as_tensor", "linspace",
             "outer", "polar", "complex", "view_as_real", "view_as_complex", "multinomial", "nonzero")
ZEROS = ("zeros", "new_zeros")


@op_rule(*LIKE)
def like(tr, c) -> None:
    """``x.*_like`` with x's shape: x's spaces. Otherwise (``new_*``, other shapes): new fixed spaces."""
    src = c.args[0] if c.args and isinstance(c.args[0], torch.Tensor) else None
    for t in tensors(c.out):
        if c.name.endswith("_like") and src is not None and t.shape == src.shape:
            tr.set(t, list(tr.get(src)))
        else:
            tr.set(t, tr.fresh(t, fixed=True))


@op_rule(*ZEROS)
def zeros(tr, c) -> None:
    """New unfixed spaces (see the module docstring); explicit int sizes are recorded for export."""
    for t in tensors(c.out):
        tr.set(t, tr.fresh(t, c.name))
    size = c.args[1:] if c.name == "new_zeros" else c.args
    if len(size) == 1 and isinstance(size[0], (tuple, list, torch.Size)):
        size = tuple(size[0])
    if isinstance(c.out, torch.Tensor) and len(size) == c.out.dim():
        for n, s in zip(size, tr.get(c.out)):
            if type(n) is int and n > 1:
                tr.record_reshape(n, s)


@op_rule(*FACTORIES)
def factory(tr, c) -> None:
    """Every output gets new fixed spaces; the inputs (if any) are not coupled or fixed."""
    for t in tensors(c.out):
        tr.set(t, tr.fresh(t, fixed=True))
