"""Shared fixtures of the whole test suite.

- ``one_thread``: one intra-op thread for a module (tiny models run fastest so, and are immune to a busy
  machine's oversubscription); a module opts in with ``pytestmark = pytest.mark.usefixtures("one_thread")``.
- ``restore_threads``: gives other modules their thread count back after a module whose runs set it
  (``run.threads=1``).
- ``spawn_ranks``: runs a worker on N processes (``mp.spawn``) and returns what each rank saved.
- ``net``, ``cnn``, ``data``: seeded tiny models from the test zoo (``zoo.py``) and synthetic batches.

This file lives in ``tests/``, so pytest puts ``tests/`` on ``sys.path``: test modules in every sub-folder import
the zoo as ``import zoo`` / ``from zoo import MLP`` without touching ``sys.path`` themselves.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn as nn

from zoo import MLP, ResNetCNN


def _keep_threads(n: int | None):
    """Set ``n`` intra-op threads (``None``: leave them) for the duration; restore the count found on entry."""
    was = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(was)


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for the whole module (module-scoped, so module-scoped fixtures build under it too)."""
    yield from _keep_threads(1)


@pytest.fixture(scope="module")
def restore_threads():
    """The thread count found before the module, restored after it (its runs may set their own)."""
    yield from _keep_threads(None)


def _spawn_ranks(worker: Callable[..., None], out_dir: str | Path, world: int, *args: Any) -> list[Any]:
    """``worker(rank, init_file, out_dir, *args)`` on ``world`` processes; each saves ``out_dir/rank<r>.pt``.

    Returns those files' contents in rank order (``torch.load(weights_only=True)``)."""
    out = Path(out_dir)
    mp.spawn(worker, args=(str(out / "init"), str(out), *args), nprocs=world, join=True)
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(world)]


@pytest.fixture(scope="session")
def spawn_ranks() -> Callable[..., list[Any]]:
    """``spawn_ranks(worker, out_dir, world, *args)``: see :func:`_spawn_ranks` (usable from any fixture scope)."""
    return _spawn_ranks


@pytest.fixture
def net() -> Callable[..., nn.Module]:
    """``net(seed=0, d_in=8, hidden=16, n_out=4)``: a seeded three-layer MLP (fc1, fc2, fc3)."""
    def make(seed: int = 0, d_in: int = 8, hidden: int = 16, n_out: int = 4) -> nn.Module:
        torch.manual_seed(seed)
        return MLP(d_in, hidden, n_out)
    return make


@pytest.fixture
def cnn() -> Callable[..., nn.Module]:
    """``cnn(seed=0)``: a seeded tiny ResNet (BatchNorm, residual stages) for 1x8x8 inputs, 3 classes."""
    def make(seed: int = 0, widths=(4, 8), depths=(1, 2)) -> nn.Module:
        torch.manual_seed(seed)
        return ResNetCNN(widths, depths, n_classes=3, in_ch=1)
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
    """``data(shape, n_classes, seed=0)`` -> ``batches(step)`` (see :func:`make_batches`)."""
    return make_batches
