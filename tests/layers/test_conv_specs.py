"""Convolution layers: grouped convolutions lose whole groups or the same channels in every group (export
sets ``groups``); ConvTranspose1d/2d/3d and Conv1d are searched and exported with their size attributes."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from dmscale.layers import spec_for

from prunetools import prune_and_export


class Grouped(nn.Module):
    def __init__(self, groups: int = 4, mult: int = 1) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 16, 1)
        self.g = nn.Conv2d(16, 16 * mult, 3, padding=1, groups=groups)
        self.bn = nn.BatchNorm2d(16 * mult)
        self.b = nn.Conv2d(16 * mult, 8, 1)
        self.fc = nn.Linear(8, 2)

    def forward(self, x):
        return self.fc(self.b(F.relu(self.bn(self.g(F.relu(self.a(x)))))).mean((2, 3)))


@pytest.mark.parametrize("groups,mult", [(4, 1), (2, 2), (16, 2)])
def test_grouped_conv_loses_groups_and_channels_per_group(groups, mult):
    torch.manual_seed(0)
    dms, small = prune_and_export(Grouped(groups, mult), (torch.randn(2, 3, 6, 6),), ratio=0.5)
    kinds = {g.name: (g.kind, g.size) for g in dms.groups}
    assert kinds["a[groups]"] == ("groups", groups)
    g = small.g
    assert g.groups < groups and g.in_channels == small.a.out_channels == g.weight.shape[1] * g.groups
    assert g.out_channels == g.weight.shape[0] == small.bn.num_features
    assert g.out_channels % g.groups == 0


@pytest.mark.parametrize("conv_t,dims", [(nn.ConvTranspose1d, 1), (nn.ConvTranspose2d, 2), (nn.ConvTranspose3d, 3)])
def test_conv_transpose(conv_t, dims):
    conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dims]

    class Up(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.enc = conv(2, 8, 3, padding=1)
            self.up = conv_t(8, 6, 2, stride=2)
            self.dw = conv_t(6, 6, 3, padding=1, groups=6)  # depthwise transposed
            self.dec = conv(6, 3, 1)

        def forward(self, x):
            return self.dec(F.relu(self.dw(F.relu(self.up(F.relu(self.enc(x)))))))

    torch.manual_seed(0)
    x = torch.randn(2, 2, *([4] * dims))
    dms, small = prune_and_export(Up(), (x,), ratio=0.5)
    assert {g.name for g in dms.groups} == {"enc", "up"}
    up, dw = small.up, small.dw
    assert up.in_channels == small.enc.out_channels < 8 and up.out_channels == up.weight.shape[1] < 6
    assert dw.groups == dw.in_channels == dw.out_channels == up.out_channels
    assert spec_for(up).sizes(up) == {"in_channels": up.in_channels, "out_channels": up.out_channels}


def test_conv1d_sequence_model():
    class Tcn(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c1 = nn.Conv1d(4, 16, 3, padding=1)
            self.c2 = nn.Conv1d(16, 16, 3, padding=2, dilation=2, padding_mode="circular")
            self.c3 = nn.Conv1d(16, 2, 1)

        def forward(self, x):
            h = F.relu(self.c1(x))
            return self.c3(F.relu(self.c2(h)) + h)

    torch.manual_seed(0)
    dms, small = prune_and_export(Tcn(), (torch.randn(2, 4, 10),), ratio=0.5)
    assert small.c1.out_channels == small.c2.in_channels == small.c2.out_channels < 16
