"""Mixed precision: bf16 autocast and fp16 + GradScaler on CPU.

Importance is float32 and computed from unscaled gradients (``dms.attach_grad_scaler``);
steps with inf/nan loss or gradients are skipped (GradScaler), counted in
``dms.nonfinite_steps`` / ``dms.importance.skipped``, and leave ratios and importance intact.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import dmscale
from zoo import MLP, ResNetCNN, TinyViT


def _setup(build=MLP, shape=(8, 16), n_cls=5, seed=0):
    torch.manual_seed(seed)
    model = build()
    x = torch.randn(*shape)
    y = torch.randint(0, n_cls, (shape[0],))
    dms = dmscale.DMS(model, (x[:2],), dmscale.Target(flops=0.4), total_steps=8)
    opt = torch.optim.SGD([{"params": dms.weight_parameters(), "lr": 0.05},
                           {"params": dms.structure_parameters(), "lr": 0.2, "weight_decay": 0.0}])
    return model, dms, opt, x, y


def _imp(dms):
    return {g.name: dms.space.importance(g).clone() for g in dms.groups}


@pytest.mark.parametrize("build,shape,n_cls", [(MLP, (8, 16), 5), (ResNetCNN, (8, 3, 8, 8), 10),
                                               (TinyViT, (8, 3, 16, 16), 10)], ids=["mlp", "resnet", "vit"])
def test_bf16_autocast_search(build, shape, n_cls):
    model, dms, opt, x, y = _setup(build, shape, n_cls)
    for _ in range(8):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x)
            assert out.dtype == torch.bfloat16  # autocast really ran the layers in bf16
            loss = dms.loss(F.cross_entropy(out.float(), y))
        opt.zero_grad()
        loss.backward()
        opt.step()
        dms.step()
    for g in dms.groups:
        imp = dms.space.importance(g)
        assert imp.dtype == torch.float32 and bool(torch.isfinite(imp).all())
        assert dms.space.ratio(g).dtype == torch.float32 and bool(torch.isfinite(dms.space.ratio(g)))
    assert any(float(v.sum()) > 0 for v in _imp(dms).values())
    assert dms.nonfinite_steps == 0 and dms.importance.skipped == 0
    assert any(k < f for f, k in dms.kept().values())
    small = dms.export()  # checked against the hard-masked supernet in float32
    assert type(small) is dms.model_class


def test_bf16_importance_close_to_float32():
    """Same step in bf16 and fp32: the importance is a float32 estimate of the same quantity."""
    ref = None
    for dtype in (None, torch.bfloat16):
        model, dms, _, x, y = _setup()
        if dtype is None:
            F.cross_entropy(model(x), y).backward()
        else:
            with torch.autocast("cpu", dtype=dtype):
                out = model(x)
            F.cross_entropy(out.float(), y).backward()
        imp = _imp(dms)
        if ref is None:
            ref = imp
            continue
        for k in ref:
            assert imp[k].dtype == torch.float32
            torch.testing.assert_close(imp[k], ref[k], rtol=0.1, atol=1e-3 * float(ref[k].max()))


def test_grad_scaler_importance_is_unscaled():
    """With attach_grad_scaler the importance equals the unscaled run's; without it, scale**2 off."""
    imps = {}
    for mode in ("plain", "scaled_attached", "scaled_not_attached"):
        model, dms, _, x, y = _setup()
        loss = F.cross_entropy(model(x), y)
        if mode == "plain":
            loss.backward()
        else:
            scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12)
            if mode == "scaled_attached":
                dms.attach_grad_scaler(scaler)
            scaler.scale(loss).backward()
        imps[mode] = _imp(dms)
    for k in imps["plain"]:
        assert float(imps["plain"][k].sum()) > 0
        torch.testing.assert_close(imps["scaled_attached"][k], imps["plain"][k], rtol=1e-5, atol=0)
        torch.testing.assert_close(imps["scaled_not_attached"][k], imps["plain"][k] * 2.0 ** 24,
                                   rtol=1e-4, atol=0)


def _fp16_step(model, dms, opt, scaler, x, y):
    with torch.autocast("cpu", dtype=torch.float16):
        out = model(x)
        loss = dms.loss(F.cross_entropy(out.float(), y))
    opt.zero_grad()
    scaler.scale(loss).backward()
    scaler.step(opt)
    scaler.update()
    dms.step()
    return out


def test_fp16_grad_scaler_search_and_nonfinite_steps():
    model, dms, opt, x, y = _setup()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8)
    dms.attach_grad_scaler(scaler)
    out = _fp16_step(model, dms, opt, scaler, x, y)
    assert out.dtype == torch.float16
    assert dms.nonfinite_steps == 0 and dms.importance.skipped == 0
    good_imp, good_ratios = _imp(dms), [p.clone() for p in dms.structure_parameters()]
    w = [p.clone() for p in dms.weight_parameters()]
    # an input that overflows fp16: inf/nan loss, every update must be skipped
    _fp16_step(model, dms, opt, scaler, x * 1e6, y)
    assert dms.nonfinite_steps == 1
    assert dms.importance.skipped > 0
    assert all(torch.equal(a, b) for a, b in zip(good_ratios, dms.structure_parameters()))
    assert all(torch.equal(a, b) for a, b in zip(w, dms.weight_parameters()))
    assert all(torch.equal(v, good_imp[k]) for k, v in _imp(dms).items())
    assert scaler.get_scale() == 2.0 ** 7  # the scaler backed off
    # the search goes on normally afterwards
    for _ in range(3):
        _fp16_step(model, dms, opt, scaler, x, y)
    assert dms.nonfinite_steps == 1
    assert not all(torch.equal(a, b) for a, b in zip(good_ratios, dms.structure_parameters()))
    assert all(bool(torch.isfinite(p)) for p in dms.structure_parameters())
    assert dms.state_dict()["nonfinite_steps"] == 1
    dms.export()


def test_gradient_overflow_with_finite_loss_is_counted():
    """fp16 backward overflow (scale too large) with a finite loss: GradScaler skips, DMS counts it."""
    model, dms, opt, x, y = _setup()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 40)
    dms.attach_grad_scaler(scaler)
    ratios = [p.clone() for p in dms.structure_parameters()]
    _fp16_step(model, dms, opt, scaler, x, y)
    assert dms.last["task_loss"] == pytest.approx(dms.last["task_loss"])  # finite
    assert scaler.get_scale() < 2.0 ** 40
    assert dms.nonfinite_steps == 1
    assert all(torch.equal(a, b) for a, b in zip(ratios, dms.structure_parameters()))
    assert all(bool(torch.isfinite(v).all()) for v in _imp(dms).values())


def test_nonfinite_loss_without_scaler_is_counted_and_importance_kept():
    model, dms, opt, x, y = _setup()
    F.cross_entropy(model(x), y).backward()
    imp = _imp(dms)
    for p in dms.structure_parameters():
        p.grad = None
    loss = dms.loss(F.cross_entropy(model(x), y) * float("nan"))
    loss.backward()
    dms.step()  # no optimizer step: the user skipped it
    assert dms.nonfinite_steps == 1 and dms.importance.skipped > 0
    assert all(torch.equal(v, imp[k]) for k, v in _imp(dms).items())


def test_nonfinite_ratio_is_reported():
    model, dms, opt, x, y = _setup()
    with torch.no_grad():
        dms.structure_parameters()[0].fill_(float("nan"))
    with pytest.raises(FloatingPointError, match="non-finite"):
        dms.step()
