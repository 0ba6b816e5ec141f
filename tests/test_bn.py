"""``dmscale.recalibrate_bn``: running statistics become the batch statistics of the data given."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

import dmscale
from zoo import MLP, ResNetCNN


class _BNFirst(nn.Module):
    """BatchNorm on the raw input (its statistics are those of the data), then conv + BN, dropout."""

    def __init__(self) -> None:
        super().__init__()
        self.bn0 = nn.BatchNorm2d(3)
        self.conv = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(4)
        self.drop = nn.Dropout(0.5)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(self.drop(self.bn1(self.conv(self.bn0(x))).mean((2, 3))))


def _data(n=3, b=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, 3, 6, 6, generator=g) * (1 + i) + 2.0 * i for i in range(n)]


def test_statistics_equal_the_batch_statistics_of_the_data():
    torch.manual_seed(0)
    model = _BNFirst().train()
    xs = _data()
    with torch.no_grad():
        for m in (model.bn0, model.bn1):
            m.running_mean.fill_(7.0)
            m.running_var.fill_(0.1)
    out = dmscale.recalibrate_bn(model, [(x, torch.zeros(8)) for x in xs])
    assert out is model and model.training and model.drop.training  # modes restored
    # bn0 sees the data itself: the average of per-batch means and unbiased per-batch variances
    mean = torch.stack([x.mean((0, 2, 3)) for x in xs]).mean(0)
    var = torch.stack([x.var((0, 2, 3), unbiased=True) for x in xs]).mean(0)
    torch.testing.assert_close(model.bn0.running_mean, mean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model.bn0.running_var, var, rtol=1e-5, atol=1e-5)
    # bn1 sees conv(bn0(x)) with bn0 normalising by each batch's own statistics (train mode)
    with torch.no_grad():
        feats = [model.conv((x - x.mean((0, 2, 3), keepdim=True)) /
                            torch.sqrt(x.var((0, 2, 3), unbiased=False, keepdim=True) + model.bn0.eps)
                            * model.bn0.weight[:, None, None] + model.bn0.bias[:, None, None]) for x in xs]
    torch.testing.assert_close(model.bn1.running_mean, torch.stack([f.mean((0, 2, 3)) for f in feats]).mean(0),
                               rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(model.bn1.running_var,
                               torch.stack([f.var((0, 2, 3), unbiased=True) for f in feats]).mean(0),
                               rtol=1e-4, atol=1e-5)
    assert model.bn0.momentum == 0.1 and int(model.bn0.num_batches_tracked) == 3


@pytest.mark.parametrize("form", ["tensors", "callable", "generator"])
def test_batch_forms_and_num_batches(form):
    xs = _data(n=4)
    model = _BNFirst()
    if form == "tensors":
        dmscale.recalibrate_bn(model, xs, num_batches=2)
    elif form == "callable":
        dmscale.recalibrate_bn(model, lambda i: (xs[i], None), num_batches=2)
    else:
        dmscale.recalibrate_bn(model, (x for x in xs), num_batches=2)
    mean = torch.stack([x.mean((0, 2, 3)) for x in xs[:2]]).mean(0)
    torch.testing.assert_close(model.bn0.running_mean, mean, rtol=1e-5, atol=1e-5)
    assert int(model.bn0.num_batches_tracked) == 2


def test_non_bn_model_untouched_and_no_batch_read():
    model = MLP()
    before = copy.deepcopy(model.state_dict())

    def never(i):
        raise AssertionError("a model without BatchNorm must not read batches")

    assert dmscale.recalibrate_bn(model, never, num_batches=3) is model
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])


def test_bad_input_keeps_old_statistics():
    model = _BNFirst()
    with torch.no_grad():
        model.bn0.running_mean.fill_(3.0)
    with pytest.raises(ValueError, match="no batch"):
        dmscale.recalibrate_bn(model, [])
    with pytest.raises(ValueError, match="num_batches"):
        dmscale.recalibrate_bn(model, lambda i: _data(1)[0])
    with pytest.raises(ValueError, match="num_batches"):
        dmscale.recalibrate_bn(model, _data(), num_batches=0)
    with pytest.raises(TypeError, match="batch 0"):
        dmscale.recalibrate_bn(model, [3.0])
    with pytest.raises(RuntimeError):
        dmscale.recalibrate_bn(model, [torch.randn(2, 5, 6, 6)])  # wrong channels: the forward fails
    assert float(model.bn0.running_mean[0]) == 3.0 and model.bn0.momentum == 0.1


def test_masked_and_exported_models_agree():
    """Recalibrating the DMS (hard masks) gives the export the same statistics as recalibrating the export."""
    torch.manual_seed(0)
    model = ResNetCNN(widths=(8, 16), depths=(2, 2)).train()
    x = torch.randn(4, 3, 16, 16)
    dms = dmscale.DMS(model, (x[:2],), dmscale.Target(flops=0.5), total_steps=4)
    with torch.no_grad():
        for g in dms.groups:
            dms.space.importance(g).copy_(torch.rand(g.size))
            dms.space.ratio(g).fill_(0.6 if g.kind != "depth" else 1.0)
    small = dms.export(project=False)
    xs = [torch.randn(8, 3, 16, 16) for _ in range(3)]
    dmscale.recalibrate_bn(dms, xs)
    dmscale.recalibrate_bn(small, xs)
    small2 = dms.export(project=False)  # copies the masked model's new statistics
    for (n, a), (_, b) in zip(small.named_buffers(), small2.named_buffers()):
        if "running" in n:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    small.eval()
    small2.eval()
    with torch.no_grad():
        torch.testing.assert_close(small(x), small2(x), rtol=1e-4, atol=1e-4)
