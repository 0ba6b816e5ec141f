"""Fixtures of the recipe tests: tiny models and seeded synthetic batches (CPU, one thread)."""

from __future__ import annotations

from typing import Callable

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from dmscale.app.zoo import ResNet


class Net(nn.Module):
    """Two hidden Linear layers with ReLU (the smallest model with two searchable widths)."""

    def __init__(self, d_in: int = 8, hidden: int = 16, n_out: int = 4) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d_in, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.fc3 = nn.Linear(hidden, n_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(F.relu(self.fc2(F.relu(self.fc1(x)))))


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def net() -> Callable[..., nn.Module]:
    """``net(seed=0, **kw)``: a seeded :class:`Net`."""
    def make(seed: int = 0, **kw) -> nn.Module:
        torch.manual_seed(seed)
        return Net(**kw)
    return make


@pytest.fixture
def cnn() -> Callable[..., nn.Module]:
    """``cnn(seed=0)``: a seeded tiny ResNet (BatchNorm, residual stages) for 1x8x8 inputs."""
    def make(seed: int = 0, widths=(4, 8), depths=(1, 2)) -> nn.Module:
        torch.manual_seed(seed)
        return ResNet(widths, depths, in_ch=1, n_classes=3)
    return make


def make_batches(shape: tuple[int, ...], n_classes: int, seed: int = 0, n: int = 64,
                 batch: int = 16) -> Callable[[int], tuple[torch.Tensor, torch.Tensor]]:
    """``batches(step)``: a pure function of the step over a fixed seeded dataset (learnable labels)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, *shape, generator=g)
    w = torch.randn(x[0].numel(), n_classes, generator=g)
    y = (x.reshape(n, -1) @ w).argmax(1)

    def batches(step: int) -> tuple[torch.Tensor, torch.Tensor]:
        i = (step * batch) % n
        return x[i:i + batch], y[i:i + batch]
    return batches


@pytest.fixture
def data() -> Callable[..., Callable[[int], tuple[torch.Tensor, torch.Tensor]]]:
    return make_batches
