"""Tests for dmscale.upscale: exact widening (static equivalence), noise, HF round trips, errors."""

from __future__ import annotations

import copy
import os
import sys

import pytest
import torch
from torch import nn

sys.path.insert(0, os.path.dirname(__file__))
import upscale_models as zoo  # noqa: E402

from dmscale.mup.upscale import UpscaleError, upscale, upscale_cli, width_info  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _img(b: int = 2) -> torch.Tensor:
    return torch.randn(b, 3, 16, 16)


def _ids() -> torch.Tensor:
    return torch.randint(0, 61, (2, 9))


PLAIN = {
    "mlp": (zoo.MLP, lambda: torch.randn(5, 10)),
    "resnet": (zoo.ResNetCNN, _img),
    "mobilenetv2": (zoo.MobileNetV2ish, _img),
    "vit": (zoo.TinyViT, _img),
}
HF = {
    "gpt2": (zoo.hf_gpt2, lambda: {"input_ids": _ids()}),
    "llama": (zoo.hf_llama, lambda: {"input_ids": _ids()}),
    "hf_vit": (zoo.hf_vit, lambda: {"pixel_values": _img()}),
    "hf_resnet": (zoo.hf_resnet, lambda: {"pixel_values": _img()}),
}


def _out(model: nn.Module, x) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        y = model(**x) if isinstance(x, dict) else model(x)
    return getattr(y, "logits", y)


@pytest.mark.parametrize("k", [2, 3])
@pytest.mark.parametrize("name", list(PLAIN))
def test_static_equivalence_plain(name: str, k: int) -> None:
    torch.manual_seed(0)
    make, data = PLAIN[name]
    small = zoo.randomize_norms(make())
    x = data()
    big = upscale(small, width=k, noise=0.0, example_inputs=x)
    assert big is not small
    torch.testing.assert_close(_out(big, x), _out(small, x), rtol=1e-4, atol=1e-5)
    n_small = sum(p.numel() for p in small.parameters())
    n_big = sum(p.numel() for p in big.parameters())
    assert n_big > (k ** 2) * n_small * 0.5  # hidden matrices grew ~k²
    # the original is untouched
    assert all(p.shape == q.shape for p, q in zip(small.parameters(), make().parameters()))


@pytest.mark.parametrize("name", list(HF))
def test_static_equivalence_hf(name: str) -> None:
    torch.manual_seed(0)
    make, data = HF[name]
    small = zoo.randomize_norms(make())
    x = data()
    big = upscale(small, width=2, noise=0.0)
    y_big, y_small = _out(big, x), _out(small, x)
    assert y_big.shape == y_small.shape  # vocabulary / classes never widened
    torch.testing.assert_close(y_big, y_small, rtol=1e-4, atol=1e-5)


def test_io_dims_fixed_and_hidden_widened() -> None:
    small = zoo.MLP()
    big = upscale(small, 4)
    lin = [m for m in big.modules() if isinstance(m, nn.Linear)]
    assert (lin[0].in_features, lin[0].out_features) == (10, 64)
    assert (lin[1].in_features, lin[1].out_features) == (64, 64)
    assert (lin[2].in_features, lin[2].out_features) == (64, 3)
    assert big.net[2].normalized_shape == (64,)


def test_attention_duplicates_heads_and_keeps_head_dim() -> None:
    small = zoo.hf_llama()
    big = upscale(small, 2)
    a_s, a_b = small.model.layers[0].self_attn, big.model.layers[0].self_attn
    assert a_b.head_dim == a_s.head_dim
    assert a_b.num_key_value_groups == a_s.num_key_value_groups  # GQA ratio kept
    assert big.config.num_attention_heads == 8 and big.config.num_key_value_heads == 4
    assert big.config.hidden_size == 64 and big.config.intermediate_size == 128
    assert big.config.head_dim == small.config.head_dim
    # RoPE buffers untouched
    torch.testing.assert_close(big.model.rotary_emb.inv_freq, small.model.rotary_emb.inv_freq)
    g = upscale(zoo.hf_gpt2(), 2)
    assert g.config.n_embd == 64 and g.config.n_head == 8
    assert g.transformer.h[0].attn.head_dim == 8 and g.transformer.h[0].attn.split_size == 64


def test_tied_embeddings_stay_tied_and_logits_scaled() -> None:
    small = zoo.hf_gpt2()
    big = upscale(small, 4)
    assert big.lm_head.weight is big.transformer.wte.weight
    assert big.lm_head.weight.shape == (61, 128)
    # the 1/k logit multiplier is folded into the final LayerNorm (survives save/load)
    torch.testing.assert_close(big.transformer.ln_f.weight[::4] * 4, small.transformer.ln_f.weight)
    assert width_info(big)["fold"] == "transformer.ln_f"


class _TiedLM(nn.Module):
    """Plain tied-embedding LM without a final norm: logit multiplier must use a hook."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 8)
        self.mid = nn.Linear(8, 8)
        self.out = nn.Linear(8, 20, bias=False)
        self.out.weight = self.emb.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.mid(self.emb(ids))))


def test_tied_plain_model_uses_output_multiplier() -> None:
    small = _TiedLM()
    ids = torch.randint(0, 20, (3, 5))
    big = upscale(small, 3, example_inputs=ids)
    assert big.out.weight is big.emb.weight
    torch.testing.assert_close(_out(big, ids), _out(small, ids))
    torch.testing.assert_close(_out(copy.deepcopy(big), ids), _out(small, ids))


def test_batchnorm_running_stats_copied() -> None:
    small = zoo.randomize_norms(zoo.ResNetCNN())
    big = upscale(small, 2, example_inputs=_img())
    torch.testing.assert_close(big.stem[1].running_mean, small.stem[1].running_mean.repeat_interleave(2))
    torch.testing.assert_close(big.stem[1].running_var, small.stem[1].running_var.repeat_interleave(2))
    assert big.stem[1].num_features == 16


def test_depthwise_stays_depthwise() -> None:
    big = upscale(zoo.MobileNetV2ish(), 2, example_inputs=_img())
    dw = big.b1.block[3]
    assert dw.groups == dw.in_channels == dw.out_channels == 64
    assert big.grouped.groups == 2 and big.grouped.in_channels == 32


@pytest.mark.parametrize("bad", [2.5, 0, -2, "2", True])
def test_non_integer_width_raises(bad) -> None:
    with pytest.raises(ValueError, match=str(bad) if not isinstance(bad, str) else "'2'"):
        upscale(zoo.MLP(), bad)


def test_integral_float_width_ok() -> None:
    x = torch.randn(2, 10)
    small = zoo.MLP()
    torch.testing.assert_close(_out(upscale(small, 2.0), x), _out(small, x))


class _WithBilinear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 8)
        self.weird = nn.Bilinear(8, 8, 8)
        self.b = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        return self.b(self.weird(h, h))


class _FlattenCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 8 * 8, 6)
        self.out = nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.fc(torch.relu(self.conv(x)).flatten(1))))


def test_unsupported_module_raises_naming_it() -> None:
    with pytest.raises(UpscaleError, match="weird"):
        upscale(_WithBilinear(), 2)


def test_flatten_into_linear_is_detected() -> None:
    with pytest.raises(UpscaleError, match="not function-preserving"):
        upscale(_FlattenCNN(), 2, example_inputs=torch.randn(2, 1, 8, 8))


def test_noise_small_loss_jump_and_scale() -> None:
    torch.manual_seed(0)
    small = zoo.MLP(hidden=32)
    x, y = torch.randn(64, 10), torch.randint(0, 3, (64,))
    exact = upscale(small, 4, noise=0.0)
    noisy = upscale(small, 4, noise=1e-3, seed=1)
    loss = lambda m: nn.functional.cross_entropy(_out(m, x), y).item()  # noqa: E731
    assert loss(exact) == pytest.approx(loss(small), abs=1e-5)
    assert loss(noisy) != loss(exact)
    assert abs(loss(noisy) - loss(exact)) < 1e-2
    # width-dependent scale: (W_noisy - W_exact) * k_in ~ N(0, σ̄²/fan_in_wide); readout gets no noise
    d = (noisy.net[3].weight - exact.net[3].weight) * 4
    assert d.std().item() == pytest.approx(1e-3 / (128 ** 0.5), rel=0.1)
    d0 = noisy.net[0].weight - exact.net[0].weight
    assert d0.std().item() == pytest.approx(1e-3 / (10 ** 0.5), rel=0.15)
    torch.testing.assert_close(noisy.net[5].weight, exact.net[5].weight, rtol=0, atol=0)
    torch.testing.assert_close(noisy.net[0].bias, exact.net[0].bias, rtol=0, atol=0)
    bigger = upscale(small, 4, noise=1e-1, seed=1)
    assert abs(loss(bigger) - loss(exact)) > abs(loss(noisy) - loss(exact))


def test_noise_copies_diverge_under_training() -> None:
    torch.manual_seed(0)
    small = zoo.MLP(hidden=8)
    from dmscale.mup.optim import mup_optimizer

    x, y = torch.randn(32, 10), torch.randint(0, 3, (32,))
    for noise, should_diverge in [(0.0, False), (1e-2, True)]:
        big = upscale(small, 2, noise=noise, seed=0)
        opt = mup_optimizer(big, base=small, kind="adam", lr=1e-2)
        for _ in range(10):
            opt.zero_grad()
            nn.functional.cross_entropy(big(x), y).backward()
            opt.step()
        w = big.net[3].weight.detach()
        gap = (w[0::2] - w[1::2]).abs().max().item()  # adjacent copies of the same hidden unit
        assert (gap > 1e-4) == should_diverge, (noise, gap)


def test_seed_reproducible() -> None:
    small = zoo.MLP()
    a, b = upscale(small, 2, 1e-2, seed=3), upscale(small, 2, 1e-2, seed=3)
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


def test_upscale_twice_composes_factors() -> None:
    small = zoo.MLP()
    x = torch.randn(3, 10)
    big = upscale(upscale(small, 2), 3)
    torch.testing.assert_close(_out(big, x), _out(small, x))
    info = width_info(big)
    assert info["width"] == 6
    assert info["params"]["net.3.weight"] == (6, 6)
    assert info["params"]["net.5.weight"] == (6, 1)


@pytest.mark.parametrize("name", list(HF))
def test_hf_save_pretrained_roundtrip(name: str, tmp_path) -> None:
    make, data = HF[name]
    small = make()
    big = upscale(small, 2, noise=1e-3, seed=0)
    big.save_pretrained(tmp_path)
    again = type(big).from_pretrained(tmp_path)
    x = data()
    torch.testing.assert_close(_out(again, x), _out(big, x))
    sd, sd2 = big.state_dict(), again.state_dict()
    assert sd.keys() == sd2.keys() and all(torch.equal(sd[k], sd2[k]) for k in sd)
    assert width_info(again)["params"] == width_info(big)["params"]


def test_upscale_cli_saved_module(tmp_path) -> None:
    import dmscale

    small = zoo.MLP()
    src, dst = tmp_path / "small", tmp_path / "big"
    dmscale.save(small, src)
    assert upscale_cli([str(src), "--width", "2", "--noise", "0", "--out", str(dst), "--trust", "upscale_models"]) == 0
    big = dmscale.load(dst, trust=["upscale_models"])
    x = torch.randn(4, 10)
    torch.testing.assert_close(_out(big, x), _out(small, x))
    assert big.net[0].out_features == 32
