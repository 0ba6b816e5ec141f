"""The μP base: each parameter's width multipliers relative to one fixed proxy model.

μP is defined relative to a *base* (``mup.set_base_shapes``): a parameter whose fan-in is k_in
times the base's and whose fan-out is k_out times the base's gets lr / eps / weight decay scaled by
(k_in, k_out) (see :func:`dmscale.mup.optim.mup_factors`).  :func:`set_base` records, for every
parameter, which tensor dim is its fan-in / fan-out, its base shape and (k_in, k_out) as a plain
dict on the model (``model._dmscale_width``; mirrored into an HF ``config.dmscale_width``).  A
plain attribute survives ``copy.deepcopy``, ``dmscale.save``/``load``, DDP / ``fully_shard`` (FSDP2)
wrapping and ``torch.compile``, and is invisible to ``state_dict``.  :func:`dmscale.mup.upscale`
multiplies the record, so a small model and every model grown from it share one base.
"""

from __future__ import annotations

import copy
import math
import numbers
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from dmscale.mup.plan import ROLES, UpscaleError, final_norm, plan, tied_heads, unwrap

__all__ = ["set_base", "width_info", "multipliers", "infer_width_info", "ScaledReadout", "WIDTH_ATTR", "CONFIG_KEY",
           "RECORD_VERSION"]

WIDTH_ATTR = "_dmscale_width"  # plain attribute on the model: survives deepcopy, invisible to state_dict
CONFIG_KEY = "dmscale_width"  # mirrored into an HF config so save_pretrained/from_pretrained keep it
RECORD_VERSION = 1


class ScaledReadout(nn.Linear):
    """A Linear readout whose output is multiplied by ``output_mult`` (μP's multiplier for a tied head).

    :func:`set_base` / :func:`dmscale.mup.upscale` switch a tied ``nn.Linear`` head to this class (same
    parameters, same state-dict keys) when there is no final norm to fold the multiplier into.
    """

    output_mult: float = 1.0

    def forward(self, x: Tensor) -> Tensor:  # noqa: D102
        return nn.functional.linear(x, self.weight, self.bias) * self.output_mult


class LogitScale:
    """Forward hook multiplying a tied readout's output by a constant (fallback for non-Linear heads)."""

    def __init__(self, mult: float) -> None:
        self.mult = mult

    def __call__(self, module: nn.Module, args: Any, output: Tensor) -> Tensor:
        return output * self.mult


# --------------------------------------------------------------------------- the record


def _valid(rec: Any) -> bool:
    return isinstance(rec, Mapping) and rec.get("version") == RECORD_VERSION and isinstance(rec.get("params"), Mapping)


def width_info(model: nn.Module) -> dict[str, Any] | None:
    """The μP record of a model, or None.

    ``{'version', 'params': {name: {'k': [k_in, k_out], 'dims': [in_dim, out_dim], 'base': [...],
    'shape': [...]}}, 'output_mult', 'fold', 'attention', 'noise', 'width'}``: per parameter its width
    multipliers relative to the base, which tensor dims are fan-in / fan-out (None: fixed), its shape
    in the base and when recorded; ``output_mult`` is the tied-head logit multiplier and ``fold``
    where it lives (``'norm:<name>'`` folded into the final norm, ``'readout:<name>'`` a
    :class:`ScaledReadout`, ``'hook:<name>'`` a forward hook).
    """
    m = unwrap(model)
    rec = m.__dict__.get(WIDTH_ATTR)
    if _valid(rec):
        return rec
    cfg = getattr(m, "config", None)
    raw = getattr(cfg, CONFIG_KEY, None) if cfg is not None else None
    if _valid(raw):
        rec = copy.deepcopy(dict(raw))
        object.__setattr__(m, WIDTH_ATTR, rec)
        return rec
    return None


def set_record(model: nn.Module, rec: dict[str, Any]) -> None:
    """Store a record on the model (plain attribute) and in its HF config (if any)."""
    m = unwrap(model)
    object.__setattr__(m, WIDTH_ATTR, rec)
    cfg = getattr(m, "config", None)
    if cfg is not None and hasattr(cfg, "to_dict"):
        setattr(cfg, CONFIG_KEY, copy.deepcopy(rec))


def _num(x: float) -> float | int:
    """Integers stay ints (readable JSON); other ratios stay floats."""
    return int(x) if float(x).is_integer() else float(x)


def param_dims(model: nn.Module, example_inputs: Any = None, keep_in: Sequence[str] = (),
               keep_out: Sequence[str] = (), attention: str = "duplicate_heads") -> tuple[dict[str, Any], Any]:
    """{name: Plan} at factor 1 (which dim is fan-in / fan-out, and its role) and the planning context."""
    ctx = plan(model, {"hidden": 1}, keep_in, keep_out, example_inputs, attention)
    names = {id(p): n for n, p in model.named_parameters()}
    return {names[i]: pl for i, (t, pl) in ctx.plans.items() if i in names}, ctx


def _entry(p: Tensor, dims: tuple[int | None, int | None], r_in: float, r_out: float) -> dict[str, Any]:
    shape = [int(s) for s in p.shape]
    base = list(shape)
    for d, r in zip(dims, (r_in, r_out)):
        if d is not None:
            b = shape[d] / r
            if not float(b).is_integer():
                raise UpscaleError(f"base width {b} of a {tuple(shape)} parameter is not an integer")
            base[d] = int(b)
    return {"k": [_num(r_in), _num(r_out)], "dims": list(dims), "base": base, "shape": shape}


def _ratios_from_model(name: str, p: Tensor, q: Tensor, dims: tuple[int | None, int | None]) -> tuple[float, float]:
    if p.dim() != q.dim():
        raise UpscaleError(f"{name}: shape {tuple(p.shape)} and base shape {tuple(q.shape)} differ in rank")
    for d in range(p.dim()):
        if d not in dims and p.shape[d] != q.shape[d]:
            raise UpscaleError(f"{name}: shape {tuple(p.shape)} differs from base {tuple(q.shape)} in dim {d}, "
                               "which is not a width (data in/out sizes, kernel sizes, vocab must match)")
    return tuple(p.shape[d] / q.shape[d] if d is not None else 1.0 for d in dims)  # type: ignore[return-value]


def _role_ratios(plans: dict[str, Any], params: dict[str, Tensor], widths: Any) -> dict[str, float]:
    """Per-role ratio current size / base size from widths (an int: the hidden base width)."""
    if isinstance(widths, Mapping):
        bad = [k for k in widths if k not in ROLES]
        if bad:
            raise ValueError(f"set_base: width keys {bad} unknown; base widths are given per role {ROLES} "
                             "(or pass a base model)")
        given = dict(widths)
    else:
        given = {"hidden": widths}
    for k, v in given.items():
        if isinstance(v, bool) or not isinstance(v, numbers.Real) or v <= 0 or not math.isfinite(v):
            raise ValueError(f"set_base: base width for {k!r} must be a positive number, got {v!r}")
    sizes: dict[str, set[int]] = {}
    for n, pl in plans.items():
        for d, role in ((pl.in_dim, pl.in_role), (pl.out_dim, pl.out_role)):
            if d is not None and role is not None:
                sizes.setdefault(role if role in ROLES else "hidden", set()).add(int(params[n].shape[d]))
    ratios: dict[str, float] = {}
    for role, v in given.items():
        s = sizes.get(role)
        if not s:
            raise ValueError(f"set_base: the model has no {role!r} dimension")
        if len(s) > 1:
            raise ValueError(f"set_base: the model's {role!r} dims have several sizes {sorted(s)}; one base width "
                             "cannot describe them: pass a base model instead")
        ratios[role] = next(iter(s)) / float(v)
    if "hidden" not in ratios:
        if "hidden" in sizes:
            raise ValueError("set_base: give the base width of 'hidden' (other roles default to its ratio)")
        ratios["hidden"] = 1.0
    for role in ROLES:
        ratios.setdefault(role, ratios["hidden"])
    return ratios


def set_base(model: nn.Module, base: nn.Module | int | Mapping[str, int] | None = None, *,
             readout: str = "rescale", output_mult: bool = True, mup_attention: bool = False,
             example_inputs: Any = None,
             keep_in: Sequence[str] = (), keep_out: Sequence[str] = ()) -> nn.Module:
    """Record each parameter's μP base width on ``model`` (in place; returns ``model``).

    ``base`` is the proxy: a model of the same architecture at the base width (as
    ``mup.set_base_shapes``), an int (the base of every ``'hidden'`` dim; other dims keep the same
    ratio), a dict of base widths per role ``{'hidden': 16, 'ffn': 64, 'heads': 16}``, or None (the
    model is its own base: all multipliers 1).  Call it on a freshly built small model before
    training, then train with :func:`dmscale.mup.mup_optimizer`; :func:`dmscale.mup.upscale` keeps the base.

    ``readout``: μP initialises the readout (hidden -> classes / vocab) at std ∝ 1/fan_in, not the
    standard 1/√fan_in: ``'rescale'`` multiplies an untied readout's weight by 1/√m (as
    ``mup.set_base_shapes`` does), ``'zero'`` zeroes it (and its bias), ``'keep'`` leaves it.
    ``output_mult``: a tied embedding / LM head needs μP's logit multiplier 1/m (m = width / base
    width); it is folded into the final norm (γ, β ÷ m) or put on the head (:class:`ScaledReadout`).
    This changes the model's function (as μP's parametrization does), so call it before training.
    ``mup_attention``: set each attention module's ``scaling`` to √d₀/d (μP's 1/d attention, d₀ the
    base head dim), needed for ``upscale(..., attention='grow_head_dim')`` to follow μP.
    ``example_inputs`` / ``keep_in`` / ``keep_out`` as for :func:`dmscale.mup.upscale`.
    """
    m = unwrap(model)
    old = width_info(m)
    if old is not None and float(old.get("output_mult", 1.0)) != 1.0:
        raise UpscaleError(f"{type(m).__name__} already has a μP base with a tied-head output multiplier "
                           f"{old['output_mult']}; set_base is for a freshly built model")
    plans, ctx = param_dims(m, example_inputs, keep_in, keep_out)
    params = dict(m.named_parameters())
    if base is None or base is model or (isinstance(base, nn.Module) and unwrap(base) is m):
        ratios = {n: (1.0, 1.0) for n in params}
    elif isinstance(base, nn.Module):
        bparams = dict(unwrap(base).named_parameters())
        missing = [n for n in params if n not in bparams]
        if missing:
            raise UpscaleError(f"set_base: parameters {missing[:5]} are missing from the base model "
                               f"{type(unwrap(base)).__name__}")
        ratios = {n: _ratios_from_model(n, params[n], bparams[n], (plans[n].in_dim, plans[n].out_dim))
                  for n in params}
    else:
        rr = _role_ratios(plans, params, base)
        ratios = {n: (rr[_r(plans[n].in_role)] if plans[n].in_dim is not None else 1.0,
                      rr[_r(plans[n].out_role)] if plans[n].out_dim is not None else 1.0) for n in params}
    entries = {n: _entry(params[n], (plans[n].in_dim, plans[n].out_dim), *ratios[n]) for n in params}
    width = max((e["k"][1] for n, e in entries.items() if plans[n].out_role == "hidden"), default=1)
    rec: dict[str, Any] = {"version": RECORD_VERSION, "params": entries, "output_mult": 1.0, "fold": None,
                           "attention": {"mode": "duplicate_heads", "mup_scale": False}, "noise": None,
                           "width": _num(width)}
    if readout not in ("rescale", "zero", "keep"):
        raise ValueError(f"set_base: readout must be 'rescale', 'zero' or 'keep', got {readout!r}")
    if readout != "keep":
        _init_readout(m, rec, plans, readout)
    if output_mult:
        _apply_tied_multiplier(m, rec, plans)
    if mup_attention:
        _set_mup_attention(m, ctx, rec)
    set_record(m, rec)
    return model


def _init_readout(m: nn.Module, rec: dict[str, Any], plans: dict[str, Any], how: str) -> None:
    """μP readout init for untied readouts (fan-in widened, fan-out fixed): × 1/√m or zero."""
    tied = {id(h.weight) for _, h, _ in tied_heads(m)}
    named = dict(m.named_modules())
    with torch.no_grad():
        for n, p in m.named_parameters():
            pl = plans[n]
            if id(p) in tied or p.dim() < 2 or pl.in_dim is None or pl.out_dim is not None:
                continue
            k_in = float(rec["params"][n]["k"][0])
            if how == "zero":
                p.zero_()
                bias = getattr(named[n.rsplit(".", 1)[0]] if "." in n else m, "bias", None)
                if isinstance(bias, Tensor):
                    bias.zero_()
            elif k_in != 1.0:
                p.mul_(1.0 / math.sqrt(k_in))


def _r(role: str | None) -> str:
    return role if role in ROLES else "hidden"


def _apply_tied_multiplier(m: nn.Module, rec: dict[str, Any], plans: dict[str, Any]) -> None:
    """Give a tied embedding/LM head μP's logit multiplier 1/m (fold into the final norm or the head)."""
    heads = tied_heads(m)
    if not heads:
        return
    names = {id(p): n for n, p in m.named_parameters()}
    wname = names[id(heads[0][1].weight)]
    mult = float(rec["params"][wname]["k"][1])
    if mult == 1.0:
        return
    apply_output_multiplier(m, rec, 1.0 / mult, names)


def apply_output_multiplier(m: nn.Module, rec: dict[str, Any], factor: float, names: dict[int, str]) -> None:
    """Multiply the tied head's logits by ``factor`` where the record says (or choose: norm, else head)."""
    heads = tied_heads(m)
    fold = rec.get("fold")
    fn = final_norm(m)
    if fold is None:
        if fn is not None and len(heads) == 1 and any(isinstance(getattr(fn[1], a, None), Tensor)
                                                      for a in ("weight", "bias")):
            fold = f"norm:{fn[0]}"
        elif all(type(h) in (nn.Linear, ScaledReadout) for _, h, _ in heads):
            fold = "readout:" + ",".join(n for n, _, _ in heads)
        else:
            fold = "hook:" + ",".join(n for n, _, _ in heads)
    kind, _, where = fold.partition(":")
    named = dict(m.named_modules())
    with torch.no_grad():
        if kind == "norm":
            norm = named[where]
            for attr in ("weight", "bias"):
                t = getattr(norm, attr, None)
                if isinstance(t, Tensor):
                    t.mul_(factor)
                    e = rec["params"][names[id(t)]]
                    # the logit multiplier lives here: a fan-in-like factor (k_in ÷ factor, k_out 1)
                    e["k"] = [_num(float(e["k"][0]) / factor), _num(float(e["k"][1]) * factor)]
        elif kind == "readout":
            for hn in where.split(","):
                head = named[hn]
                if type(head) is nn.Linear:
                    head.__class__ = ScaledReadout
                    head.output_mult = 1.0
                head.output_mult = float(head.output_mult) * factor
        else:
            for hn in where.split(","):
                named[hn].register_forward_hook(LogitScale(factor))
    rec["fold"] = fold
    rec["output_mult"] = float(rec.get("output_mult", 1.0)) * factor


def _set_mup_attention(m: nn.Module, ctx: Any, rec: dict[str, Any]) -> None:
    """μP attention: logits q·k·√d₀/d (d₀ the base head dim) on modules with `scaling` and `head_dim`."""
    named = dict(m.named_modules())
    base_dims = set()
    for an in ctx.attention_modules:
        mod = named[an]
        d = mod.__dict__.get("head_dim")
        if not isinstance(d, int) or not isinstance(mod.__dict__.get("scaling"), (int, float)):
            raise UpscaleError(f"{an}: mup_attention needs `head_dim` and `scaling` attributes on "
                               f"{type(mod).__name__}")
        w = next(n for n in (f"{an}.q_proj.weight", f"{an}.c_attn.weight") if n in rec["params"])
        k_out = float(rec["params"][w]["k"][1])
        d0 = d / k_out  # the head dim of the base under grow_head_dim scaling
        mod.scaling = math.sqrt(d0) / d
        base_dims.add(_num(d0))
    if not ctx.attention_modules:
        raise UpscaleError(f"{type(m).__name__}: mup_attention=True but no attention block was found")
    rec["attention"] = {"mode": "grow_head_dim", "mup_scale": True, "base_head_dim": sorted(base_dims)}


# --------------------------------------------------------------------------- multipliers


def _checked(model: nn.Module, rec: dict[str, Any]) -> dict[str, Tensor]:
    """Named parameters, after checking they are the ones (and the shapes) the record describes."""
    params = dict(unwrap(model).named_parameters())
    table = rec["params"]
    for n, p in params.items():
        e = table.get(n)
        if e is None:
            raise UpscaleError(f"{n}: parameter has no μP record (added after set_base/upscale?); "
                               "call dmscale.mup.set_base again")
        if [int(s) for s in p.shape] != list(e["shape"]):
            raise UpscaleError(f"{n}: shape {tuple(p.shape)} but the μP record says {tuple(e['shape'])}: the model "
                               "changed after set_base/upscale (e.g. pruned); call dmscale.mup.set_base again")
    gone = [n for n in table if n not in params]
    if gone:
        raise UpscaleError(f"parameters {gone[:5]} of the μP record are missing from the model")
    return params


def _identity_record(model: nn.Module) -> dict[str, Any]:
    m = unwrap(model)
    plans, _ = param_dims(m)
    return {"version": RECORD_VERSION, "output_mult": 1.0, "fold": None,
            "params": {n: _entry(p, (plans[n].in_dim, plans[n].out_dim), 1.0, 1.0)
                       for n, p in m.named_parameters()}}


def multipliers(model: nn.Module, base: nn.Module | None = None) -> dict[str, tuple[float, float]]:
    """{name: (k_in, k_out)} of every parameter, relative to the recorded base (or to ``base``).

    With ``base`` (a model of the same architecture), multipliers are re-expressed relative to it:
    record × (recorded base shape ÷ base's base shape along the fan-in / fan-out dims) ÷ base's
    record, which keeps a folded tied-head multiplier exact.
    """
    rec = width_info(model)
    if base is None:
        if rec is None:
            raise UpscaleError(f"{type(unwrap(model)).__name__}: no μP base recorded; call "
                               "dmscale.mup.set_base(model, proxy) when you build it (or upscale it with "
                               "dmscale.upscale), or pass base=<small model>")
        _checked(model, rec)
        return {n: (e["k"][0], e["k"][1]) for n, e in rec["params"].items()}
    if rec is None:
        rec = _identity_record(model)
    _checked(model, rec)
    brec = width_info(base) or _identity_record(base)
    _checked(base, brec)
    out = {}
    for n, e in rec["params"].items():
        b = brec["params"].get(n)
        if b is None:
            raise UpscaleError(f"{n}: parameter missing from the base model {type(unwrap(base)).__name__}")
        ks = []
        for i, d in enumerate(e["dims"]):
            r = 1.0
            if d is not None:
                if len(b["base"]) != len(e["base"]):
                    raise UpscaleError(f"{n}: rank differs from the base model's")
                r = e["base"][d] / b["base"][d]
            ks.append(float(e["k"][i]) * r / float(b["k"][i]))
        out[n] = (_num(ks[0]), _num(ks[1]))
    return out


def infer_width_info(model: nn.Module, base: nn.Module) -> dict[str, Any]:
    """{'params': {name: (k_in, k_out)}} of ``model`` relative to ``base`` (see :func:`multipliers`)."""
    return {"params": multipliers(model, base)}
