"""DMS, DMS_p and DMS_fast as recipes, by task: image classification, a user's loss; Search and finish."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import dmscale
from dmscale.recipes import pipelines as R
from dmscale.recipes.loop import cosine_lr
from dmscale.recipes.tasks import CausalLM, ImageClassification, LossFunction, as_task


def _frac(small, model, x, kind="flops"):
    return dmscale.count(small, (x,))[kind] / dmscale.count(model, (x,))[kind]


def test_dms_fast_on_a_users_loss_keeps_the_weights_and_meets_the_budget(net):
    """A regression model with its own loss function (no classes, no labels the recipe knows about)."""
    model = net(n_out=2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(0)
    xs, ys = torch.randn(64, 8, generator=g), torch.randn(64, 2, generator=g)

    def loss(m, batch):
        x, y = batch
        return F.mse_loss(m(x), y)

    small, info = R.dms_fast(model, loss, lambda s: (xs[s % 4 * 16:][:16], ys[s % 4 * 16:][:16]),
                             dmscale.Target(params=0.5), 10, structure_lr=0.1)
    assert info["pipeline"] == "DMS_fast" and len(info["history"]) == 10
    assert info["params_frac"] <= 0.5 + 1e-9 and not info["over_budget"]
    assert info["projection"]["after"] <= 0.5 + 1e-9
    x = torch.randn(3, 8)
    assert _frac(small, model, x, "params") == pytest.approx(info["params_frac"])
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # frozen, masks removed
    assert not any(hasattr(m, "parametrizations") for m in model.modules())
    # structure only: a surviving fc1 row is an original row times its soft mask value in [0.5, 1]
    w0 = model.fc1.weight.detach()
    for r in small.fc1.weight.detach():
        scale = (w0 @ r) / (w0 * w0).sum(1)
        i = int(torch.argmax(torch.nn.functional.cosine_similarity(w0, r[None], dim=1)))
        torch.testing.assert_close(r, scale[i] * w0[i])
        assert 0.5 <= float(scale[i]) <= 1.0 + 1e-6


def test_dms_p_on_images_trains_searches_and_finetunes(cnn, data):
    batches = data((1, 8, 8), 3)
    model = cnn()
    w0 = model.head.weight.detach().clone()
    small, info = R.dms_p(model, ImageClassification(), batches, dmscale.Target(flops=0.5), 6, finetune_steps=3,
                          lr=0.05, optimizer="sgd")
    assert info["pipeline"] == "DMS_p" and len(info["history"]) == 6 and len(info["finetune"]) == 3
    assert info["flops_frac"] <= 0.5 + 1e-9
    assert not torch.equal(model.head.weight, w0)  # the weights were trained in place
    assert _frac(small, model, torch.randn(1, 1, 8, 8)) <= 0.5 + 1e-9
    assert not small.training and all(p.requires_grad for p in small.parameters())


def test_dms_on_a_supernet_with_retraining_and_cosine_schedule(cnn, data):
    batches = data((1, 8, 8), 3)
    sup = cnn(widths=(6, 12), depths=(2, 2))
    small, info = R.dms(sup, ImageClassification(), batches, dmscale.Target(flops=0.3), 8, retrain_steps=2,
                        lr_schedule=cosine_lr(0.1, 8))
    assert info["pipeline"] == "DMS" and info["flops_frac"] <= 0.3 + 1e-9 and len(info["finetune"]) == 2
    lrs = [h["lr"] for h in info["history"]]
    assert lrs[0] > lrs[-1]  # the schedule reached the weight optimizer


def test_search_without_projection_reports_over_budget(net, data):
    model = net()
    d = dmscale.DMS(model, (torch.randn(1, 8),), dmscale.Target(flops=0.3), total_steps=1, warn=False)
    small, info = R.finish(d, project_budget=False)  # nothing searched: the full model
    assert info["over_budget"] and "projection" not in info
    small, info = R.finish(d)
    assert not info["over_budget"] and info["flops_frac"] <= 0.3 + 1e-9
    assert info["projection"]["before"] == pytest.approx(1.0) and info["projection"]["after"] <= 0.3 + 1e-9


def test_search_state_round_trip_and_frozen_weights(cnn, data):
    batches = data((1, 8, 8), 3)
    model = cnn()
    d = dmscale.DMS(model, (batches(0)[0][:1],), dmscale.Target(flops=0.5), total_steps=6, warn=False)
    s = R.Search(d, train_weights=False, structure_lr=0.05)
    assert s.wopt is None and len(s.optimizers) == 1
    w = {k: v.clone() for k, v in model.state_dict().items() if "running" not in k and "num_batches" not in k}
    s.run(ImageClassification(), batches)
    assert all(p.requires_grad for p in model.parameters())  # restored after the search
    assert all(torch.equal(model.state_dict()[k], v) for k, v in w.items())  # weights frozen (BN stats may move)
    state = s.state_dict()
    model2 = cnn()
    d2 = dmscale.DMS(model2, (batches(0)[0][:1],), dmscale.Target(flops=0.5), total_steps=6, warn=False)
    s2 = R.Search(d2, train_weights=False, structure_lr=0.05)
    s2.load_state_dict(state)
    assert d2.kept() == d.kept() and d2.step_count == 6


def test_tasks():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 7, requires_grad=True)
    ids = torch.randint(0, 7, (2, 5))
    want = F.cross_entropy(logits[:, :-1].reshape(-1, 7), ids[:, 1:].reshape(-1))
    from dmscale.recipes.tasks import lm_loss

    torch.testing.assert_close(lm_loss(logits, ids), want)
    lm = CausalLM(example_len=3)
    assert lm.example(ids)[0].shape == (1, 3)
    img = ImageClassification()
    assert img.example((torch.randn(4, 1, 8, 8), torch.zeros(4)))[0].shape == (1, 1, 8, 8)
    assert isinstance(as_task(lambda m, b: m(b).sum()), LossFunction)
    with pytest.raises(TypeError, match="Task or a loss function"):
        as_task(3)
    with pytest.raises(TypeError, match="example_fn"):
        LossFunction(lambda m, b: m(b)).example({"x": 1})
