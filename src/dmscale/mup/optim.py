"""μP optimizer settings from the recorded base: per-parameter lr / eps / weight decay.

Each parameter's width multipliers (k_in, k_out) relative to the μP base (recorded by
:func:`dmscale.mup.set_base` and kept by :func:`dmscale.mup.upscale`) set lr / eps / weight decay so
that μP holds across widths and, at zero noise, an upscaled model trains exactly like the small one.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from dmscale.mup.base import multipliers
from dmscale.mup.plan import unwrap

__all__ = ["mup_param_groups", "mup_optimizer", "mup_factors"]

_KINDS = ("sgd", "adam", "adamw")


def mup_factors(kind: str, k_in: float, k_out: float) -> dict[str, float]:
    """Multipliers for lr / eps / weight_decay of one parameter (method table, dynamic equivalence)."""
    kind = kind.lower() if isinstance(kind, str) else kind
    if kind == "sgd":
        return {"lr": k_out / k_in, "weight_decay": k_in / k_out, "eps": 1.0}
    if kind == "adam":  # coupled (L2) weight decay
        return {"lr": 1.0 / k_in, "eps": 1.0 / k_out, "weight_decay": k_in / k_out}
    if kind == "adamw":  # decoupled: lr*wd must stay fixed
        return {"lr": 1.0 / k_in, "eps": 1.0 / k_out, "weight_decay": float(k_in)}
    raise ValueError(f"mup optimizer kind must be one of {_KINDS}, got {kind!r}")


def _kind(kind: Any) -> str:
    if not isinstance(kind, str):
        raise TypeError(f"mup: kind must be one of {_KINDS}, got a {type(kind).__name__} (pass a base model as "
                        "base=...)")
    mup_factors(kind, 1, 1)  # validates the name
    return kind.lower()


def mup_param_groups(model: nn.Module, kind: str = "adamw", lr: float = 1e-3, *, base: nn.Module | None = None,
                     weight_decay: float = 0.0, eps: float = 1e-8, **extra: Any) -> list[dict[str, Any]]:
    """Param-group dicts with μP-scaled lr / eps / weight_decay per parameter, for any optimizer.

    Multipliers come from the model's recorded μP base; ``base=<model>`` re-expresses them relative to
    that model instead (``base=small`` is the special case of μP relative to the small model itself).
    Each group has ``params``, ``param_names``, ``lr``, ``weight_decay``, ``eps`` (Adam kinds) and
    ``dmscale_k=(k_in, k_out)``.
    """
    kind = _kind(kind)
    factors = multipliers(model, base)
    groups: dict[tuple[float, float], dict[str, Any]] = {}
    for n, p in unwrap(model).named_parameters():
        if not p.requires_grad:
            continue
        kin, kout = factors[n]
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


def mup_optimizer(model: nn.Module, kind: str = "adamw", lr: float = 1e-3, *, base: nn.Module | None = None,
                  **kwargs: Any) -> torch.optim.Optimizer:
    """torch SGD / Adam / AdamW with μP per-parameter settings from the model's recorded base.

    ``momentum``, ``nesterov``, ``dampening``, ``betas``, ``amsgrad``, ``eps``, ``weight_decay`` (scaled),
    ``foreach``… are passed to the torch optimizer.  Works on the plain model and on DDP /
    ``fully_shard`` / ``torch.compile`` wrapped ones (same groups).
    """
    kind = _kind(kind)
    wd = kwargs.pop("weight_decay", 0.0 if kind != "adamw" else 1e-2)
    eps = kwargs.pop("eps", 1e-8)
    groups = mup_param_groups(model, kind=kind, lr=lr, base=base, weight_decay=wd, eps=eps)
    for g in groups:
        g.pop("param_names", None)  # torch >= 2.6 validates names against all groups; keep it simple
        g.pop("dmscale_k", None)
    if kind == "sgd":
        return torch.optim.SGD(groups, lr=lr, **kwargs)
    if kind == "adam":
        return torch.optim.Adam(groups, lr=lr, **kwargs)
    return torch.optim.AdamW(groups, lr=lr, **kwargs)
