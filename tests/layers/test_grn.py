"""GRN (ConvNeXt-V2): the channel mean runs over the kept channels, the layer masks ``w * (...) + b`` and not its
``+ x`` skip, so the export (mask folded into w and b) equals the hard-masked supernet; other formulas stay fixed."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import dmscale
from dmscale.layers.grn import grn, is_grn


class GRN(nn.Module):
    """ConvNeXt-V2's GRN, channels last (as Hugging Face's ConvNextV2GRN)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(1, 1, 1, dim) * 0.5)
        self.bias = nn.Parameter(torch.randn(1, 1, 1, dim) * 0.1)

    def forward(self, x):
        g = torch.linalg.vector_norm(x, ord=2, dim=(1, 2), keepdim=True)
        n = g / (g.mean(dim=-1, keepdim=True) + 1e-6)
        return self.weight * (x * n) + self.bias + x


class OtherGRN(GRN):
    """Named like a GRN, computes something else (no skip): its channels must stay fixed."""

    def forward(self, x):
        g = torch.linalg.vector_norm(x, ord=2, dim=(1, 2), keepdim=True)
        return self.weight * (x * g) + self.bias


class Block(nn.Module):
    def __init__(self, dim: int = 8, grn_cls=GRN) -> None:
        super().__init__()
        self.dw = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        self.pw1 = nn.Linear(dim, 4 * dim)
        self.grn = grn_cls(4 * dim)
        self.pw2 = nn.Linear(4 * dim, dim)

    def forward(self, x):
        y = self.dw(x).permute(0, 2, 3, 1)
        y = self.pw2(self.grn(F.gelu(self.pw1(y))))
        return x + y.permute(0, 3, 1, 2)


class Net(nn.Module):
    def __init__(self, grn_cls=GRN) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.blocks = nn.Sequential(Block(8, grn_cls), Block(8, grn_cls))
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)).mean((2, 3)))


def test_matcher_and_formula():
    m = GRN(6)
    assert is_grn(m) and not is_grn(nn.LayerNorm(6))
    x = torch.randn(2, 3, 3, 6)
    torch.testing.assert_close(grn(m, x), m(x))
    keep = torch.tensor([True, False, True, True, False, True])
    mask = keep.float()
    ref = GRN(4)
    with torch.no_grad():
        ref.weight.copy_(m.weight[..., keep])
        ref.bias.copy_(m.bias[..., keep])
    xk = x * mask  # the producing layer's mask reaches the GRN's input
    out = grn(m, xk, keep, mask)
    torch.testing.assert_close(out[..., keep], ref(x[..., keep]))
    assert out[..., ~keep].abs().max() == 0


def test_grn_gradients_float64():
    m = GRN(5).double()
    x = torch.randn(2, 3, 3, 5, dtype=torch.float64, requires_grad=True)
    mask = torch.rand(5, dtype=torch.float64, requires_grad=True)
    keep = torch.tensor([True, True, False, True, True])
    assert torch.autograd.gradcheck(lambda x, mk: grn(m, x, keep, mk), (x, mask))


@pytest.mark.parametrize("ratio", [0.5, 0.25])
def test_ffn_through_grn_is_searched_and_exported_exactly(ratio):
    torch.manual_seed(0)
    model, x = Net().eval(), torch.randn(2, 3, 6, 6)
    dms = dmscale.DMS(model, (x,), dmscale.Target(flops=0.6), total_steps=5, warn=False)
    names = [g.name for g in dms.groups]
    assert "blocks.0.pw1" in names and "blocks.1.pw1" in names
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for grp in dms.groups:
            dms.space.importance(grp).copy_(torch.rand(grp.size, generator=g))
            dms.space.ratio(grp).fill_(ratio if grp.name.endswith("pw1") else 1.0)
    ex = dms.export(project=False)
    assert ex.blocks[0].grn.weight.shape == (1, 1, 1, int(32 * ratio)) and ex.blocks[0].pw2.in_features == 32 * ratio
    with torch.no_grad(), dms.hard():
        ref = dms.model(x)
    torch.testing.assert_close(ex(x), ref, atol=1e-5, rtol=1e-5)


def test_a_grn_named_module_computing_something_else_keeps_its_channels():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 6, 6)
    with pytest.warns(UserWarning, match="does not compute the GRN formula"):
        dms = dmscale.DMS(Net(OtherGRN).eval(), (x,), dmscale.Target(flops=0.8), total_steps=5)
    assert not any(g.name.endswith("pw1") for g in dms.groups)
