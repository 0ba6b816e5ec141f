"""LSTM / GRU / RNN: the hidden size is searched (one space for every layer and direction; the gate-
stacked weights are concatenations of it), masked exactly through the weights, and exported with
``hidden_size`` / ``proj_size`` and the flat weight list updated."""

import pytest
import torch
import torch.nn as nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from dmscale.layers import spec_for
from dmscale.trace.tracer import trace

from prunetools import prune_and_export


class Classifier(nn.Module):
    def __init__(self, rnn: nn.Module, out: int) -> None:
        super().__init__()
        self.emb = nn.Embedding(30, 6)
        self.rnn = rnn
        self.fc = nn.Linear(out, 3)

    def forward(self, x):
        y, _ = self.rnn(self.emb(x))
        return self.fc(y[:, -1])


RNNS = [
    (lambda: nn.LSTM(6, 8, batch_first=True), 8),
    (lambda: nn.GRU(6, 8, num_layers=2, batch_first=True), 8),
    (lambda: nn.RNN(6, 8, batch_first=True, nonlinearity="relu"), 8),
    (lambda: nn.LSTM(6, 8, num_layers=2, bidirectional=True, batch_first=True), 16),
    (lambda: nn.GRU(6, 8, bidirectional=True, batch_first=True), 16),
    (lambda: nn.LSTM(6, 8, proj_size=5, batch_first=True), 5),
]


@pytest.mark.parametrize("make,out", RNNS)
def test_hidden_size_is_searched_and_exported(make, out):
    torch.manual_seed(0)
    model = Classifier(make(), out)
    x = torch.randint(0, 30, (3, 7))
    dms, small = prune_and_export(model, (x,))
    kinds = {g.name: (g.kind, g.size) for g in dms.groups}
    assert kinds["rnn"] == ("width", 5 if out == 5 else 8)
    rnn = small.rnn
    assert rnn.hidden_size < 8 or (out == 5 and rnn.proj_size < 5)
    gates = {"LSTM": 4, "GRU": 3}.get(type(rnn).__name__, 1)
    assert rnn.weight_hh_l0.shape[0] == gates * rnn.hidden_size
    assert all(a is b for a, b in zip(rnn._flat_weights, [getattr(rnn, n) for n in rnn._flat_weights_names]))
    assert not dms.trace.lost


def test_gate_blocks_are_copies_of_the_hidden_space():
    model = Classifier(nn.LSTM(6, 8, num_layers=2, batch_first=True), 8)
    res = trace(model, (torch.randint(0, 30, (2, 5)),))
    p = res.params
    h = p["rnn.weight_hh_l0"].dims[1].find()
    for name in ("rnn.weight_ih_l0", "rnn.weight_hh_l1", "rnn.bias_ih_l1"):
        gates = p[name].dims[0].find()
        assert gates.kind == "concat" and len(gates.children) == 4 and all(c.find() is h for c in gates.children)
    assert p["rnn.weight_ih_l1"].dims[1].find() is h and p["fc.weight"].dims[1].find() is h
    assert p["rnn.weight_ih_l0"].dims[1].find() is p["emb.weight"].dims[1].find()
    assert all(r.raw for n, r in p.items() if n.startswith("rnn."))
    assert spec_for(model.rnn).kind == "rnn"


class WithState(nn.Module):
    """Initial states made with zeros of the module's own ``hidden`` attribute."""

    def __init__(self) -> None:
        super().__init__()
        self.hidden = 8
        self.inp = nn.Linear(4, 6)
        self.rnn = nn.LSTM(6, self.hidden)
        self.fc = nn.Linear(self.hidden, 2)

    def forward(self, x):
        h0 = torch.zeros(1, x.shape[1], self.hidden)
        c0 = torch.zeros(1, x.shape[1], self.hidden)
        y, (h, c) = self.rnn(self.inp(x), (h0, c0))
        return self.fc(h[-1] + c[-1])


def test_zero_initial_states_follow_the_hidden_size():
    torch.manual_seed(0)
    model = WithState()
    dms, small = prune_and_export(model, (torch.randn(5, 3, 4),))
    assert small.hidden == small.rnn.hidden_size < 8


class Packed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(3, 6)
        self.rnn = nn.GRU(6, 8, batch_first=True)
        self.fc = nn.Linear(8, 2)

    def forward(self, x, lengths):
        packed = pack_padded_sequence(self.inp(x), lengths, batch_first=True, enforce_sorted=False)
        y, _ = self.rnn(packed)
        y, _ = pad_packed_sequence(y, batch_first=True)
        return self.fc(y)


def test_packed_sequences():
    torch.manual_seed(0)
    dms, small = prune_and_export(Packed(), (torch.randn(3, 5, 3), torch.tensor([5, 2, 4])))
    assert small.rnn.hidden_size < 8 and small.inp.out_features < 6


def test_masks_out_restore_the_flat_weights():
    model = Classifier(nn.LSTM(6, 8, batch_first=True), 8)
    x = torch.randint(0, 30, (3, 7))
    ref = model(x)
    dms, _ = prune_and_export(model, (x,))
    dms.remove()
    rnn = model.rnn
    assert all(a is b for a, b in zip(rnn._flat_weights, [getattr(rnn, n) for n in rnn._flat_weights_names]))
    model.train()
    torch.testing.assert_close(model(x), ref)
