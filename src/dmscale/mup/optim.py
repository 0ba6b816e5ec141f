"""μP optimizer scaling for upscaled models, and the coordinate check.

Per-parameter width factors (k_in, k_out) come from the side table written by
:func:`dmscale.mup.upscale.upscale` (or are inferred from shapes against a base model), and set
lr / eps / weight decay so that, at zero noise, the wide model trains exactly like the base.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from dmscale.mup.upscale import UpscaleError, _is_hf_conv1d, _unwrap, width_info

__all__ = ["mup_param_groups", "mup_optimizer", "infer_width_info", "coord_check", "mup_factors"]

_KINDS = ("sgd", "adam", "adamw")


def infer_width_info(model: nn.Module, base: nn.Module) -> dict[str, Any]:
    """Infer per-parameter (k_in, k_out) by comparing shapes with a base model of the same architecture."""
    model, base = _unwrap(model), _unwrap(base)
    bparams = dict(base.named_parameters())
    owner: dict[str, nn.Module] = {}
    for mn, mod in model.named_modules():
        for pn, _ in mod.named_parameters(recurse=False):
            owner.setdefault(f"{mn}.{pn}" if mn else pn, mod)
    params: dict[str, tuple[int, int]] = {}
    for n, p in model.named_parameters():
        if n not in bparams:
            raise UpscaleError(f"{n}: parameter missing from the base model")
        q = bparams[n]
        if p.dim() != q.dim() or any(a % b for a, b in zip(p.shape, q.shape)):
            raise UpscaleError(f"{n}: shape {tuple(p.shape)} is not an integer multiple of base {tuple(q.shape)}")
        r = [a // b for a, b in zip(p.shape, q.shape)]
        mod = owner[n]
        if p.dim() == 0:
            params[n] = (1, 1)
        elif p.dim() == 1:
            params[n] = (1, r[0])
        elif isinstance(mod, nn.Embedding) or n.rsplit(".", 1)[-1] in (
                "cls_token", "class_token", "position_embeddings", "pos_embed", "pos_embedding", "mask_token"):
            params[n] = (1, r[-1])
        elif _is_hf_conv1d(mod):
            params[n] = (r[0], r[1])
        else:  # (out, in, ...) convention: Linear, Conv (per-group in), MHA in_proj
            params[n] = (r[1], r[0])
    width = max((max(v) for v in params.values()), default=1)
    return {"width": width, "params": params, "fold": None}


def _factors(model: nn.Module, base: nn.Module | None) -> dict[str, tuple[int, int]]:
    """Per-parameter (k_in, k_out) for the optimizer: side table if present, else shape inference."""
    info = width_info(model)
    if base is not None:
        inferred = infer_width_info(model, base)["params"]
        if info is None:
            return inferred
        table = info["params"]
        # the table wins when it describes the same base (a folded logit multiplier, final norm ÷ k,
        # is invisible in shapes); a different base (e.g. a μP proxy width) falls back to shapes.
        same = set(table) == set(inferred) and all(
            table[n][0] * table[n][1] == v[0] * v[1] for n, v in inferred.items())
        return dict(table) if same else inferred
    if info is None:
        raise UpscaleError(
            f"{type(_unwrap(model)).__name__}: no width info; pass base=<small model> or upscale it with dmscale.mup.upscale")
    return dict(info["params"])


def mup_factors(kind: str, k_in: int, k_out: int) -> dict[str, float]:
    """Multipliers for lr / eps / weight_decay of one parameter (method table, dynamic equivalence)."""
    kind = kind.lower()
    if kind == "sgd":
        return {"lr": k_out / k_in, "weight_decay": k_in / k_out, "eps": 1.0}
    if kind == "adam":  # coupled (L2) weight decay
        return {"lr": 1.0 / k_in, "eps": 1.0 / k_out, "weight_decay": k_in / k_out}
    if kind == "adamw":  # decoupled: lr*wd must stay fixed
        return {"lr": 1.0 / k_in, "eps": 1.0 / k_out, "weight_decay": float(k_in)}
    raise ValueError(f"mup optimizer kind must be one of {_KINDS}, got {kind!r}")


def mup_param_groups(model: nn.Module, base: nn.Module | None = None, kind: str = "adamw", lr: float = 1e-3,
                     weight_decay: float = 0.0, eps: float = 1e-8, **extra: Any) -> list[dict[str, Any]]:
    """Param-group dicts with μP-scaled lr / eps / weight_decay per parameter, for any optimizer."""
    kind = kind.lower()
    mup_factors(kind, 1, 1)  # validates kind
    factors = _factors(model, base)
    groups: dict[tuple[int, int], dict[str, Any]] = {}
    for n, p in _unwrap(model).named_parameters():
        if not p.requires_grad:
            continue
        kin, kout = factors.get(n, (1, 1))
        g = groups.get((kin, kout))
        if g is None:
            f = mup_factors(kind, kin, kout)
            g = {"params": [], "param_names": [], "lr": lr * f["lr"], "weight_decay": weight_decay * f["weight_decay"],
                 "dmscale_k": (kin, kout), **extra}
            if kind != "sgd":
                g["eps"] = eps * f["eps"]
            groups[(kin, kout)] = g
        g["params"].append(p)
        g["param_names"].append(n)
    return list(groups.values())


def mup_optimizer(model: nn.Module, base: nn.Module | None = None, kind: str = "adamw", lr: float = 1e-3,
                  **kwargs: Any) -> torch.optim.Optimizer:
    """torch SGD / Adam / AdamW whose per-parameter settings make the upscaled model train like the base."""
    kind = kind.lower()
    wd = kwargs.pop("weight_decay", 0.0 if kind != "adamw" else 1e-2)
    eps = kwargs.pop("eps", 1e-8)
    groups = mup_param_groups(model, base=base, kind=kind, lr=lr, weight_decay=wd, eps=eps)
    for g in groups:
        g.pop("param_names", None)  # torch >= 2.6 validates names against all groups; keep it simple
        g.pop("dmscale_k", None)
    if kind == "sgd":
        return torch.optim.SGD(groups, lr=lr, **kwargs)
    if kind == "adam":
        return torch.optim.Adam(groups, lr=lr, **kwargs)
    return torch.optim.AdamW(groups, lr=lr, **kwargs)


# --------------------------------------------------------------------------- coordinate check


def _default_loss(out: Any, y: Tensor | None) -> Tensor:
    """Cross-entropy for integer targets, MSE for float targets, HF .loss if present."""
    loss = getattr(out, "loss", None)
    if isinstance(loss, Tensor):
        return loss
    logits = getattr(out, "logits", out)
    if y is None:
        return logits.float().pow(2).mean()
    if not y.is_floating_point():
        return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), y.reshape(-1))
    return nn.functional.mse_loss(logits.float(), y.float())


def coord_check(make_model: Callable[[int], nn.Module], widths: Sequence[int], data: Any, steps: int = 3,
                out_png: str | None = None, kind: str = "adamw", lr: float = 1e-3,
                loss_fn: Callable[[Any, Any], Tensor] | None = None, upscale_from: int | None = None,
                noise: float = 1e-3, seed: int = 0) -> dict[int, dict[str, list[float]]]:
    """Mean |activation| per layer vs width over a few μP training steps; O(1) across widths is healthy.

    make_model(width) builds a model; with upscale_from=w0 the wide models are instead μpscaled
    from make_model(w0) (what μpscaling trains).  data is (x, y), a list of such batches, or x.
    Returns {width: {module: [scale at step 0..steps-1]}} and writes a PNG plot if out_png is set.
    """
    from dmscale.mup.upscale import upscale

    batches = list(data) if isinstance(data, list) else [data]
    widths = list(widths)
    base_w = upscale_from if upscale_from is not None else widths[0]
    torch.manual_seed(seed)
    base = make_model(base_w)
    results: dict[int, dict[str, list[float]]] = {}
    for w in widths:
        torch.manual_seed(seed)
        if upscale_from is not None:
            if w % base_w:
                raise ValueError(f"coord_check: width {w} is not a multiple of upscale_from={base_w}")
            model = upscale(base, w // base_w, noise, seed=seed) if w != base_w else _clone(base)
            opt = mup_optimizer(model, base=base, kind=kind, lr=lr)
        else:
            model = make_model(w)
            opt = mup_optimizer(model, base=base, kind=kind, lr=lr)
        model.train()
        stats: dict[str, list[float]] = {}
        names = {m: n for n, m in model.named_modules() if n and len(list(m.children())) == 0}

        def hook(mod: nn.Module, _a: Any, out: Any) -> None:
            if isinstance(out, Tensor) and out.is_floating_point():
                stats.setdefault(names[mod], []).append(float(out.detach().abs().mean()))

        handles = [m.register_forward_hook(hook) for m in names]
        for step in range(steps):
            b = batches[step % len(batches)]
            x, y = (b if isinstance(b, (tuple, list)) else (b, None))
            out = model(**x) if isinstance(x, dict) else model(x)
            loss = (loss_fn or _default_loss)(out, y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        for h in handles:
            h.remove()
        results[w] = stats
    if out_png:
        _plot_coords(results, steps, out_png)
    return results


def _clone(m: nn.Module) -> nn.Module:
    """Deep copy keeping the side table."""
    import copy

    return copy.deepcopy(m)


def _plot_coords(results: dict[int, dict[str, list[float]]], steps: int, out_png: str) -> None:
    """One panel per step: mean |activation| of each layer vs width (log-log)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    widths = sorted(results)
    layers = list(results[widths[0]])
    fig, axes = plt.subplots(1, steps, figsize=(4 * steps, 3.5), squeeze=False)
    for s in range(steps):
        ax = axes[0][s]
        for name in layers:
            ys = [results[w].get(name, [math.nan] * steps)[s] if len(results[w].get(name, [])) > s else math.nan
                  for w in widths]
            ax.plot(widths, ys, marker="o", lw=1, label=name)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title(f"step {s}")
        ax.set_xlabel("width")
    axes[0][0].set_ylabel("mean |activation|")
    if len(layers) <= 16:
        axes[0][-1].legend(fontsize=6, loc="best")
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
