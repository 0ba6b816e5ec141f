"""Packed sequences: ``pack_padded_sequence`` / ``pad_packed_sequence`` pass the feature dims through;
the packed rows and ``batch_sizes`` are new spaces (the RNN layers themselves are units, see
tests/layers/test_rnn_spec.py)."""

import torch
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from ruletools import free, run_op, same

LENGTHS = torch.tensor([5, 2, 4])


def test_features_pass_through_packing_and_padding():
    def f(x):
        packed = pack_padded_sequence(x, LENGTHS, batch_first=True, enforce_sorted=False)
        return packed.data, pad_packed_sequence(packed, batch_first=True)[0]

    tr, (x,), (data, padded) = run_op(f, torch.randn(3, 5, 6))
    xd = tr.get(x)
    assert data.shape == (11, 6) and same(tr.get(data)[1], xd[2]) and free(xd[2])
    assert padded.shape == (3, 5, 6) and same(tr.get(padded)[2], xd[2])
    assert not tr.unsupported.get("_pack_padded_sequence") and not tr.unsupported.get("_pad_packed_sequence")
