"""Packed sequences (``pack_padded_sequence`` / ``pad_packed_sequence``): the feature dims pass through.

The RNN layers themselves are traced as units (:mod:`dmscale.layers.rnn`).
"""

from __future__ import annotations

import torch

from ..registry import op_rule


@op_rule("_pack_padded_sequence")
def pack_padded(tr, c) -> None:
    """(T, B, *) or (B, T, *) -> packed data (sum of lengths, *): the feature dims pass through; the
    packed row dim and ``batch_sizes`` are new spaces."""
    x = c.arg(0, "input")
    data, batch_sizes = c.out
    tr.set(data, tr.fresh(data, "packed rows")[:1] + list(tr.get(x))[2:])
    tr.set(batch_sizes, tr.fresh(batch_sizes))


@op_rule("_pad_packed_sequence")
def pad_packed(tr, c) -> None:
    """Packed data (rows, *) -> padded (T, B, *) or (B, T, *): the feature dims pass through."""
    data = c.arg(0, "data")
    padded, lengths = c.out
    tr.set(padded, tr.fresh(padded, "padded")[:2] + list(tr.get(data))[1:])
    if isinstance(lengths, torch.Tensor):
        tr.set(lengths, tr.fresh(lengths))
