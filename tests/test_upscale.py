"""Tests for dmscale.upscale: exact widening (static equivalence), noise, HF round trips, errors."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import zoo

from dmscale.mup import UpscaleError, upscale, width_info

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _img(b: int = 2) -> torch.Tensor:
    return torch.randn(b, 3, 16, 16)


def _ids() -> torch.Tensor:
    return torch.randint(0, 61, (2, 9))


PLAIN = {
    "mlp": (zoo.NormMLP, lambda: torch.randn(5, 10)),
    "resnet": (zoo.BasicResNet, _img),
    "mobilenetv2": (zoo.GroupedMobileNet, _img),
    "vit": (zoo.EncoderViT, _img),
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
    small = zoo.NormMLP()
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
    assert width_info(big)["fold"] == "norm:transformer.ln_f"
    assert width_info(big)["output_mult"] == 0.25


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


def test_tied_plain_model_uses_output_multiplier(tmp_path) -> None:
    import dmscale
    from dmscale.mup import ScaledReadout

    small = _TiedLM()
    ids = torch.randint(0, 20, (3, 5))
    big = upscale(small, 3, example_inputs=ids)
    assert big.out.weight is big.emb.weight
    assert type(big.out) is ScaledReadout and big.out.output_mult == pytest.approx(1 / 3)
    assert type(small.out) is nn.Linear  # the small model is untouched
    torch.testing.assert_close(_out(big, ids), _out(small, ids))
    torch.testing.assert_close(_out(copy.deepcopy(big), ids), _out(small, ids))
    dmscale.save(big, tmp_path / "big")  # the multiplier is a module attribute: save/load keep it
    again = dmscale.load(tmp_path / "big", trust=["test_upscale"])
    torch.testing.assert_close(_out(again, ids), _out(small, ids))
    assert width_info(again)["fold"] == "readout:out"
    bigger = upscale(big, 2, example_inputs=ids)  # composes: 1/6 in total
    assert bigger.out.output_mult == pytest.approx(1 / 6)
    torch.testing.assert_close(_out(bigger, ids), _out(small, ids))


def test_batchnorm_running_stats_copied() -> None:
    small = zoo.randomize_norms(zoo.BasicResNet())
    big = upscale(small, 2, example_inputs=_img())
    torch.testing.assert_close(big.stem[1].running_mean, small.stem[1].running_mean.repeat_interleave(2))
    torch.testing.assert_close(big.stem[1].running_var, small.stem[1].running_var.repeat_interleave(2))
    assert big.stem[1].num_features == 16


def test_depthwise_stays_depthwise() -> None:
    big = upscale(zoo.GroupedMobileNet(), 2, example_inputs=_img())
    dw = big.b1.block[3]
    assert dw.groups == dw.in_channels == dw.out_channels == 64
    assert big.grouped.groups == 2 and big.grouped.in_channels == 32


@pytest.mark.parametrize("bad", [2.5, 0, -2, "2", True])
def test_non_integer_width_raises(bad) -> None:
    with pytest.raises(ValueError, match=str(bad) if not isinstance(bad, str) else "'2'"):
        upscale(zoo.NormMLP(), bad)


def test_integral_float_width_ok() -> None:
    x = torch.randn(2, 10)
    small = zoo.NormMLP()
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


def test_noise_mlp_form_scale_and_loss_jump() -> None:
    torch.manual_seed(0)
    small = zoo.NormMLP(hidden=32)
    x, y = torch.randn(64, 10), torch.randint(0, 3, (64,))
    exact = upscale(small, 4, sigma=0.0)
    noisy = upscale(small, 4, "mlp", 1e-3, seed=1)
    loss = lambda m: nn.functional.cross_entropy(_out(m, x), y).item()  # noqa: E731
    assert loss(exact) == pytest.approx(loss(small), abs=1e-5)
    assert loss(noisy) != loss(exact)
    assert abs(loss(noisy) - loss(exact)) < 1e-2
    # width-independent σ: (W_noisy - W_exact) * k_in ~ N(0, σ²/fan_in_wide); readout, biases, norms get none
    d = (noisy.net[3].weight - exact.net[3].weight) * 4
    assert d.std().item() == pytest.approx(1e-3 / (128 ** 0.5), rel=0.1)
    d0 = noisy.net[0].weight - exact.net[0].weight
    assert d0.std().item() == pytest.approx(1e-3 / (10 ** 0.5), rel=0.15)
    for a, b in ((noisy.net[5].weight, exact.net[5].weight), (noisy.net[0].bias, exact.net[0].bias),
                 (noisy.net[2].weight, exact.net[2].weight)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    bigger = upscale(small, 4, "mlp", 1e-1, seed=1)
    assert abs(loss(bigger) - loss(exact)) > abs(loss(noisy) - loss(exact))
    # the legacy spelling noise=<number> is the mlp form
    legacy = upscale(small, 4, noise=1e-3, seed=1)
    torch.testing.assert_close(legacy.net[3].weight, noisy.net[3].weight, rtol=0, atol=0)
    rec = width_info(noisy)["noise"]
    assert rec["form"] == "mlp" and rec["sigma"] == 1e-3 and rec["per_tensor"]["net.3.weight"] == 1e-3
    assert set(rec["per_tensor"]) == {"net.0.weight", "net.3.weight"}


def test_noise_relative_form_is_spectral_per_tensor() -> None:
    torch.manual_seed(0)
    small = zoo.randomize_norms(zoo.BasicResNet(c=8))
    x = _img()
    exact = upscale(small, 2, sigma=0.0, example_inputs=x)
    noisy = upscale(small, 2, "relative", 0.3, example_inputs=x, seed=0)
    per = width_info(noisy)["noise"]["per_tensor"]
    assert width_info(noisy)["noise"]["form"] == "relative"
    for name in ("layer1.conv1.weight", "layer2.conv2.weight", "stem.0.weight"):
        w_exact = dict(exact.named_parameters())[name].detach()
        w_noisy = dict(noisy.named_parameters())[name].detach()
        spec = lambda t: torch.linalg.matrix_norm(t.reshape(t.shape[0], -1).double(), ord=2).item()  # noqa: E731
        # ‖noise‖₂ = t · ‖W‖₂ exactly (the noise is t·‖W‖₂/‖Z‖₂·Z)
        assert spec(w_noisy - w_exact) == pytest.approx(0.3 * spec(w_exact), rel=1e-4), name
        assert per[name] > 0
    torch.testing.assert_close(noisy.fc.weight, exact.fc.weight, rtol=0, atol=0)  # readout exact
    # the tuned per-tensor noise is reused on a larger pair: same scale per tensor, fresh Z of the new shape
    big_small = zoo.randomize_norms(zoo.BasicResNet(c=16))
    exact2 = upscale(big_small, 2, sigma=0.0, example_inputs=x)
    reused = upscale(big_small, 2, "relative", noise_dict=per, example_inputs=x, seed=0)
    assert width_info(reused)["noise"]["per_tensor"] == per
    d = (reused.layer1.conv1.weight - exact2.layer1.conv1.weight).detach()
    fan_in = exact2.layer1.conv1.weight[0].numel()
    assert d.std().item() == pytest.approx(per["layer1.conv1.weight"] / fan_in ** 0.5, rel=0.1)
    with pytest.raises(ValueError, match="missing"):
        upscale(big_small, 2, "relative", noise_dict={"fc.weight": 0.1}, example_inputs=x)
    with pytest.raises(ValueError, match=">= 0"):
        upscale(big_small, 2, "relative", noise_dict={**per, "stem.0.weight": -1.0}, example_inputs=x)


def test_noise_init_form_is_the_models_own_init() -> None:
    torch.manual_seed(0)
    small = zoo.NormMLP(hidden=32)
    exact = upscale(small, 4)
    noisy = upscale(small, 4, "init", 0.5, seed=3)
    # nn.Linear's own init: U(±1/sqrt(fan_in)) -> std 1/sqrt(3 fan_in); noise enters before the 1/k rescale
    d = (noisy.net[3].weight - exact.net[3].weight) * 4 / 0.5
    assert d.std().item() == pytest.approx(1 / (3 * 128) ** 0.5, rel=0.1)
    assert d.abs().max().item() <= 1 / 128 ** 0.5 + 1e-6
    g = zoo.hf_gpt2()
    g_exact, g_noisy = upscale(g, 2), upscale(g, 2, "init", 1.0, seed=0)
    d = (g_noisy.transformer.h[0].mlp.c_fc.weight - g_exact.transformer.h[0].mlp.c_fc.weight) * 2
    assert d.std().item() == pytest.approx(g.config.initializer_range, rel=0.1)  # GPT-2 init: N(0, 0.02²)
    de = g_noisy.transformer.wte.weight - g_exact.transformer.wte.weight  # input layer: no rescale
    assert de.std().item() == pytest.approx(g.config.initializer_range, rel=0.1)
    torch.testing.assert_close(g_noisy.transformer.ln_f.weight, g_exact.transformer.ln_f.weight)


def test_noise_defaults_per_model_kind() -> None:
    assert width_info(upscale(zoo.NormMLP(), 2, sigma=0.1, seed=0))["noise"]["form"] == "mlp"
    assert width_info(upscale(zoo.BasicResNet(), 2, sigma=0.1, example_inputs=_img(), seed=0))["noise"]["form"] == "relative"
    assert width_info(upscale(zoo.hf_gpt2(), 2, sigma=0.1, seed=0))["noise"]["form"] == "init"
    assert width_info(upscale(zoo.EncoderViT(), 2, sigma=0.1, example_inputs=_img(), seed=0))["noise"]["form"] == "init"


@pytest.mark.parametrize("bad", [dict(noise="gauss"), dict(sigma=-1.0), dict(sigma=float("nan")),
                                 dict(noise=0.1, sigma=0.2), dict(noise_dict=[1, 2])])
def test_noise_arguments_validated(bad) -> None:
    with pytest.raises(ValueError):
        upscale(zoo.NormMLP(), 2, **bad)


def test_noise_copies_diverge_under_training() -> None:
    torch.manual_seed(0)
    small = zoo.NormMLP(hidden=8)
    from dmscale.mup import mup_optimizer

    x, y = torch.randn(32, 10), torch.randint(0, 3, (32,))
    for sigma, should_diverge in [(0.0, False), (1e-2, True)]:
        big = upscale(small, 2, "mlp", sigma, seed=0)
        opt = mup_optimizer(big, "adam", lr=1e-2)
        for _ in range(10):
            opt.zero_grad()
            nn.functional.cross_entropy(big(x), y).backward()
            opt.step()
        w = big.net[3].weight.detach()
        gap = (w[0::2] - w[1::2]).abs().max().item()  # adjacent copies of the same hidden unit
        assert (gap > 1e-4) == should_diverge, (sigma, gap)


def test_seed_reproducible() -> None:
    small = zoo.NormMLP()
    for form in ("mlp", "relative", "init"):
        a, b = upscale(small, 2, form, 1e-2, seed=3), upscale(small, 2, form, 1e-2, seed=3)
        for p, q in zip(a.parameters(), b.parameters()):
            torch.testing.assert_close(p, q, rtol=0, atol=0)
        c = upscale(small, 2, form, 1e-2, seed=4)
        assert not torch.equal(a.net[3].weight, c.net[3].weight)


def test_upscale_twice_composes_factors() -> None:
    small = zoo.NormMLP()
    x = torch.randn(3, 10)
    big = upscale(upscale(small, 2), 3)
    torch.testing.assert_close(_out(big, x), _out(small, x))
    info = width_info(big)
    assert info["width"] == 6
    assert info["params"]["net.3.weight"]["k"] == [6, 6]
    assert info["params"]["net.5.weight"]["k"] == [6, 1]
    assert info["params"]["net.3.weight"]["base"] == [16, 16]


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


def test_cli_upscales_saved_module_and_hf_dir(tmp_path) -> None:
    import dmscale
    from dmscale.app.cli import main

    small = zoo.NormMLP()
    src, dst = tmp_path / "small", tmp_path / "big"
    dmscale.save(small, src)
    assert main(["upscale", str(src), "--width", "2", "--noise", "0", "--out", str(dst), "--trust", "zoo"]) == 0
    big = dmscale.load(dst, trust=["zoo"])
    x = torch.randn(4, 10)
    torch.testing.assert_close(_out(big, x), _out(small, x))
    assert big.net[0].out_features == 32
    assert width_info(big)["params"]["net.3.weight"]["k"] == [2, 2]  # the μP record is saved with the model
    # a Hugging Face model directory (what the removed upscale_cli did): save_pretrained in, save_pretrained out
    g = zoo.hf_llama()
    g.save_pretrained(tmp_path / "hf")
    out = tmp_path / "hf_big"
    assert main(["upscale", str(tmp_path / "hf"), "--width", "2", "--noise", "0", "--out", str(out)]) == 0
    import transformers

    again = transformers.LlamaForCausalLM.from_pretrained(out)
    ids = {"input_ids": _ids()}
    torch.testing.assert_close(_out(again, ids), _out(g, ids), rtol=1e-4, atol=1e-5)
    assert again.config.hidden_size == 64 and width_info(again)["params"]["lm_head.weight"]["k"] == [2, 1]
    assert main(["upscale", str(tmp_path / "hf"), "--width", "2", "--out", str(out)]) != 0  # never overwrites


def test_per_dimension_factors_transformers() -> None:
    ids = {"input_ids": _ids()}
    small = zoo.randomize_norms(zoo.hf_llama())
    big = upscale(small, {"hidden": 2, "ffn": 3, "heads": 2})
    torch.testing.assert_close(_out(big, ids), _out(small, ids), rtol=1e-4, atol=1e-5)
    assert (big.config.hidden_size, big.config.intermediate_size, big.config.num_attention_heads) == (64, 192, 8)
    assert big.config.num_key_value_heads == 4 and big.config.head_dim == 8
    p = width_info(big)["params"]
    assert p["model.layers.0.mlp.up_proj.weight"]["k"] == [2, 3] and p["model.layers.0.mlp.down_proj.weight"]["k"] == [3, 2]
    assert p["model.layers.0.self_attn.q_proj.weight"]["k"] == [2, 2]
    only_heads = upscale(small, {"heads": 3})  # widen only the attention: hidden and ffn stay
    torch.testing.assert_close(_out(only_heads, ids), _out(small, ids), rtol=1e-4, atol=1e-5)
    assert only_heads.config.hidden_size == 32 and only_heads.config.num_attention_heads == 12
    g = zoo.randomize_norms(zoo.hf_gpt2())
    gb = upscale(g, {"hidden": 2, "ffn": 4})
    torch.testing.assert_close(_out(gb, ids), _out(g, ids), rtol=1e-4, atol=1e-5)
    assert gb.config.n_embd == 64 and gb.config.n_inner == 4 * 32 * 4
    with pytest.raises(UpscaleError, match="heads"):
        upscale(g, {"hidden": 2, "heads": 3})  # GPT-2 ties attention width to n_embd
    vit = zoo.EncoderViT()
    x = _img()
    vb = upscale(vit, {"hidden": 2, "ffn": 3}, example_inputs=x)
    torch.testing.assert_close(_out(vb, x), _out(vit, x), rtol=1e-4, atol=1e-5)
    assert vb.encoder.layers[0].linear1.out_features == 32 * 3


def test_per_layer_factors_plain_models() -> None:
    x = torch.randn(4, 10)
    small = zoo.DeepMLP((6, 8, 10))
    big = upscale(small, {"net.0": 3, "net.3": 2, "net.5": 4}, example_inputs=x)
    torch.testing.assert_close(_out(big, x), _out(small, x))
    assert [m.out_features for m in big.net if isinstance(m, nn.Linear)] == [18, 16, 40, 3]
    assert big.net[2].normalized_shape == (18,)  # the norm follows the layer before it
    img = _img()
    cnn = zoo.randomize_norms(zoo.BasicResNet())
    cb = upscale(cnn, {"hidden": 2, "layer1.conv1": 3, "layer2.conv1": 4}, example_inputs=img)
    torch.testing.assert_close(_out(cb, img), _out(cnn, img), rtol=1e-4, atol=1e-5)
    assert cb.layer1.conv1.out_channels == 24 and cb.layer1.bn1.num_features == 24
    assert cb.layer1.conv2.in_channels == 24 and cb.layer1.conv2.out_channels == 16
    mb = zoo.GroupedMobileNet()
    mbb = upscale(mb, {"b1.block.0": 3}, example_inputs=img)  # expansion -> depthwise -> projection
    torch.testing.assert_close(_out(mbb, img), _out(mb, img), rtol=1e-4, atol=1e-5)
    assert mbb.b1.block[3].groups == 32 * 3


@pytest.mark.parametrize("width, err, match", [
    ({"net.9": 2}, ValueError, "neither a role"),
    ({"hiden": 2}, ValueError, "neither a role"),
    ({"net.5": 2}, ValueError, "hidden output"),
    ({"net.0": 2.5}, ValueError, "integer"),
    ({}, ValueError, "names no dimension"),
])
def test_width_dict_errors(width, err, match) -> None:
    with pytest.raises(err, match=match):
        upscale(zoo.NormMLP(), width, example_inputs=torch.randn(2, 10))


def test_per_layer_factor_on_a_residual_dim_is_refused() -> None:
    """conv2's output joins the residual stream: a factor of its own cannot be exact, and is caught."""
    cnn = zoo.BasicResNet()
    with pytest.raises(UpscaleError):
        upscale(cnn, {"hidden": 2, "layer1.conv2": 3}, example_inputs=_img())


def test_grow_head_dim_attention() -> None:
    ids = {"input_ids": _ids()}
    g = zoo.randomize_norms(zoo.hf_gpt2())
    big = upscale(g, 2, attention="grow_head_dim")
    torch.testing.assert_close(_out(big, ids), _out(g, ids), rtol=1e-4, atol=1e-5)
    a_s, a_b = g.transformer.h[0].attn, big.transformer.h[0].attn
    assert (a_b.num_heads, a_b.head_dim, a_b.split_size) == (a_s.num_heads, 2 * a_s.head_dim, 2 * a_s.split_size)
    assert a_b.scaling == pytest.approx(a_s.scaling / 2)  # q·k doubles with copied units: μP's 1/d keeps it
    assert big.config.n_head == g.config.n_head and big.config.n_embd == 2 * g.config.n_embd
    assert width_info(big)["attention"]["mode"] == "grow_head_dim"
    vit = zoo.hf_vit()  # HF ViT: q/k/v/o_proj and a `scaling` attribute, no RoPE
    vb = upscale(vit, 2, attention="grow_head_dim")
    x = {"pixel_values": _img()}
    torch.testing.assert_close(_out(vb, x), _out(vit, x), rtol=1e-4, atol=1e-5)
    assert vb.vit.layers[0].attention.head_dim == 2 * vit.vit.layers[0].attention.head_dim
    with pytest.raises(UpscaleError, match="RoPE"):
        upscale(zoo.hf_llama(), 2, attention="grow_head_dim")
    with pytest.raises(UpscaleError, match="duplicate_heads"):
        upscale(zoo.EncoderViT(), 2, attention="grow_head_dim", example_inputs=_img())
    with pytest.raises(UpscaleError, match="no supported attention"):
        upscale(zoo.NormMLP(), 2, attention="grow_head_dim")
    with pytest.raises(ValueError, match="attention must be"):
        upscale(zoo.NormMLP(), 2, attention="wide")
