"""Dynamic equivalence as strict as the reference's: float64, 200 steps, every layer's output to 1e-5.

The small model is pre-trained (in μP relative to a proxy where stated), upscaled at zero noise with
its optimizer state carried over, and both models then train side by side on the same batches; every
layer's output of the wide model must equal the small model's, copied by the index maps, every 50
steps and at the end.  The long matrix (every family x every optimizer) is marked slow.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import zoo
from dmscale.mup import mup_optimizer, set_base, upscale, upscale_optimizer_state, upscale_maps, width_info

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

STEPS = 200
PRE = 10
TOL = 1e-5

# (kind for mup_optimizer, extra kwargs); "momentum" and "amsgrad" are SGD / Adam variants
OPTS = {
    "sgd": ("sgd", dict(lr=0.05)),
    "momentum": ("sgd", dict(lr=0.02, momentum=0.9, nesterov=True, weight_decay=1e-3)),
    "adam": ("adam", dict(lr=2e-3, weight_decay=1e-3, eps=1e-6)),
    "amsgrad": ("adam", dict(lr=2e-3, eps=1e-6, amsgrad=True)),
    "adamw": ("adamw", dict(lr=2e-3, weight_decay=0.1, eps=1e-6)),
}


def layer_outputs(model: nn.Module, x) -> dict[str, torch.Tensor]:
    """Output of every module that owns parameters, plus the model output ('<output>'), in eval mode."""
    outs: dict[str, torch.Tensor] = {}
    handles = []
    for name, mod in model.named_modules():
        if name and any(True for _ in mod.parameters(recurse=False)):
            def hook(_m, _a, out, name=name):
                if isinstance(out, torch.Tensor):
                    outs[name] = out.detach().clone()
            handles.append(mod.register_forward_hook(hook))
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            y = model(**x) if isinstance(x, dict) else model(x)
    finally:
        model.train(was)
        for h in handles:
            h.remove()
    outs["<output>"] = getattr(y, "logits", y).detach().clone()
    return outs


def layer_diffs(small: nn.Module, big: nn.Module, x) -> dict[str, float]:
    """Max |difference| per layer between the wide model and the small one's outputs copied by the index maps.

    A folded tied-head multiplier (final norm ÷ k) is divided out of that norm's output.
    """
    st, rec, srec = upscale_maps(big), width_info(big), width_info(small)
    ratio = rec["output_mult"] / (srec["output_mult"] if srec else 1.0)
    fold = rec["fold"] or ""
    fold_norm = fold[5:] if fold.startswith("norm:") else None
    so, bo = layer_outputs(small, x), layer_outputs(big, x)
    assert set(so) == set(bo)
    diffs = {}
    for name, a in so.items():
        b = bo[name] / ratio if name == fold_norm else bo[name]
        if a.shape != b.shape:
            axes = [i for i, (p, q) in enumerate(zip(a.shape, b.shape)) if p != q]
            assert len(axes) == 1, (name, a.shape, b.shape)
            pname = next(f"{name}.{pn}" for pn, _ in big.get_submodule(name).named_parameters(recurse=False)
                         if rec["params"][f"{name}.{pn}"]["dims"][1] is not None)
            idx = dict(st["maps"][pname])[rec["params"][pname]["dims"][1]]
            a = a.index_select(axes[0], idx)
        diffs[name] = float((a - b).abs().max())
    return diffs


@pytest.fixture
def float64(monkeypatch):
    old, threads = torch.get_default_dtype(), torch.get_num_threads()
    torch.set_default_dtype(torch.float64)
    torch.set_num_threads(1)  # tiny float64 ops: thread hand-offs cost more than the math on a busy machine
    try:  # HF's RMSNorm computes in float32 even in a float64 model: keep the test in float64 throughout
        from transformers.models.llama import modeling_llama

        def rms_forward(self, h):
            var = h.pow(2).mean(-1, keepdim=True)
            return self.weight * (h * torch.rsqrt(var + self.variance_epsilon))

        monkeypatch.setattr(modeling_llama.LlamaRMSNorm, "forward", rms_forward)
    except ImportError:
        pass
    yield
    torch.set_default_dtype(old)
    torch.set_num_threads(threads)


def _batches(name: str, n: int = 5):
    g = torch.Generator().manual_seed(1)
    if name in ("mlp", "deep_mlp"):
        return [(torch.randn(16, 10, generator=g), torch.randint(0, 3, (16,), generator=g)) for _ in range(n)]
    if name == "cnn":
        return [(torch.randn(4, 3, 8, 8, generator=g), torch.randint(0, 5, (4,), generator=g)) for _ in range(n)]
    ids = [torch.randint(0, 61, (2, 8), generator=g) for _ in range(n)]
    return [({"input_ids": t}, t) for t in ids]


def _loss(model: nn.Module, x, y) -> torch.Tensor:
    out = model(**x) if isinstance(x, dict) else model(x)
    out = getattr(out, "logits", out)
    return nn.functional.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))


def _step(model, opt, batch) -> None:
    model.train()
    opt.zero_grad()
    _loss(model, *batch).backward()
    opt.step()


def _run(make, name: str, opt: str, width, attention: str = "duplicate_heads", proxy=None, steps: int = STEPS,
         legacy_base: bool = False) -> float:
    """Pre-train small, upscale at zero noise, carry optimizer state, train both; return the worst layer diff."""
    torch.manual_seed(0)
    small = zoo.randomize_norms(make())
    kind, kw = OPTS[opt]
    if proxy is not None and not legacy_base:
        set_base(small, proxy, mup_attention=attention == "grow_head_dim")
    if legacy_base:  # the old usage: no record, μP relative to the proxy given at each call
        opt_s = mup_optimizer(small, kind, base=proxy, **kw)
    else:
        opt_s = mup_optimizer(small, kind, **kw) if proxy is not None else mup_optimizer(small, kind, base=small, **kw)
    batches = _batches(name)
    for t in range(PRE):
        _step(small, opt_s, batches[t % len(batches)])
    x0 = batches[0][0]
    big = upscale(small, width, attention=attention, example_inputs=x0)
    opt_b = mup_optimizer(big, kind, base=proxy, **kw) if legacy_base else mup_optimizer(big, kind, **kw)
    upscale_optimizer_state(opt_s, opt_b, small, big)
    worst = max(layer_diffs(small, big, x0).values())
    assert worst < 1e-9, f"not function-preserving at upscaling: {worst}"
    start = layer_outputs(small, x0)["<output>"]
    for t in range(steps):
        b = batches[t % len(batches)]
        _step(small, opt_s, b)
        _step(big, opt_b, b)
        if (t + 1) % 50 == 0 or t + 1 == steps:
            diffs = layer_diffs(small, big, x0)
            bad = {k: v for k, v in diffs.items() if not v < TOL}
            assert not bad, f"step {t + 1}: layers differ {bad}"
            worst = max(worst, max(diffs.values()))
    moved = float((layer_outputs(small, x0)["<output>"] - start).abs().max())
    assert moved > 1e-2, f"the models barely trained ({moved}): the comparison is vacuous"
    return worst


FAST = [
    # (id, maker, data, optimizer, width, attention, proxy maker)
    ("mlp-uneven-sgd", lambda: zoo.DeepMLP((6, 8, 10)), "deep_mlp", "sgd", {"net.0": 3, "net.3": 2, "net.5": 4},
     "duplicate_heads", lambda: zoo.DeepMLP((4, 4, 4))),
    ("mlp-uneven-momentum", lambda: zoo.DeepMLP((6, 8, 10)), "deep_mlp", "momentum",
     {"net.0": 3, "net.3": 2, "net.5": 4}, "duplicate_heads", lambda: zoo.DeepMLP((4, 4, 4))),
    ("mlp-uneven-adam", lambda: zoo.DeepMLP((6, 8, 10)), "deep_mlp", "adam", {"net.0": 3, "net.3": 2, "net.5": 4},
     "duplicate_heads", lambda: zoo.DeepMLP((4, 4, 4))),
    ("mlp-uneven-amsgrad", lambda: zoo.DeepMLP((6, 8, 10)), "deep_mlp", "amsgrad",
     {"net.0": 3, "net.3": 2, "net.5": 4}, "duplicate_heads", lambda: zoo.DeepMLP((4, 4, 4))),
    ("mlp-uneven-adamw", lambda: zoo.DeepMLP((6, 8, 10)), "deep_mlp", "adamw", {"net.0": 3, "net.3": 2, "net.5": 4},
     "duplicate_heads", lambda: zoo.DeepMLP((4, 4, 4))),
    ("resnet-bn-momentum", lambda: zoo.BasicResNet(c=4), "cnn", "momentum", {"hidden": 2, "layer1.conv1": 3},
     "duplicate_heads", lambda: zoo.BasicResNet(c=2)),
    ("resnet-bn-adamw", lambda: zoo.BasicResNet(c=4), "cnn", "adamw", 2, "duplicate_heads", lambda: zoo.BasicResNet(c=2)),
    ("gpt2-tied-dup-adamw", lambda: zoo.hf_gpt2(16, 2), "gpt2", "adamw", 2, "duplicate_heads",
     lambda: zoo.hf_gpt2(8, 2)),
    ("gpt2-tied-grow-adam", lambda: zoo.hf_gpt2(16, 2), "gpt2", "adam", 2, "grow_head_dim", lambda: zoo.hf_gpt2(8, 2)),
    ("gpt2-untied-dup-momentum", lambda: zoo.hf_gpt2(16, 2, tied=False), "gpt2", "momentum", 2, "duplicate_heads",
     lambda: zoo.hf_gpt2(8, 2, tied=False)),
    ("gpt2-untied-grow-amsgrad", lambda: zoo.hf_gpt2(16, 2, tied=False), "gpt2", "amsgrad", 2, "grow_head_dim",
     lambda: zoo.hf_gpt2(8, 2, tied=False)),
    ("llama-gqa-adamw", lambda: zoo.hf_llama(16, 4, 2, layers=1), "llama", "adamw", {"hidden": 2, "ffn": 3},
     "duplicate_heads", lambda: zoo.hf_llama(8, 2, 1, layers=1)),
    ("llama-gqa-sgd", lambda: zoo.hf_llama(16, 4, 2, layers=1), "llama", "sgd", {"hidden": 2, "heads": 3, "ffn": 2},
     "duplicate_heads", None),
]


@pytest.mark.parametrize("case", FAST, ids=[c[0] for c in FAST])
def test_dynamic_equivalence_200_steps(case, float64) -> None:
    _id, make, data, opt, width, attention, proxy = case
    _run(make, data, opt, width, attention, proxy() if proxy else None)


def test_tied_head_fixed_proxy_base_legacy_call(float64) -> None:
    """The reported bug: μP relative to a proxy given as base=... and a tied GPT-2 head (no record on small)."""
    proxy = zoo.hf_gpt2(8, 2)
    for opt in ("adamw", "sgd"):
        _run(lambda: zoo.hf_gpt2(16, 2), "gpt2", opt, 2, "duplicate_heads", proxy, steps=100, legacy_base=True)


def test_state_transfer_matters(float64) -> None:
    """Control: a fresh optimizer on the wide model (no state carried) does not track the small model."""
    torch.manual_seed(0)
    small = zoo.DeepMLP()
    set_base(small, zoo.DeepMLP((4, 4, 4)))
    opt_s = mup_optimizer(small, "adam", lr=1e-2)
    batches = _batches("mlp")
    for t in range(5):
        _step(small, opt_s, batches[t])
    big = upscale(small, 2)
    opt_b = mup_optimizer(big, "adam", lr=1e-2)
    for t in range(5):
        _step(small, opt_s, batches[t])
        _step(big, opt_b, batches[t])
    assert max(layer_diffs(small, big, batches[0][0]).values()) > 1e-4


@pytest.mark.parametrize("opt", list(OPTS))
def test_standard_parametrization_drifts(opt, float64) -> None:
    """Control: the wide model with the plain optimizer (no μP scaling) drifts away from the small one."""
    torch.manual_seed(0)
    small = zoo.DeepMLP()
    kind, kw = OPTS[opt]
    cls = torch.optim.SGD if kind == "sgd" else (torch.optim.AdamW if kind == "adamw" else torch.optim.Adam)
    opt_s = cls(small.parameters(), **kw)
    big = upscale(small, 4)
    opt_b = cls(big.parameters(), **kw)
    batches = _batches("mlp")
    for t in range(30):
        _step(small, opt_s, batches[t % 5])
        _step(big, opt_b, batches[t % 5])
    assert max(layer_diffs(small, big, batches[0][0]).values()) > 1e-4


SLOW_FAMILIES = {
    "mlp": (lambda: zoo.NormMLP(), "mlp", lambda: zoo.NormMLP(hidden=8), 3, "duplicate_heads"),
    "resnet": (lambda: zoo.BasicResNet(c=4), "cnn", lambda: zoo.BasicResNet(c=2), 2, "duplicate_heads"),
    "gpt2-tied-dup": (lambda: zoo.hf_gpt2(16, 2), "gpt2", lambda: zoo.hf_gpt2(8, 2), 2, "duplicate_heads"),
    "gpt2-tied-grow": (lambda: zoo.hf_gpt2(16, 2), "gpt2", lambda: zoo.hf_gpt2(8, 2), 2, "grow_head_dim"),
    "gpt2-untied-dup": (lambda: zoo.hf_gpt2(16, 2, tied=False), "gpt2", lambda: zoo.hf_gpt2(8, 2, tied=False), 2,
                        "duplicate_heads"),
    "gpt2-untied-grow": (lambda: zoo.hf_gpt2(16, 2, tied=False), "gpt2", lambda: zoo.hf_gpt2(8, 2, tied=False), 2,
                         "grow_head_dim"),
    "llama": (lambda: zoo.hf_llama(16, 4, 2, layers=1), "llama", lambda: zoo.hf_llama(8, 2, 1, layers=1),
              {"hidden": 2, "ffn": 3}, "duplicate_heads"),
}


@pytest.mark.slow
@pytest.mark.parametrize("opt", list(OPTS))
@pytest.mark.parametrize("family", list(SLOW_FAMILIES))
def test_dynamic_equivalence_full_matrix(family, opt, float64) -> None:
    make, data, proxy, width, attention = SLOW_FAMILIES[family]
    _run(make, data, opt, width, attention, proxy())


def test_record_moves_with_upscale(float64) -> None:
    """The wide model's multipliers are the small model's times the upscaling factors (one shared base)."""
    small = zoo.DeepMLP((6, 8, 10))
    set_base(small, zoo.DeepMLP((4, 4, 4)))
    big = upscale(small, {"net.0": 3, "net.3": 2, "net.5": 4})
    rs, rb = width_info(small)["params"], width_info(big)["params"]
    assert rs["net.3.weight"]["k"] == [1.5, 2] and rb["net.3.weight"]["k"] == [4.5, 4]
    assert rb["net.3.weight"]["base"] == rs["net.3.weight"]["base"] == [4, 4]
    assert rb["net.7.weight"]["k"] == [10, 1] and rb["net.0.weight"]["k"] == [1, 4.5]
