"""Packed sequences: ``pack_padded_sequence`` / ``pad_packed_sequence`` pass the feature dims through
(the RNN layers are units, see tests/layers/test_rnn_spec.py)."""

import torch
import torch.nn as nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from dmscale.trace import trace


class Packed(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Linear(3, 6)
        self.rnn = nn.GRU(6, 8, batch_first=True)
        self.fc = nn.Linear(8, 2)

    def forward(self, x, lengths):
        packed = pack_padded_sequence(self.emb(x), lengths, batch_first=True, enforce_sorted=False)
        out, _ = self.rnn(packed)
        out, _ = pad_packed_sequence(out, batch_first=True)
        return self.fc(out)


def test_features_pass_through_packing():
    res = trace(Packed(), (torch.randn(3, 5, 3), torch.tensor([5, 2, 4])))
    p = res.params
    assert p["rnn.weight_ih_l0"].dims[1].find() is p["emb.weight"].dims[0].find()
    assert p["fc.weight"].dims[1].find() is p["rnn.weight_hh_l0"].dims[1].find()
    assert not p["emb.weight"].dims[0].find().fixed and not p["fc.weight"].dims[1].find().fixed
    assert not res.lost
