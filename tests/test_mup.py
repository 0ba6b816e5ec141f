"""Tests for dmscale.mup: μP optimizer scaling (dynamic equivalence), width side table, coord check."""

from __future__ import annotations

import copy
import os
import sys

import pytest
import torch
from torch import nn

sys.path.insert(0, os.path.dirname(__file__))
import upscale_models as zoo  # noqa: E402

from dmscale.mup.optim import coord_check, infer_width_info, mup_factors, mup_optimizer, mup_param_groups  # noqa: E402
from dmscale.mup.upscale import upscale, upscale_optimizer_state, width_info  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

OPTS = {
    "sgd": (torch.optim.SGD, dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3)),
    "adam": (torch.optim.Adam, dict(lr=1e-2, weight_decay=1e-3, eps=1e-6, amsgrad=True)),
    "adamw": (torch.optim.AdamW, dict(lr=1e-2, weight_decay=0.1, eps=1e-6)),
}


def _data(name: str, n: int = 4):
    """A few fixed batches (inputs, targets) per model family."""
    g = torch.Generator().manual_seed(1)
    if name == "mlp":
        return [(torch.randn(8, 10, generator=g), torch.randint(0, 3, (8,), generator=g)) for _ in range(n)]
    if name == "cnn":
        return [(torch.randn(4, 3, 16, 16, generator=g), torch.randint(0, 5, (4,), generator=g)) for _ in range(n)]
    ids = [torch.randint(0, 61, (2, 8), generator=g) for _ in range(n)]
    return [({"input_ids": t}, t) for t in ids]


MAKERS = {"mlp": zoo.MLP, "cnn": zoo.ResNetCNN, "gpt2": zoo.hf_gpt2, "llama": zoo.hf_llama}


def _fwd(model: nn.Module, x) -> torch.Tensor:
    y = model(**x) if isinstance(x, dict) else model(x)
    return getattr(y, "logits", y)


def _loss(model: nn.Module, x, y) -> torch.Tensor:
    out = _fwd(model, x)
    return nn.functional.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))


def _train(model: nn.Module, opt: torch.optim.Optimizer, batches, steps: int) -> None:
    model.train()
    for i in range(steps):
        x, y = batches[i % len(batches)]
        opt.zero_grad()
        _loss(model, x, y).backward()
        opt.step()


@pytest.fixture
def float64():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


@pytest.mark.parametrize("kind", list(OPTS))
@pytest.mark.parametrize("name", list(MAKERS))
def test_dynamic_equivalence(name: str, kind: str, float64) -> None:
    """Zero-noise upscaled model + mup_optimizer tracks the base model + plain optimizer for 20 steps."""
    torch.manual_seed(0)
    small = zoo.randomize_norms(MAKERS[name]())
    big = upscale(small, 2, noise=0.0)
    cls, kw = OPTS[kind]
    opt_s = cls(small.parameters(), **kw)
    opt_b = mup_optimizer(big, base=small, kind=kind, **kw)
    batches = _data(name)
    _train(small, opt_s, batches, 20)
    _train(big, opt_b, batches, 20)
    small.eval(), big.eval()
    x = batches[0][0]
    with torch.no_grad():
        ref, got = _fwd(small, x), _fwd(big, x)
    # HF Llama's RMSNorm computes in float32 even in a float64 model: float32 tolerance there
    tol = dict(rtol=1e-4, atol=1e-4) if name == "llama" else dict(rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(got, ref, **tol)


def test_dynamic_equivalence_fails_without_mup(float64) -> None:
    """Control: the same wide model with a plain optimizer drifts away (the check can fail)."""
    torch.manual_seed(0)
    small = zoo.MLP()
    big = upscale(small, 4)
    batches = _data("mlp")
    _train(small, torch.optim.Adam(small.parameters(), lr=1e-2), batches, 20)
    _train(big, torch.optim.Adam(big.parameters(), lr=1e-2), batches, 20)
    small.eval(), big.eval()
    x = batches[0][0]
    assert (_fwd(small, x) - _fwd(big, x)).abs().max().item() > 1e-3


def test_small_model_has_unit_factors() -> None:
    small = zoo.MLP()
    groups = mup_param_groups(small, base=small, kind="adamw", lr=0.1, weight_decay=0.01, eps=1e-8)
    assert len(groups) == 1 and groups[0]["lr"] == 0.1 and groups[0]["eps"] == 1e-8


def test_factor_table() -> None:
    assert mup_factors("sgd", 4, 4) == {"lr": 1.0, "weight_decay": 1.0, "eps": 1.0}
    assert mup_factors("sgd", 1, 4)["lr"] == 4 and mup_factors("sgd", 1, 4)["weight_decay"] == 0.25
    assert mup_factors("sgd", 4, 1)["lr"] == 0.25
    assert mup_factors("adam", 4, 4) == {"lr": 0.25, "eps": 0.25, "weight_decay": 1.0}
    assert mup_factors("adamw", 4, 4) == {"lr": 0.25, "eps": 0.25, "weight_decay": 4.0}
    assert mup_factors("adamw", 1, 4) == {"lr": 1.0, "eps": 0.25, "weight_decay": 1.0}
    with pytest.raises(ValueError, match="lion"):
        mup_factors("lion", 1, 1)


def test_param_groups_per_kind() -> None:
    small = zoo.MLP()
    big = upscale(small, 4)
    groups = mup_param_groups(big, base=small, kind="adamw", lr=1e-2, weight_decay=0.1, eps=1e-8)
    by_name = {n: g for g in groups for n in g["param_names"]}
    assert by_name["net.3.weight"]["lr"] == pytest.approx(1e-2 / 4)  # hidden matrix
    assert by_name["net.3.weight"]["eps"] == pytest.approx(1e-8 / 4)
    assert by_name["net.3.weight"]["weight_decay"] == pytest.approx(0.4)
    assert by_name["net.0.weight"]["lr"] == pytest.approx(1e-2)  # input layer
    assert by_name["net.0.bias"]["eps"] == pytest.approx(1e-8 / 4)
    assert by_name["net.5.weight"]["lr"] == pytest.approx(1e-2 / 4)  # readout, stored with 1/k
    assert by_name["net.5.bias"]["lr"] == pytest.approx(1e-2) and by_name["net.5.bias"]["eps"] == 1e-8
    n_params = sum(len(g["params"]) for g in groups)
    assert n_params == len(list(big.parameters()))
    opt = torch.optim.AdamW(groups)  # usable directly by the user's optimizer
    assert len(opt.param_groups) == len(groups)


def test_width_info_survives_deepcopy_and_state_dict() -> None:
    small = zoo.MLP()
    big = upscale(small, 4, noise=1e-3)
    ref = {n: (g["lr"], g["eps"]) for g in mup_param_groups(big, kind="adam", lr=1.0, eps=1.0) for n in g["param_names"]}
    clone = copy.deepcopy(big)
    assert width_info(clone)["params"] == width_info(big)["params"]
    # a fresh wide model built by the user (no side table) + state_dict: factors inferred from base shapes
    fresh = zoo.MLP(hidden=64)
    fresh.load_state_dict(big.state_dict())
    assert width_info(fresh) is None
    got = {n: (g["lr"], g["eps"]) for g in mup_param_groups(fresh, base=small, kind="adam", lr=1.0, eps=1.0)
           for n in g["param_names"]}
    assert got == ref
    assert "_dmscale_width" not in "".join(big.state_dict())  # nothing added to the state dict
    with pytest.raises(ValueError, match="width info"):
        mup_param_groups(fresh, kind="adam")


def test_infer_matches_table_for_hf_models() -> None:
    small = zoo.hf_llama()
    big = upscale(small, 2)
    assert infer_width_info(big, small)["params"] == width_info(big)["params"]
    g_small = zoo.hf_gpt2()
    g_big = upscale(g_small, 2)
    # the folded logit multiplier is only in the table: table must win over shapes
    assert width_info(g_big)["params"]["transformer.ln_f.weight"] == (2, 1)
    groups = mup_param_groups(g_big, base=g_small, kind="sgd", lr=1.0)
    by_name = {n: g for g in groups for n in g["param_names"]}
    assert by_name["transformer.ln_f.weight"]["lr"] == 0.5
    assert by_name["transformer.h.0.ln_1.weight"]["lr"] == 2.0


def test_param_groups_from_compiled_module() -> None:
    small = zoo.MLP()
    big = upscale(small, 2)
    compiled = torch.compile(big)
    assert width_info(compiled) is width_info(big)
    groups = mup_param_groups(compiled, kind="adamw", lr=1e-3)
    names = {n for g in groups for n in g["param_names"]}
    assert names == {n for n, _ in big.named_parameters()}
    opt = mup_optimizer(compiled, kind="adamw", lr=1e-3)
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(big.parameters()))


def test_optimizer_state_transfer_mid_training(float64) -> None:
    """Upscale after 5 Adam steps, transfer moments, continue: still tracks the base model."""
    torch.manual_seed(0)
    small = zoo.randomize_norms(zoo.ResNetCNN())
    batches = _data("cnn")
    kw = dict(lr=1e-2, eps=1e-6, weight_decay=0.05)
    opt_s = torch.optim.AdamW(small.parameters(), **kw)
    _train(small, opt_s, batches, 5)
    snap_model, snap_opt = copy.deepcopy((small, opt_s))  # base run at the moment of upscaling
    big = upscale(small, 2)
    opt_b = mup_optimizer(big, base=small, kind="adamw", **kw)
    upscale_optimizer_state(opt_s, opt_b, small, big)
    _train(small, opt_s, batches[1:] + batches[:1], 10)
    _train(big, opt_b, batches[1:] + batches[:1], 10)
    small.eval(), big.eval()
    x = batches[0][0]
    torch.testing.assert_close(_fwd(big, x), _fwd(small, x), rtol=1e-8, atol=1e-8)
    # control: without the transfer (fresh moments) the runs differ
    big2 = upscale(snap_model, 2)
    opt2 = mup_optimizer(big2, base=snap_model, kind="adamw", **kw)
    _train(snap_model, snap_opt, batches, 3)
    _train(big2, opt2, batches, 3)
    snap_model.eval(), big2.eval()
    assert (_fwd(big2, x) - _fwd(snap_model, x)).abs().max().item() > 1e-6


def test_optimizer_state_transfer_sgd_momentum(float64) -> None:
    torch.manual_seed(0)
    small = zoo.hf_gpt2()
    batches = _data("gpt2")
    kw = dict(lr=0.1, momentum=0.9, weight_decay=1e-3)
    opt_s = torch.optim.SGD(small.parameters(), **kw)
    _train(small, opt_s, batches, 4)
    big = upscale(small, 2)
    opt_b = mup_optimizer(big, base=small, kind="sgd", **kw)
    upscale_optimizer_state(opt_s, opt_b, small, big)
    _train(small, opt_s, batches, 6)
    _train(big, opt_b, batches, 6)
    small.eval(), big.eval()
    x = batches[0][0]
    torch.testing.assert_close(_fwd(big, x), _fwd(small, x), rtol=1e-8, atol=1e-8)


def test_coord_check_writes_plot(tmp_path) -> None:
    png = tmp_path / "coord.png"
    data = [(torch.randn(16, 10), torch.randint(0, 3, (16,))) for _ in range(2)]
    res = coord_check(lambda w: zoo.MLP(hidden=w), widths=[8, 16, 32], data=data, steps=2,
                      out_png=str(png), kind="adam", lr=1e-2, upscale_from=8)
    assert png.exists() and png.stat().st_size > 1000
    assert set(res) == {8, 16, 32}
    # upscaled models keep activation scales O(1): same per-layer scale at every width at step 0
    for layer, vals in res[8].items():
        for w in (16, 32):
            assert res[w][layer][0] == pytest.approx(vals[0], rel=0.05), layer
    res2 = coord_check(lambda w: zoo.MLP(hidden=w), widths=[8, 32], data=data, steps=2, kind="sgd", lr=0.1)
    assert set(res2[32]) == set(res2[8])
