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


class FoldedHeads(nn.Module):
    """Heads folded into the batch dim (``(B, T, H * D) -> (B * H, T, D)``); ``mix`` says what reads them."""

    def __init__(self, mix: str) -> None:
        super().__init__()
        self.mix = mix
        self.qkv = nn.Linear(8, 24)
        self.out = nn.Linear(8, 8)
        self.head = nn.Linear(8, 3)

    def fold(self, x):
        b, t, _ = x.shape
        return x.view(b, t, 4, 2).transpose(1, 2).reshape(b * 4, t, 2)

    def forward(self, x):
        b, t, _ = x.shape
        q, k, v = (self.fold(p) for p in self.qkv(x).chunk(3, -1))
        if self.mix == "bmm":  # attention: the folded factor is heads
            y = torch.bmm(torch.bmm(q, k.transpose(1, 2)).softmax(-1), v)
        elif self.mix == "sdpa":
            y = nn.functional.scaled_dot_product_attention(q, k, v)
        else:  # a running mean over time, per head: nothing reads the factor as heads
            y = (q * k).cumsum(1) + v
        return self.head(self.out(y.view(b, 4, t, 2).transpose(1, 2).reshape(b, t, 8)))


def test_heads_folded_into_the_batch_are_searched_by_attention_and_named_when_nothing_reads_them():
    x = torch.randn(3, 5, 8)
    for mix in ("bmm", "sdpa"):
        dms = dmscale.DMS(FoldedHeads(mix), (x,), dmscale.Target(flops=0.9), total_steps=5, warn=False)
        assert [g.kind for g in dms.groups if g.name == "qkv[heads]"] == ["heads"] and dms.trace.lost == [], mix
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        dms = dmscale.DMS(FoldedHeads("cumsum"), (x,), dmscale.Target(flops=0.9), total_steps=5)
    assert not [g for g in dms.groups if g.kind == "heads"]
    (lost,) = dms.trace.lost
    assert lost.name == "qkv" and lost.size == 4
    assert lost.reasons == ["folded into the batch dim by a reshape in model, and no attention op read it as heads"]
    msgs = [str(x.message) for x in w if "could be searched but are fixed" in str(x.message)]
    assert len(msgs) == 1 and "qkv (4 elements" in msgs[0] and "folded into the batch dim" in msgs[0]
    assert "not searched (fixed):\n  qkv (4 elements" in dms.summary()
