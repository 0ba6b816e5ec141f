"""Removable blocks: residual, shape-preserving children of a ModuleList / Sequential the model iterates.

A ModuleList the model only indexes by position (T5's ``block.layer[0]`` ... ``layer[-1]``) holds
sub-layers with fixed roles: removing one would shift the others, so the removable element is the
module that owns that list (the whole block)."""

import torch
import torch.nn as nn

from dmscale.trace.tracer import trace


class _Sub(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.f = nn.Linear(d, d)

    def forward(self, x):
        return x + self.f(x)


class _Block(nn.Module):
    """Two residual sub-layers called by position, like T5Block.layer."""

    def __init__(self, d):
        super().__init__()
        self.layer = nn.ModuleList([_Sub(d), _Sub(d)])

    def forward(self, x):
        return self.layer[-1](self.layer[0](x))


class _Stack(nn.Module):
    def __init__(self, d=8, n=3):
        super().__init__()
        self.block = nn.ModuleList([_Block(d) for _ in range(n)])
        self.head = nn.Linear(d, 2)

    def forward(self, x):
        for b in self.block:
            x = b(x)
        return self.head(x)


def test_positional_sub_layers_are_not_blocks_their_owner_is():
    tr = trace(_Stack(), (torch.randn(2, 8),))
    assert sorted(b.name for b in tr.blocks) == ["block.0", "block.1", "block.2"]
    assert {b.container for b in tr.blocks} == {"block"}


def test_iterated_list_of_the_same_sub_layers_is_a_stack():
    class Iterating(_Block):
        def forward(self, x):
            for sub in self.layer:
                x = sub(x)
            return x

    m = _Stack()
    m.block = nn.ModuleList([Iterating(8) for _ in range(3)])
    tr = trace(m, (torch.randn(2, 8),))
    assert sorted(b.name for b in tr.blocks) == [f"block.{i}.layer.{j}" for i in range(3) for j in range(2)]
    assert nn.ModuleList.__getitem__.__name__ == "__getitem__"  # the recording hooks are gone again
