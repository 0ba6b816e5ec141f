"""Tests for dmscale.mup: the fixed μP base (set_base and its record), μP param groups, optimizer-state
transfer, and the coordinate check.  Long dynamic-equivalence runs are in test_mup_equivalence.py."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import zoo

import dmscale
from dmscale.mup import (ScaledReadout, UpscaleError, coord_check, infer_width_info, multipliers,
                         mup_factors, mup_optimizer, mup_param_groups, set_base, upscale, upscale_optimizer_state,
                         width_info)

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _by_name(groups):
    return {n: g for g in groups for n in g["param_names"]}


def _lrs(model, **kw):
    return {n: (g["lr"], g.get("eps")) for n, g in _by_name(mup_param_groups(model, **kw)).items()}


def test_factor_table() -> None:
    assert mup_factors("sgd", 4, 4) == {"lr": 1.0, "weight_decay": 1.0, "eps": 1.0}
    assert mup_factors("sgd", 1, 4)["lr"] == 4 and mup_factors("sgd", 1, 4)["weight_decay"] == 0.25
    assert mup_factors("sgd", 4, 1)["lr"] == 0.25
    assert mup_factors("adam", 4, 4) == {"lr": 0.25, "eps": 0.25, "weight_decay": 1.0}
    assert mup_factors("adamw", 4, 4) == {"lr": 0.25, "eps": 0.25, "weight_decay": 4.0}
    assert mup_factors("adamw", 1, 4) == {"lr": 1.0, "eps": 0.25, "weight_decay": 1.0}
    assert mup_factors("adamw", 0.5, 2) == {"lr": 2.0, "eps": 0.5, "weight_decay": 0.5}  # narrower than the base
    with pytest.raises(ValueError, match="lion"):
        mup_factors("lion", 1, 1)


def test_set_base_from_proxy_model_int_and_dict_agree() -> None:
    a, b, c = zoo.NormMLP(hidden=64), zoo.NormMLP(hidden=64), zoo.NormMLP(hidden=64)
    set_base(a, zoo.NormMLP(hidden=16))
    set_base(b, 16)
    set_base(c, {"hidden": 16})
    ka, kb, kc = multipliers(a), multipliers(b), multipliers(c)
    assert ka == kb == kc
    assert ka["net.3.weight"] == (4, 4) and ka["net.0.weight"] == (1, 4) and ka["net.5.weight"] == (4, 1)
    assert ka["net.2.weight"] == (1, 4) and ka["net.5.bias"] == (1, 1)
    e = width_info(a)["params"]["net.3.weight"]
    assert e == {"k": [4, 4], "dims": [1, 0], "base": [16, 16], "shape": [64, 64]}
    groups = _by_name(mup_param_groups(a, kind="adamw", lr=1e-2, weight_decay=0.1, eps=1e-8))
    assert groups["net.3.weight"]["lr"] == pytest.approx(1e-2 / 4) and groups["net.3.weight"]["eps"] == pytest.approx(1e-8 / 4)
    assert groups["net.3.weight"]["weight_decay"] == pytest.approx(0.4)
    assert groups["net.0.weight"]["lr"] == pytest.approx(1e-2) and groups["net.0.bias"]["eps"] == pytest.approx(1e-8 / 4)
    assert groups["net.5.weight"]["lr"] == pytest.approx(1e-2 / 4) and groups["net.5.bias"]["eps"] == 1e-8
    assert sum(len(g["params"]) for g in mup_param_groups(a)) == len(list(a.parameters()))
    opt = torch.optim.AdamW(mup_param_groups(a, kind="adamw", lr=1e-3))  # usable by the user's optimizer
    assert len(opt.param_groups) == 4


def test_set_base_narrower_than_proxy_and_self() -> None:
    m = zoo.NormMLP(hidden=8)
    set_base(m, zoo.NormMLP(hidden=16))
    assert multipliers(m)["net.3.weight"] == (0.5, 0.5)
    n = zoo.NormMLP(hidden=8)
    set_base(n)  # its own base: every multiplier 1
    assert set(multipliers(n).values()) == {(1, 1)}
    g = _by_name(mup_param_groups(n, kind="adamw", lr=0.1, eps=1e-8))
    assert {v["lr"] for v in g.values()} == {0.1} and {v["eps"] for v in g.values()} == {1e-8}


def test_set_base_transformer_roles() -> None:
    m = zoo.hf_llama(hidden=64, heads=8, kv_heads=4)  # ffn = 128
    set_base(m, {"hidden": 16, "ffn": 64})
    k = multipliers(m)
    assert k["model.layers.0.mlp.up_proj.weight"] == (4, 2) and k["model.layers.0.mlp.down_proj.weight"] == (2, 4)
    assert k["model.layers.0.self_attn.q_proj.weight"] == (4, 4)  # heads follow hidden unless given
    ref = zoo.hf_llama(hidden=64, heads=8, kv_heads=4)
    set_base(ref, zoo.hf_llama(hidden=16, heads=2, kv_heads=1).__class__(
        type(ref.config)(**{**ref.config.to_dict(), "hidden_size": 16, "intermediate_size": 64,
                            "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 8})))
    assert multipliers(ref) == k


def test_set_base_errors() -> None:
    with pytest.raises(ValueError, match="several sizes"):
        set_base(zoo.DeepMLP((6, 8, 10)), 4)  # one base width cannot describe uneven dims
    with pytest.raises(ValueError, match="unknown"):
        set_base(zoo.NormMLP(), {"width": 4})
    with pytest.raises(ValueError, match="positive"):
        set_base(zoo.NormMLP(), {"hidden": 0})
    with pytest.raises(UpscaleError, match="missing from the base"):
        set_base(zoo.NormMLP(), zoo.BasicResNet())
    with pytest.raises(UpscaleError, match="not a width"):
        set_base(zoo.NormMLP(), zoo.NormMLP(d_in=12))
    with pytest.raises(UpscaleError, match="no μP base"):
        mup_optimizer(zoo.NormMLP(), "adamw")
    with pytest.raises(TypeError, match="base="):
        mup_param_groups(zoo.NormMLP(), zoo.NormMLP())  # the old positional base


def test_stale_record_is_refused() -> None:
    m = zoo.NormMLP(hidden=32)
    set_base(m, 16)
    m.net[3] = nn.Linear(32, 24)  # the model changed after set_base (e.g. pruned)
    m.net[5] = nn.Linear(24, 3)
    with pytest.raises(UpscaleError, match="changed after set_base"):
        mup_optimizer(m, "adamw")


def test_record_survives_deepcopy_save_load_compile_and_state_dict(tmp_path) -> None:
    small = zoo.NormMLP()
    set_base(small, 8)
    big = upscale(small, 4, sigma=1e-3, seed=0)
    ref = _lrs(big, kind="adam", lr=1.0, eps=1.0)
    assert _lrs(copy.deepcopy(big), kind="adam", lr=1.0, eps=1.0) == ref
    compiled = torch.compile(big)
    assert _lrs(compiled, kind="adam", lr=1.0, eps=1.0) == ref
    assert sum(len(g["params"]) for g in mup_optimizer(compiled, "adamw").param_groups) == len(list(big.parameters()))
    dmscale.save(big, tmp_path / "big")
    again = dmscale.load(tmp_path / "big", trust=["zoo"])
    assert width_info(again) == width_info(big)
    assert _lrs(again, kind="adam", lr=1.0, eps=1.0) == ref
    assert "_dmscale_width" not in "".join(big.state_dict())  # nothing added to the state dict
    # a state_dict loaded into a model that has the record keeps it; a fresh model gets it from set_base
    fresh = zoo.NormMLP(hidden=64)
    fresh.load_state_dict(big.state_dict())
    assert width_info(fresh) is None
    set_base(fresh, 8)
    assert _lrs(fresh, kind="adam", lr=1.0, eps=1.0) == ref
    # base=small: multipliers re-expressed relative to another model of the architecture
    assert multipliers(big, base=small)["net.3.weight"] == (4, 4)
    assert infer_width_info(fresh, small)["params"] == multipliers(big, base=small)


def test_record_survives_hf_save_pretrained(tmp_path) -> None:
    small = zoo.hf_gpt2()
    set_base(small, zoo.hf_gpt2(hidden=16, heads=2))
    big = upscale(small, 2)
    big.save_pretrained(tmp_path)
    again = type(big).from_pretrained(tmp_path)
    assert width_info(again)["params"] == width_info(big)["params"]
    assert _lrs(again, kind="adamw", lr=1.0) == _lrs(big, kind="adamw", lr=1.0)
    ids = torch.randint(0, 61, (2, 7))
    torch.testing.assert_close(again(ids).logits, big(ids).logits)


def test_tied_head_output_multiplier_from_set_base() -> None:
    """μP's tied readout multiplier 1/m: folded into the final norm (HF) or put on a ScaledReadout head."""
    g = zoo.hf_gpt2(hidden=32)
    ln_before = g.transformer.ln_f.weight.detach().clone()
    set_base(g, zoo.hf_gpt2(hidden=8, heads=2))
    rec = width_info(g)
    assert rec["fold"] == "norm:transformer.ln_f" and rec["output_mult"] == 0.25
    torch.testing.assert_close(g.transformer.ln_f.weight.detach(), ln_before / 4)
    k = multipliers(g)
    assert k["transformer.ln_f.weight"] == (4, 1) and k["transformer.wte.weight"] == (1, 4)
    with pytest.raises(UpscaleError, match="already has a μP base"):
        set_base(g, zoo.hf_gpt2(hidden=16, heads=2))
    h = zoo.hf_gpt2(hidden=32)
    set_base(h, zoo.hf_gpt2(hidden=8, heads=2), output_mult=False)
    assert width_info(h)["output_mult"] == 1.0 and multipliers(h)["transformer.ln_f.weight"] == (1, 4)
    from test_upscale import _TiedLM

    t = _TiedLM()
    set_base(t, 2)
    assert type(t.out) is ScaledReadout and t.out.output_mult == 0.25 and width_info(t)["fold"] == "readout:out"


def test_mup_attention_scale() -> None:
    g = zoo.hf_gpt2(hidden=32, heads=2)  # head dim 16
    set_base(g, zoo.hf_gpt2(hidden=8, heads=2), mup_attention=True)  # base head dim 4
    assert g.transformer.h[0].attn.scaling == pytest.approx(4 ** 0.5 / 16)
    assert width_info(g)["attention"]["base_head_dim"] == [4]
    big = upscale(g, 2, attention="grow_head_dim")
    assert big.transformer.h[0].attn.scaling == pytest.approx(4 ** 0.5 / 32)  # the same μP law at head dim 32
    with pytest.raises(UpscaleError, match="no attention"):
        set_base(zoo.NormMLP(), 4, mup_attention=True)


def test_upscale_keeps_base_and_composes() -> None:
    small = zoo.NormMLP(hidden=32)
    set_base(small, 16)
    big = upscale(upscale(small, 2), 3)
    assert multipliers(big)["net.3.weight"] == (12, 12)
    assert width_info(big)["params"]["net.3.weight"]["base"] == [16, 16]
    assert multipliers(big, base=small)["net.3.weight"] == (6, 6)  # base=small: the special case
    g = zoo.hf_gpt2(hidden=16, heads=2)
    set_base(g, zoo.hf_gpt2(hidden=8, heads=2))
    gb = upscale(g, 2)
    assert width_info(gb)["output_mult"] == 0.25 and multipliers(gb)["transformer.ln_f.weight"] == (4, 1)
    assert multipliers(gb, base=g)["transformer.ln_f.weight"] == (2, 1)


OPTS = {
    "sgd-momentum": (torch.optim.SGD, "sgd", dict(lr=0.1, momentum=0.9)),
    "adam": (torch.optim.Adam, "adam", dict(lr=1e-2)),
    "amsgrad": (torch.optim.Adam, "adam", dict(lr=1e-2, amsgrad=True)),
    "adamw": (torch.optim.AdamW, "adamw", dict(lr=1e-2, weight_decay=0.1)),
}


@pytest.mark.parametrize("opt", list(OPTS))
def test_upscale_optimizer_state_values(opt) -> None:
    """Step counts copied; first moments ÷ k_out, second moments ÷ k_out², expanded by the index maps."""
    torch.manual_seed(0)
    small = zoo.NormMLP()
    cls, kind, kw = OPTS[opt]
    opt_s = cls(small.parameters(), **kw)
    x, y = torch.randn(8, 10), torch.randint(0, 3, (8,))
    for _ in range(3):
        opt_s.zero_grad()
        nn.functional.cross_entropy(small(x), y).backward()
        opt_s.step()
    big = upscale(small, 4)
    opt_b = mup_optimizer(big, kind, base=small, **kw)
    upscale_optimizer_state(opt_s, opt_b, small, big)
    sp, bp = dict(small.named_parameters()), dict(big.named_parameters())
    keys = {"sgd-momentum": ["momentum_buffer"], "adam": ["exp_avg", "exp_avg_sq"],
            "amsgrad": ["exp_avg", "exp_avg_sq", "max_exp_avg_sq"], "adamw": ["exp_avg", "exp_avg_sq"]}[opt]
    for n, k_out in (("net.3.weight", 4), ("net.0.weight", 4), ("net.5.weight", 1), ("net.2.bias", 4)):
        s_st, b_st = opt_s.state[sp[n]], opt_b.state[bp[n]]
        for key in keys:
            src = s_st[key].repeat_interleave(4 if n != "net.5.weight" else 1, 0)
            if n in ("net.3.weight", "net.5.weight"):
                src = src.repeat_interleave(4, 1)
            div = k_out ** 2 if "sq" in key else k_out
            torch.testing.assert_close(b_st[key], src / div)
        if "step" in s_st:
            assert float(b_st["step"]) == float(s_st["step"]) == 3.0
    assert len(opt_b.state) == len(list(big.parameters()))


def test_upscale_optimizer_state_errors() -> None:
    small = zoo.NormMLP()
    opt_s = torch.optim.Adam(small.parameters())
    nn.functional.cross_entropy(small(torch.randn(2, 10)), torch.tensor([0, 1])).backward()
    opt_s.step()
    big = upscale(small, 2)
    with pytest.raises(UpscaleError, match="not produced by dmscale.upscale"):
        upscale_optimizer_state(opt_s, torch.optim.Adam(big.parameters()), small, copy.deepcopy(big))
    other = torch.optim.Adam(list(big.parameters())[:2])
    with pytest.raises(UpscaleError, match="does not hold"):
        upscale_optimizer_state(opt_s, other, small, big)


def _coord(parametrization: str, widths=(32, 128, 512), steps: int = 3):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(32, 10, generator=g), torch.randint(0, 3, (32,), generator=g)) for _ in range(3)]
    models = {}
    for w in widths:
        torch.manual_seed(w)
        m = zoo.NormMLP(hidden=w)
        if parametrization == "mup":
            set_base(m, widths[0])
        models[w] = m
    if parametrization == "mup":
        def factory(m): return mup_optimizer(m, "adam", lr=1e-2)
    else:
        def factory(m): return torch.optim.Adam(m.parameters(), lr=1e-2)
    return coord_check(models, batches, factory, steps=steps)


def test_coord_check_mup_is_width_independent_and_sp_grows(tmp_path) -> None:
    mup, sp = _coord("mup"), _coord("sp")
    for res in (mup, sp):
        assert set(res) == {32, 128, 512}
        assert set(res[32]["activation"]) == {"net.0", "net.2", "net.3", "net.5", "<output>"}
        assert all(len(v) == 4 for v in res[32]["activation"].values())
        assert all(len(v) == 3 for v in res[32]["update"].values())
    for layer in ("net.3", "net.5", "<output>"):  # hidden matrix and readout: their updates ∝ width under SP
        r_mup = mup[512]["update"][layer][-1] / mup[32]["update"][layer][-1]
        r_sp = sp[512]["update"][layer][-1] / sp[32]["update"][layer][-1]
        assert 0.5 < r_mup < 2.0, (layer, r_mup)
        assert r_sp > 4.0, (layer, r_sp)
    png = tmp_path / "coord.png"
    from dmscale.mup import plot_coord_check

    plot_coord_check(mup, str(png))
    assert png.stat().st_size > 5000


def test_coord_check_accepts_factories_and_validates() -> None:
    x, y = torch.randn(8, 10), torch.randint(0, 3, (8,))
    res = coord_check({8: lambda: zoo.NormMLP(hidden=8)}, (x, y), lambda m: torch.optim.SGD(m.parameters(), lr=0.1),
                      steps=1)
    assert res[8]["update"]["net.0"][0] > 0
    with pytest.raises(ValueError, match="steps"):
        coord_check({8: zoo.NormMLP()}, (x, y), lambda m: torch.optim.SGD(m.parameters(), lr=0.1), steps=0)
    with pytest.raises(ValueError, match="empty"):
        coord_check({}, (x, y), lambda m: None)
