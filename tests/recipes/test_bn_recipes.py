"""BatchNorm recalibration wired into the recipes: DMS_fast and one-shot pruning re-estimate the statistics of the
network they return (by default, when the model has BatchNorm and batches are given), and can be told not to."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

from dmscale.recipes.baselines import one_shot_prune
from dmscale.recipes.bn import batchnorms, recalibrate_bn
from dmscale.recipes.oneshot import oneshot_prune
from dmscale.recipes.pipelines import dms_fast
from dmscale.recipes.tasks import ImageClassification
from dmscale.schedule import Target


def bn_cnn(seed: int = 0, bn: bool = True) -> nn.Module:
    torch.manual_seed(seed)
    norm = (lambda c: nn.BatchNorm2d(c)) if bn else (lambda c: nn.Identity())
    net = nn.Sequential(nn.Conv2d(3, 12, 3, padding=1), norm(12), nn.ReLU(),
                        nn.Conv2d(12, 16, 3, padding=1), norm(16), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4))
    with torch.no_grad():  # "pretrained" statistics far from the data's
        for m in batchnorms(net):
            m.running_mean.fill_(3.0)
            m.running_var.fill_(9.0)
    return net


class Batches:
    """batches(i) -> (x, y), deterministic, shifted away from zero mean; counts the calls."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        self.calls += 1
        g = torch.Generator().manual_seed(100 + i)
        return torch.randn(8, 3, 8, 8, generator=g) * 2 + 1, torch.randint(0, 4, (8,), generator=g)


def bn_stats(model: nn.Module) -> list[torch.Tensor]:
    return [t.clone() for m in batchnorms(model) for t in (m.running_mean, m.running_var)]


def _fast(bn_batches: int | None, model: nn.Module | None = None):
    model = model if model is not None else bn_cnn()
    kw = {} if bn_batches is None else {"bn_batches": bn_batches}
    torch.manual_seed(1)
    return dms_fast(model, ImageClassification(), Batches(), Target(flops=0.5), 6, dms_kwargs={"prune_depth": False},
                    **kw)


def test_dms_fast_recalibrates_the_exported_batchnorm_by_default() -> None:
    on, info_on = _fast(None)
    off, info_off = _fast(0)
    assert info_on["bn_recalibrated"] == 20 and info_off["bn_recalibrated"] == 0
    assert [p.shape for p in on.parameters()] == [p.shape for p in off.parameters()]  # the same search
    s_on, s_off = bn_stats(on), bn_stats(off)
    assert any(not torch.allclose(a, b) for a, b in zip(s_on, s_off))
    # exactly the statistics recalibrate_bn gives the unrecalibrated export on the same 20 batches
    ref = recalibrate_bn(copy.deepcopy(off), Batches(), 20)
    for a, b in zip(s_on, bn_stats(ref)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # and they describe the data, not the "pretrained" constants
    assert all(float(t.abs().max()) != 3.0 for t in s_on[::2])


def test_dms_fast_bn_batches_sets_the_count_and_is_checked() -> None:
    five, info = _fast(5)
    assert info["bn_recalibrated"] == 5
    off, _ = _fast(0)
    ref = recalibrate_bn(copy.deepcopy(off), Batches(), 5)
    for a, b in zip(bn_stats(five), bn_stats(ref)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="bn_batches"):
        _fast(-1)


def test_dms_fast_without_batchnorm_reads_no_extra_batch() -> None:
    b = Batches()
    torch.manual_seed(1)
    _, info = dms_fast(bn_cnn(bn=False), ImageClassification(), b, Target(flops=0.5), 6,
                       dms_kwargs={"prune_depth": False})
    assert info["bn_recalibrated"] == 0
    assert b.calls <= 6 + 1  # the search steps and the traced example, no recalibration batch


@pytest.mark.parametrize("method", ["l1", "taylor", "random"])
def test_oneshot_recalibrates_the_export_and_leaves_the_model_alone(method: str) -> None:
    model = bn_cnn()
    before = bn_stats(model)
    x = Batches()(0)[0][:2]
    on, i_on = oneshot_prune(model, (x,), Target(flops=0.5), method, task=ImageClassification(), batches=Batches())
    off, i_off = oneshot_prune(model, (x,), Target(flops=0.5), method, task=ImageClassification(), batches=Batches(),
                               bn_batches=0)
    assert i_on["bn_recalibrated"] == 20 and i_off["bn_recalibrated"] == 0
    for a, b in zip(before, bn_stats(model)):
        assert torch.equal(a, b)  # the user's model keeps its statistics
    assert all(float(t.abs().max()) == 3.0 for t in bn_stats(off)[::2])  # the kept channels' old means
    ref = recalibrate_bn(copy.deepcopy(off), Batches(), 20)
    for a, b in zip(bn_stats(on), bn_stats(ref)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_oneshot_without_batches_does_not_recalibrate() -> None:
    model = bn_cnn()
    x = Batches()(0)[0][:2]
    small, info = oneshot_prune(model, (x,), Target(flops=0.5), "l1")
    assert info["bn_recalibrated"] == 0
    assert all(float(t.abs().max()) == 3.0 for t in bn_stats(small)[::2])


def test_image_one_shot_prune_passes_bn_batches() -> None:
    x = Batches()(0)[0][:2]
    on, _ = one_shot_prune(bn_cnn(), x, 0.5, "l1", batches=Batches())
    off, _ = one_shot_prune(bn_cnn(), x, 0.5, "l1", batches=Batches(), bn_batches=0)
    assert any(not torch.allclose(a, b) for a, b in zip(bn_stats(on), bn_stats(off)))
