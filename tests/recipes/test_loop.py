"""The one training loop: equals a hand-written loop, resumes exactly, stops at non-finite values, AMP."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import dmscale
from dmscale.recipes.loop import (CheckpointError, NonFiniteError, cosine_lr, load_loop_state, loop_state,
                                  make_optimizer, train_loop)
from dmscale.recipes.tasks import ImageClassification, LossFunction
from dmscale.serialization.checkpoint import load_checkpoint, save_checkpoint


def _weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


# ------------------------------------------------------------------ against the definition
def test_plain_training_equals_a_hand_written_loop(net, data):
    batches = data((8,), 4)
    lr = cosine_lr(0.1, 12, warmup=3)
    ref = net()
    opt = make_optimizer(ref.parameters(), "sgd", 0.1, 0.9, 5e-4)
    for step in range(12):
        for g in opt.param_groups:
            g["lr"] = lr(step)
        x, y = batches(step)
        loss = F.cross_entropy(ref(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    got = net()
    hist = train_loop(got, batches, ImageClassification(), 12,
                      weight_optimizer=make_optimizer(got.parameters(), "sgd", 0.1, 0.9, 5e-4), lr=lr)
    _same(_weights(ref), _weights(got))
    assert [h["step"] for h in hist] == list(range(1, 13))
    assert [h["lr"] for h in hist] == [lr(s) for s in range(12)]
    assert all(0.0 <= h["train_acc"] <= 1.0 and math.isfinite(h["loss"]) for h in hist)


def test_search_equals_a_hand_written_dms_loop(cnn, data):
    """Weights + structure optimizers, dms.loss / dms.step: the same ratios, importance and weights."""
    batches = data((1, 8, 8), 3)
    out = {}
    for mode in ("hand", "loop"):
        model = cnn()
        dms = dmscale.DMS(model, (batches(0)[0][:1],), dmscale.Target(flops=0.4), total_steps=8, warn=False)
        wopt = make_optimizer(dms.weight_parameters(), "sgd", 0.05, 0.9, 5e-4)
        sopt = torch.optim.Adam(dms.structure_parameters(), lr=0.05)
        model.train()
        if mode == "hand":
            for step in range(8):
                x, y = batches(step)
                loss = dms.loss(F.cross_entropy(model(x), y))
                wopt.zero_grad(set_to_none=True)
                sopt.zero_grad(set_to_none=True)
                loss.backward()
                wopt.step()
                sopt.step()
                dms.step()
        else:
            hist = train_loop(model, batches, ImageClassification(), 8, weight_optimizer=wopt, structure_optimizer=sopt,
                              dms=dms)
            assert {"resource", "target", "resource_loss"} <= set(hist[-1])
        out[mode] = (_weights(model), {g.name: dms.space.importance(g).clone() for g in dms.groups}, dms.kept(),
                     dms.step_count)
    _same(out["hand"][0], out["loop"][0])
    _same(out["hand"][1], out["loop"][1])
    assert out["hand"][2:] == out["loop"][2:]
    assert any(k < f for f, k in out["loop"][2].values())


# ------------------------------------------------------------------ hooks, checkpoints, resume
def test_hook_order_and_checkpoint_steps(net, data):
    events = []
    train_loop(net(), data((8,), 4), ImageClassification(), 7,
               weight_optimizer=torch.optim.SGD(net().parameters(), lr=0.0),
               on_step=lambda r: events.append(("step", r["step"])), checkpoint=lambda n: events.append(("ckpt", n)),
               checkpoint_every=3, after_step=lambda r: events.append(("after", r["step"])))
    assert [e for e in events if e[0] == "ckpt"] == [("ckpt", 3), ("ckpt", 6)]  # never after the last step
    assert events[:3] == [("step", 1), ("after", 1), ("step", 2)]
    i = events.index(("ckpt", 3))
    assert events[i - 1] == ("step", 3) and events[i + 1] == ("after", 3)


def test_interrupted_search_resumes_bit_exactly(cnn, data, tmp_path):
    batches = data((1, 8, 8), 3)
    task = ImageClassification()

    def build():
        model = cnn()
        dms = dmscale.DMS(model, (batches(0)[0][:1],), dmscale.Target(flops=0.4), total_steps=10, warn=False)
        return model, dms, [make_optimizer(dms.weight_parameters(), "adamw", 1e-2),
                            torch.optim.Adam(dms.structure_parameters(), lr=0.05)]

    model, dms, (w, s) = build()
    train_loop(model, batches, task, 10, weight_optimizer=w, structure_optimizer=s, dms=dms)
    ref = (_weights(model), dms.state_dict())

    class Crash(Exception):
        pass

    def crash(rec):
        if rec["step"] == 6:
            raise Crash

    model, dms, (w, s) = build()
    with pytest.raises(Crash):
        train_loop(model, batches, task, 10, weight_optimizer=w, structure_optimizer=s, dms=dms, checkpoint_every=4,
                   checkpoint=lambda n: save_checkpoint(tmp_path / "c.pt", {"step": n, **loop_state(model, [w, s],
                                                                                                      dms)}),
                   after_step=crash)
    state = load_checkpoint(tmp_path / "c.pt")
    assert state["step"] == 4
    model, dms, (w, s) = build()
    load_loop_state(state, model, [w, s], dms)
    train_loop(model, batches, task, 10, start=4, weight_optimizer=w, structure_optimizer=s, dms=dms)
    _same(ref[0], _weights(model))
    got = dms.state_dict()
    assert got["step"] == ref[1]["step"] == 10 and got["weight"] == ref[1]["weight"]
    _same(ref[1]["space"], got["space"])


def test_loop_state_of_another_model_is_refused_and_nothing_is_loaded(net, cnn):
    a, b = net(hidden=16), net(seed=1, hidden=12)
    opt_a, opt_b = torch.optim.SGD(a.parameters(), lr=0.1), torch.optim.SGD(b.parameters(), lr=0.1)
    before = _weights(b)
    with pytest.raises(CheckpointError, match="another architecture.*fc1.weight"):
        load_loop_state(loop_state(a, [opt_a]), b, [opt_b])
    _same(before, _weights(b))
    state = loop_state(b, [opt_b])
    with pytest.raises(CheckpointError, match="2 optimizer state"):
        load_loop_state(loop_state(b, [opt_b, opt_b]), b, [opt_b])
    del state["rng"]
    with pytest.raises(CheckpointError, match="'rng' is missing"):
        load_loop_state(state, b, [opt_b])
    with pytest.raises(CheckpointError, match="expected a dict"):
        load_loop_state([1, 2], b, [opt_b])  # type: ignore[arg-type]
    m1 = cnn()
    d1 = dmscale.DMS(m1, (torch.randn(1, 1, 8, 8),), dmscale.Target(flops=0.5), 4, warn=False)
    d2 = dmscale.DMS(net(), (torch.randn(1, 8),), dmscale.Target(flops=0.5), 4, warn=False)
    with pytest.raises(CheckpointError, match="search state of other groups"):
        load_loop_state({**loop_state(m1, [], d1), "dms": d2.state_dict()}, m1, [], d1)


# ------------------------------------------------------------------ non-finite values
def test_infinite_learning_rate_stops_at_step_one_naming_it_and_the_module(net, data):
    model = net()
    with pytest.raises(NonFiniteError) as err:
        train_loop(model, data((8,), 4), ImageClassification(), 5,
                   weight_optimizer=torch.optim.SGD(model.parameters(), lr=0.1), lr=lambda s: float("inf"),
                   desc="retrain")
    msg = str(err.value)
    assert "retrain" in msg and "step 1" in msg and "learning rate inf" in msg and "'fc" in msg


def test_exploding_learning_rate_stops_at_the_first_nonfinite_loss(net, data):
    model = net()
    seen = []
    msg = r"the (loss is (nan|inf)|weights became non-finite).*learning rate 1e\+30"
    with pytest.raises(NonFiniteError, match=msg):
        train_loop(model, data((8,), 4), ImageClassification(), 50,
                   weight_optimizer=torch.optim.SGD(model.parameters(), lr=1e30), on_step=seen.append)
    assert len(seen) < 5  # stopped right away, not after 50 steps of nan


def test_nonfinite_batch_is_named(net, data):
    good = data((8,), 4)

    def bad(step):
        x, y = good(step)
        if step == 2:
            x = x.clone()
            x[0, 0] = float("nan")
        return x, y

    model = net()
    with pytest.raises(NonFiniteError, match="step 3.*batch itself holds inf/nan"):
        train_loop(model, bad, ImageClassification(), 5, weight_optimizer=torch.optim.SGD(model.parameters(), lr=0.1))


def test_infinite_structure_learning_rate_is_named(net, data):
    model = net()
    dms = dmscale.DMS(model, (torch.randn(1, 8),), dmscale.Target(flops=0.3), total_steps=5, warn=False)
    with pytest.raises(NonFiniteError, match="structure ratio.*structure learning rate inf"):
        train_loop(model, data((8,), 4), ImageClassification(), 5, dms=dms,
                   structure_optimizer=torch.optim.SGD(dms.structure_parameters(), lr=float("inf")))


def test_check_finite_off_lets_a_user_run_on(net, data):
    model = net()
    hist = train_loop(model, data((8,), 4), ImageClassification(), 3,
                      weight_optimizer=torch.optim.SGD(model.parameters(), lr=float("inf")), check_finite=False)
    assert len(hist) == 3 and not all(math.isfinite(h["loss"]) for h in hist)


# ------------------------------------------------------------------ AMP
def test_bf16_autocast_runs_the_layers_in_bf16(net, data):
    model = net()
    dtypes = []
    model.fc2.register_forward_hook(lambda m, i, o: dtypes.append(o.dtype))
    dms = dmscale.DMS(model, (torch.randn(1, 8),), dmscale.Target(flops=0.5), total_steps=4, warn=False)
    hist = train_loop(model, data((8,), 4), ImageClassification(), 4, amp="bf16", dms=dms,
                      weight_optimizer=torch.optim.SGD(dms.weight_parameters(), lr=0.05),
                      structure_optimizer=torch.optim.Adam(dms.structure_parameters(), lr=0.05))
    assert torch.bfloat16 in dtypes and all(math.isfinite(h["loss"]) for h in hist)
    assert all(dms.space.importance(g).dtype == torch.float32 for g in dms.groups)


def test_fp16_grad_scaler_is_attached_so_importance_is_unscaled(net, data):
    imps = []
    for scale in (1.0, 2.0 ** 12):
        model = net()
        dms = dmscale.DMS(model, (torch.randn(1, 8),), dmscale.Target(flops=0.5), total_steps=4, warn=False)
        scaler = torch.amp.GradScaler("cpu", init_scale=scale)
        train_loop(model, data((8,), 4), ImageClassification(), 3, amp="fp16", scaler=scaler, dms=dms,
                   weight_optimizer=torch.optim.SGD(dms.weight_parameters(), lr=0.05),
                   structure_optimizer=torch.optim.Adam(dms.structure_parameters(), lr=0.05))
        assert dms.importance.grad_scale is not None and dms.nonfinite_steps == 0
        imps.append(torch.cat([dms.space.importance(g) for g in dms.groups]))
    assert float(imps[0].abs().max()) > 0
    torch.testing.assert_close(imps[1], imps[0], rtol=0.05, atol=1e-3 * float(imps[0].abs().max()))


# ------------------------------------------------------------------ small pieces
def test_cosine_lr_is_warmup_then_cosine():
    f = cosine_lr(1.0, 10, warmup=2)
    assert [f(0), f(1)] == [0.5, 1.0]
    assert f(2) == pytest.approx(1.0) and f(6) == pytest.approx(0.5) and f(10) == pytest.approx(0.0)
    assert all(f(s) >= f(s + 1) for s in range(2, 10))


def test_iterable_batches_and_a_user_loss(net):
    model = net()
    xs = [(torch.randn(4, 8), torch.randn(4, 4)) for _ in range(3)]
    task = LossFunction(lambda m, b: (F.mse_loss(m(b[0]), b[1]), {"n": len(b[0])}))
    hist = train_loop(model, iter(xs), task, 3, weight_optimizer=torch.optim.SGD(model.parameters(), lr=0.01))
    assert [h["n"] for h in hist] == [4, 4, 4]
    with pytest.raises(TypeError, match="scalar"):
        train_loop(model, iter(xs), LossFunction(lambda m, b: m(b[0])), 1,
                   weight_optimizer=torch.optim.SGD(model.parameters(), lr=0.01))
    with pytest.raises(ValueError, match="start step"):
        train_loop(model, iter(xs), task, 3, start=4)
