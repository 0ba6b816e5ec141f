"""μpscaling: function-preserving widening of hidden dimensions by integer factors.

Copy-and-split (arXiv 2602.10545): each hidden unit is duplicated ``k`` times in adjacent
positions and fan-in weights are divided by ``k``, so at zero noise the wide model computes
exactly the same function.  Attention is widened by duplicating whole heads (head dim fixed) or,
as in the paper's GPT-2, by growing the head dim with μP's 1/d attention scale.  The μP base
recorded on the model (see :mod:`dmscale.mup.base`) is kept: the wide model's width multipliers
are the small model's times the upscaling factors.
"""

from __future__ import annotations

import copy
import math
import numbers
import warnings
import weakref
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from dmscale.mup.base import (RECORD_VERSION, _checked, _num, apply_output_multiplier, set_record,
                              width_info)
from dmscale.mup.plan import (ATTENTION_MODES, UpscaleError, expand, is_weight_layer, parse_width, plan,
                              run_model, tied_heads, unwrap, update_config)

__all__ = ["upscale", "upscale_optimizer_state", "upscale_maps", "NOISE_FORMS", "UpscaleError"]

NOISE_FORMS = ("mlp", "relative", "init")

# In-memory only (never saved): index maps and per-step factors of the last upscale that produced a model,
# for upscale_optimizer_state and for checking layer outputs.  Keyed weakly by the wide model.
_STEPS: "weakref.WeakKeyDictionary[nn.Module, dict[str, Any]]" = weakref.WeakKeyDictionary()


def _flatten_outputs(out: Any) -> list[Tensor]:
    """Tensors of a model output (logits preferred for HF ModelOutput)."""
    if isinstance(out, Tensor):
        return [out]
    logits = getattr(out, "logits", None)
    if isinstance(logits, Tensor):
        return [logits]
    if isinstance(out, Mapping):
        return [t for v in out.values() for t in _flatten_outputs(v)]
    if isinstance(out, (tuple, list)):
        return [t for v in out for t in _flatten_outputs(v)]
    return []


def _auto_inputs(model: nn.Module) -> list[Any]:
    """Candidate example inputs guessed from the model's first layer (for the equivalence check)."""
    cfg = getattr(model, "config", None)
    main = getattr(model, "main_input_name", None)
    if cfg is not None and main == "input_ids":
        v = int(getattr(cfg, "vocab_size", 16))
        return [{"input_ids": torch.randint(0, v, (2, 7)), "use_cache": False}]
    if cfg is not None and main == "pixel_values":
        c = int(getattr(cfg, "num_channels", 3))
        s = getattr(cfg, "image_size", 32)
        s = s if isinstance(s, int) else int(s[0])
        return [{"pixel_values": torch.randn(2, c, s, s)}]
    first = next((m for m in model.modules() if is_weight_layer(m)), None)
    dt = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    if isinstance(first, nn.Linear):
        return [torch.randn(3, first.in_features, dtype=dt)]
    if isinstance(first, nn.Embedding):
        return [torch.randint(0, first.num_embeddings, (2, 7))]
    if isinstance(first, nn.Conv1d):
        return [torch.randn(2, first.in_channels, s, dtype=dt) for s in (32, 64)]
    if isinstance(first, nn.Conv2d):
        return [torch.randn(2, first.in_channels, s, s, dtype=dt) for s in (32, 28, 64, 224)]
    return []


def _check_equal(small: nn.Module, big: nn.Module, example_inputs: Any) -> bool:
    """Raise unless big(x) == small(x); False if no input could be run through the small model."""
    candidates = [example_inputs] if example_inputs is not None else _auto_inputs(small)
    for x in candidates:
        try:
            ref = _flatten_outputs(run_model(small, x))
        except Exception:  # noqa: BLE001 - guessed inputs may not fit the model
            if example_inputs is not None:
                raise
            continue
        try:
            got = _flatten_outputs(run_model(big, x))
        except Exception as exc:  # noqa: BLE001 - a shape error in the wide model is an upscaling error
            raise UpscaleError(
                f"{type(small).__name__}: the widened model fails to run ({type(exc).__name__}: {exc}); per-layer "
                "width factors that the model's data flow couples (a residual connection, a reshape) must be equal"
            ) from exc
        if len(ref) != len(got) or any(a.shape != b.shape for a, b in zip(ref, got)):
            raise UpscaleError(
                f"{type(small).__name__}: widened model changed the output shape "
                f"({[tuple(a.shape) for a in ref]} -> {[tuple(b.shape) for b in got]}); "
                "an output layer was widened: pass keep_out=[...]")
        for a, b in zip(ref, got):
            if not a.is_floating_point():
                continue
            tol = 1e-3 if a.dtype in (torch.float16, torch.bfloat16) else 1e-4
            scale = max(1.0, float(a.abs().max()))
            err = float((a - b).abs().max())
            if not err <= tol * scale * 10:
                raise UpscaleError(
                    f"{type(small).__name__}: widened model is not function-preserving (max |diff| {err:.3g}). "
                    "Likely an unsupported reshape, e.g. flattening conv feature maps into a Linear, "
                    "a custom attention, an input/output layer that needs keep_in/keep_out, or per-layer "
                    "factors on dims the model couples.")
        return True
    return False


# --------------------------------------------------------------------------- noise


def _noise_args(noise: Any, sigma: Any, noise_dict: Any) -> tuple[str, float]:
    """Validate (noise form or legacy σ, sigma, noise_dict) -> (form or 'auto', sigma)."""
    if isinstance(noise, numbers.Real) and not isinstance(noise, bool):
        if sigma not in (0, 0.0, None):
            raise ValueError(f"upscale: noise={noise!r} is a σ (legacy spelling of noise='mlp', sigma=...); "
                             f"do not also pass sigma={sigma!r}")
        form, sigma = "mlp", float(noise)
    elif noise is None or noise == "auto":
        form = "auto"
    elif isinstance(noise, str) and noise in NOISE_FORMS:
        form = noise
    else:
        raise ValueError(f"upscale: noise must be one of {NOISE_FORMS}, 'auto' or a number (σ), got {noise!r}")
    sigma = 0.0 if sigma is None else sigma
    if isinstance(sigma, bool) or not isinstance(sigma, numbers.Real) or not math.isfinite(sigma) or sigma < 0:
        raise ValueError(f"upscale: sigma must be a finite number >= 0, got {sigma!r}")
    if noise_dict is not None and not isinstance(noise_dict, Mapping):
        raise ValueError(f"upscale: noise_dict must map parameter names to floats, got {type(noise_dict).__name__}")
    return form, float(sigma)


def _auto_form(model: nn.Module, ctx: Any) -> str:
    """Default noise form per model kind: 'init' for transformers, 'relative' for BatchNorm convnets, else 'mlp'."""
    if ctx.attention_modules or any(isinstance(m, nn.MultiheadAttention) for m in model.modules()):
        return "init"
    if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        return "relative"
    return "mlp"


def _fresh_init(big: nn.Module, names: list[str], seed: int) -> dict[str, Tensor]:
    """A fresh initialisation of the wide model by its own init (HF: a new model from its config)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if hasattr(big, "config") and hasattr(type(big), "from_pretrained") and hasattr(big, "post_init"):
            fresh = type(big)(copy.deepcopy(big.config))
        else:
            fresh = copy.deepcopy(big)
            covered: set[int] = set()
            for mod in fresh.modules():
                reset = getattr(mod, "reset_parameters", None) or getattr(mod, "_reset_parameters", None)
                if callable(reset) and any(True for _ in mod.parameters(recurse=False)):
                    reset()
                    covered.update(id(p) for p in mod.parameters(recurse=False))
            fp = dict(fresh.named_parameters())
            missing = [n for n in names if id(fp[n]) not in covered]
            if missing:
                raise UpscaleError(f"noise='init': {missing[:3]} belong to modules without reset_parameters(); "
                                   "use noise='mlp'")
    fp = dict(fresh.named_parameters())
    return {n: fp[n].detach() for n in names}


def _spectral(t: Tensor) -> float:
    """Spectral norm of a weight viewed as a matrix (out, rest): convs flattened, vectors by 2-norm."""
    t = t.detach().double()
    if t.dim() < 2:
        return float(t.norm())
    return float(torch.linalg.matrix_norm(t.reshape(t.shape[0], -1), ord=2))


def _add_noise(big: nn.Module, targets: list[tuple[str, Tensor, Any]], form: str, sigma: float,
               noise_dict: Mapping[str, Any] | None, seed: int) -> dict[str, float]:
    """Add the chosen noise to the hidden and input weight matrices; return the per-tensor noise scale."""
    names = [n for n, _, _ in targets]
    if noise_dict is not None:
        missing = [n for n in names if n not in noise_dict]
        extra = [n for n in noise_dict if n not in names]
        if missing or extra:
            raise ValueError(f"upscale: noise_dict does not match the tensors that get noise: missing {missing[:5]}, "
                             f"unknown {extra[:5]} (expected keys like {names[:3]})")
        for n in names:
            v = noise_dict[n]
            if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v) or v < 0:
                raise ValueError(f"upscale: noise_dict[{n!r}] must be a finite number >= 0, got {v!r}")
    gen = torch.Generator(device="cpu").manual_seed(seed)
    fresh = _fresh_init(big, names, seed) if form == "init" else {}
    per_tensor: dict[str, float] = {}
    with torch.no_grad():
        for n, t, pl in targets:
            if form == "init":
                z = fresh[n].to(torch.float64)
            else:
                z = torch.randn(t.shape, generator=gen, dtype=torch.float64) / math.sqrt(pl.noise_fan_in)
            if noise_dict is not None:
                std = float(noise_dict[n])
            elif form == "relative":
                zn = _spectral(z)
                std = sigma * _spectral(t) / zn if zn > 0 else 0.0
            else:
                std = sigma
            per_tensor[n] = std
            scale = 1.0 if form == "relative" else pl.scale  # mlp / init: noise before the 1/k_in rescale
            if std:
                t.add_((z * (std * scale)).to(device=t.device, dtype=t.dtype))
    return per_tensor


# --------------------------------------------------------------------------- upscale


def upscale(
    model: nn.Module,
    width: int | Mapping[str, int] = 2,
    noise: str | float = "auto",
    sigma: float = 0.0,
    *,
    noise_dict: Mapping[str, float] | None = None,
    attention: str = "duplicate_heads",
    example_inputs: Any = None,
    check: bool = True,
    keep_in: Sequence[str] = (),
    keep_out: Sequence[str] = (),
    seed: int | None = None,
) -> nn.Module:
    """Return a new model with hidden dims widened that computes the same function at sigma=0.

    ``width``: an integer factor for every hidden dim, or per dimension ``{'hidden': 2, 'ffn': 4,
    'heads': 2, '<module name>': 3}`` (``ffn``: transformer MLP inner dim; ``heads``: attention width;
    a module name: that layer's output dim and its consumer's input; roles not given follow
    ``hidden``).  ``noise``: the perturbation form, ``'mlp'`` (σ · fresh μP init N(0, 1/fan_in)),
    ``'relative'`` (σ · ‖W‖₂/‖Z‖₂ · Z per tensor), ``'init'`` (σ · the model's own fresh init of the
    wide model) or ``'auto'`` (init for transformers, relative for BatchNorm convnets, else mlp); a
    number is the legacy spelling of ``noise='mlp', sigma=number``.  ``sigma``: its scale (0: exact).
    ``noise_dict``: {parameter name: noise scale} reused from an earlier upscale's
    ``width_info(big)['noise']['per_tensor']`` (a tuned per-tensor noise, as the paper's ResNet).
    ``attention``: ``'duplicate_heads'`` (head dim fixed; exact with any attention scale) or
    ``'grow_head_dim'`` (head count fixed, the attention ``scaling`` ÷ k: the paper's μP GPT-2).
    ``example_inputs`` (tensor, tuple of args or dict of kwargs) sets the input/output layers by
    execution order and verifies function preservation; keep_in/keep_out name extra data layers.
    """
    factors = parse_width(width)
    if attention not in ATTENTION_MODES:
        raise ValueError(f"upscale: attention must be one of {ATTENTION_MODES}, got {attention!r}")
    form, sigma = _noise_args(noise, sigma, noise_dict)
    small = unwrap(model)
    prev = width_info(small)
    if prev is not None:
        _checked(small, prev)
    big = copy.deepcopy(small)
    ctx = plan(big, factors, keep_in, keep_out, example_inputs, attention)
    if form == "auto":
        form = _auto_form(big, ctx)
    names = {id(p): n for n, p in big.named_parameters()}
    bnames = {id(b): n for n, b in big.named_buffers()}
    step: dict[str, list[float]] = {}
    dims: dict[str, list[int | None]] = {}
    maps: dict[str, list[tuple[int, Tensor]]] = {}
    targets: list[tuple[str, Tensor, Any]] = []
    with torch.no_grad():
        for t, pl in ctx.plans.values():
            new = expand(t.data, pl.maps)
            if pl.scale != 1.0:
                new = new * pl.scale
            t.data = new.contiguous()
            n = names.get(id(t)) or bnames[id(t)]
            maps[n] = pl.maps
            if isinstance(t, nn.Parameter):
                step[n] = [pl.k_in, pl.k_out]
                dims[n] = [pl.in_dim, pl.out_dim]
                if pl.noise_fan_in is not None:
                    targets.append((n, t, pl))
    for mod, attr, val in ctx.attr_updates:
        setattr(mod, attr, val)
    update_config(big, ctx)
    rec = _compose(prev, big, step, dims, small)
    rec["width"] = _num(float((prev or {}).get("width", 1)) * factors["hidden"])
    att = dict((prev or {}).get("attention") or {"mode": "duplicate_heads", "mup_scale": False})
    if attention == "grow_head_dim":
        att["mode"] = "grow_head_dim"
    rec["attention"] = att
    heads = tied_heads(big)
    if heads:  # keep a tied readout tied; its logits take the 1/k multiplier
        k_tied = step[names[id(heads[0][1].weight)]][1]
        if k_tied != 1:
            before = {n: list(e["k"]) for n, e in rec["params"].items()}
            apply_output_multiplier(big, rec, 1.0 / k_tied, names)
            for n, e in rec["params"].items():
                if e["k"] != before[n]:  # the folded norm: its per-step factors move the same way
                    step[n] = [step[n][0] * k_tied, step[n][1] / k_tied]
    if check and not _check_equal(small, big, example_inputs):
        warnings.warn(f"upscale: could not run {type(small).__name__} on guessed inputs; function preservation "
                      "was not verified (pass example_inputs=...)", stacklevel=2)
    s = int(torch.randint(0, 2**62, (1,)).item()) if seed is None else int(seed)
    per_tensor: dict[str, float] = {}
    if sigma > 0 or noise_dict is not None:
        per_tensor = _add_noise(big, targets, form, sigma, noise_dict, s)
    rec["noise"] = {"form": form, "sigma": sigma, "seed": s if per_tensor else None, "per_tensor": per_tensor}
    set_record(big, rec)
    _STEPS[big] = {"maps": maps, "step": step}
    return big


def _compose(prev: dict[str, Any] | None, big: nn.Module, step: dict[str, list[float]],
             dims: dict[str, list[int | None]], small: nn.Module) -> dict[str, Any]:
    """The wide model's record: the small model's (or the identity) times this step's factors."""
    sp = dict(small.named_parameters())
    out: dict[str, Any] = {}
    for n, p in big.named_parameters():
        e = (prev or {}).get("params", {}).get(n) if prev else None
        if e is None:
            e = {"k": [1, 1], "dims": [None, None], "base": [int(s) for s in sp[n].shape]}
        d = [dims[n][i] if dims[n][i] is not None else e["dims"][i] for i in (0, 1)]
        out[n] = {"k": [_num(float(e["k"][i]) * step[n][i]) for i in (0, 1)], "dims": d, "base": list(e["base"]),
                  "shape": [int(s) for s in p.shape]}
    rec = {k: copy.deepcopy(v) for k, v in (prev or {}).items() if k != "params"}
    rec.update({"version": RECORD_VERSION, "params": out})
    rec.setdefault("output_mult", 1.0)
    rec.setdefault("fold", None)
    return rec


def upscale_maps(big: nn.Module) -> dict[str, Any]:
    """Index maps {name: [(dim, index)]} and per-step factors of the upscale that made ``big`` (this process)."""
    st = _STEPS.get(unwrap(big))
    if st is None:
        raise UpscaleError(f"{type(unwrap(big)).__name__}: not produced by dmscale.upscale in this process "
                           "(deepcopy, save/load and from_pretrained do not keep the index maps)")
    return st


# --------------------------------------------------------------------------- optimizer state


def upscale_optimizer_state(small_opt: torch.optim.Optimizer, big_opt: torch.optim.Optimizer,
                            small: nn.Module, big: nn.Module) -> None:
    """Carry optimizer state from the small model's run into the wide model's optimizer (SGD/Adam/AdamW).

    Step counts are copied, first moments (``momentum_buffer``, ``exp_avg``) ÷ k_out and second moments
    (``exp_avg_sq``, ``max_exp_avg_sq``) ÷ k_out², so training continues exactly as the small model's
    would at zero noise.  ``big`` must be the model :func:`upscale` returned in this process (it may
    since have been wrapped by DDP / ``torch.compile`` / ``fully_shard``: sharded parameters get
    sharded state).
    """
    st = upscale_maps(big)
    small_u, big_u = unwrap(small), unwrap(big)
    big_params = dict(big_u.named_parameters())
    in_opt = {id(p) for g in big_opt.param_groups for p in g["params"]}
    for n, p in small_u.named_parameters():
        state = small_opt.state.get(p)
        if not state:
            continue
        if n not in big_params:
            raise UpscaleError(f"upscale_optimizer_state: {n} is not a parameter of the wide model")
        q = big_params[n]
        if id(q) not in in_opt:
            raise UpscaleError(f"upscale_optimizer_state: the wide model's optimizer does not hold {n} "
                               "(create it after sharding / compiling, from the wide model)")
        k_out = st["step"][n][1]
        new: dict[str, Any] = {}
        for key, v in state.items():
            if isinstance(v, Tensor) and v.shape == p.shape and p.dim() > 0:
                local = v.full_tensor() if hasattr(v, "full_tensor") else v
                e = expand(local, st["maps"][n])
                e = e / (k_out ** 2) if key in ("exp_avg_sq", "max_exp_avg_sq") else e / k_out
                new[key] = _like(e, q)
            elif isinstance(v, Tensor):
                new[key] = v.detach().clone()
            else:
                new[key] = copy.deepcopy(v)
        big_opt.state[q] = new


def _like(t: Tensor, q: Tensor) -> Tensor:
    """t placed like parameter q: same dtype/device, sharded the same way if q is a DTensor."""
    mesh = getattr(q, "device_mesh", None)
    if mesh is not None:
        from torch.distributed.tensor import distribute_tensor

        return distribute_tensor(t.to(dtype=q.dtype, device=q.to_local().device), mesh, q.placements)
    return t.to(dtype=q.dtype, device=q.device).clone()
