"""No silent loss: every dimension that could have been searched but is fixed is listed on the trace
result (with the op, the module and the elements lost), named in ONE warning by ``DMS`` and in
``dms.summary()``; dims fixed by the model's contract (inputs, outputs, vocabulary) are not losses.
FLOPs of ops without a rule are still removed with their block."""

import warnings

import torch
import torch.nn as nn

import dmscale
from dmscale.trace.tracer import trace


class Flipper(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 16)
        self.b = nn.Linear(16, 8)
        self.c = nn.Linear(8, 3)

    def forward(self, x):
        return self.c(torch.relu(self.b(self.a(x).flip(-1))))  # flip has no rule


def test_lost_dims_name_op_module_and_elements():
    res = trace(Flipper(), (torch.randn(2, 4),))
    assert [d.name for d in res.lost] == ["a", "b"]  # a's channels, and b's input (a's channels, flipped)
    a, b = res.lost
    assert a.size == b.size == 16 and a.params == 16 * 4 + 16 and b.params == 8 * 16
    assert any("unsupported op 'flip' in model" in r for r in a.reasons) and a.members == ["a.weight:0", "a.bias:0"]
    assert "a (16 elements, 80 parameters): unsupported op 'flip' in model" in res.lost_text()


def test_contract_dims_are_not_losses():
    model = nn.Sequential(nn.Embedding(10, 8), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 10))
    assert trace(model, (torch.randint(0, 10, (2, 3)),)).lost == []


def test_one_warning_and_summary_list_the_lost_dims():
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        dms = dmscale.DMS(Flipper(), (torch.randn(2, 4),), dmscale.Target(flops=0.7), total_steps=5)
    msgs = [str(x.message) for x in w if "dmscale" in str(x.message)]
    assert len(msgs) == 1 and "could be searched but are fixed" in msgs[0] and "unsupported op 'flip'" in msgs[0]
    assert [g.name for g in dms.groups] == ["b"]
    assert "not searched (fixed):\n  a (16 elements" in dms.summary()
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        dmscale.DMS(Flipper(), (torch.randn(2, 4),), dmscale.Target(flops=0.7), total_steps=5, warn=False)
    assert not [x for x in w if "dmscale" in str(x.message)]


class DotBlock(nn.Module):
    """A residual block whose FLOPs come from an op without a rule (tensordot)."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(d, d) / d ** 0.5)

    def forward(self, x):
        return x + torch.tensordot(x, self.w, dims=([2], [0]))


class DotNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(4, 8)
        self.blocks = nn.ModuleList([DotBlock(8) for _ in range(3)])
        self.out = nn.Linear(8, 2)

    def forward(self, x):
        x = self.inp(x)
        for b in self.blocks:
            x = b(x)
        return self.out(x)


def test_flops_of_ops_without_a_rule_scale_with_depth():
    x = torch.randn(2, 5, 4)
    dms = dmscale.DMS(DotNet(), (x,), dmscale.Target(flops=0.6), total_steps=5, warn=False)
    assert dms.resources.flops_const == 0.0
    assert [o.blocks for o in dms.trace.ops if o.name == "tensordot"] == [("blocks.0",), ("blocks.1",), ("blocks.2",)]
    (depth,) = [g for g in dms.groups if g.kind == "depth"]
    with torch.no_grad():
        dms.space.ratio(depth).fill_(0.3)  # keep one block
        dms.space.importance(depth).copy_(torch.tensor([3.0, 1.0, 2.0]))
    small = dms.export()
    assert len(small.blocks) == 1
    assert float(dms.resource(soft=False)["flops"]) == dmscale.count(small, (x,))["flops"]
