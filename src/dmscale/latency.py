"""Latency targets (the paper's Table 13): measured per-layer latency, a fitted model, a cache.

``Target(latency=seconds, device=..., batch_size=...)`` makes ``DMS`` build a ``LatencyModel``:

1. Each searchable layer (Linear / HF Conv1D, Conv, BatchNorm, LayerNorm, RMSNorm, Embedding) is
   rebuilt alone at several kept widths (fractions of its input and output channels) and timed on
   the device with its real input shape at ``batch_size`` (the widths alternate over 5 rounds, so
   a change of machine load hits them alike; median per width).
2. Per layer, a quadratic in the kept fractions ``(x_out, x_in)`` is fitted with non-negative
   coefficients (so the model never predicts a faster network for more channels).
3. The sum of the layer models misses what is not a layer (activations, additions, attention
   matmuls, Python overhead). The whole exported model is timed at a few uniform widths and
   ``latency = alpha + beta * sum(layer models) + gamma * kept blocks`` is fitted to those
   timings (and to two with every removable block removed, for what a block costs beyond its
   layers).

4. At the start of the refine phase and at export, the projection lands on the *measured* latency
   (``land_measured``): it times the export, corrects the model by measured / predicted at that
   structure and projects again, up to ``DMSConfig.latency_checks`` times.

The model is evaluated on the kept fractions the resources use, so the forward value is the
latency of the hard widths (what the export runs) and the gradient is that of the soft masks
(straight-through). Measurements are cached as JSON in ``DMSConfig.latency_cache``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import torch
import torch.nn as nn
from torch.nn.utils import parametrize
from torch.utils._pytree import tree_map

from .trace.tracer import Space, layer_kind

if TYPE_CHECKING:
    from .search import DMS

__all__ = ["measure_latency", "fit_quadratic", "fit_calibration", "LayerLatency", "LatencyModel",
           "build_latency_model", "measure_export", "land_measured", "CACHE_FILE"]

CACHE_FILE = "dmscale-latency.json"
_CACHE_FORMAT = "dmscale-latency-cache"
GRID = (0.25, 0.5, 0.75, 1.0)
CALIBRATION = (1.0, 0.75, 0.5, 0.3)
ROUNDS = 5  # measurements of one layer's grid (or the calibration exports) alternate over this many rounds
Timer = Callable[[nn.Module, tuple, dict], float]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _device_of(args: tuple, kwargs: dict, module: nn.Module) -> torch.device:
    for t in list(args) + list(kwargs.values()):
        if isinstance(t, torch.Tensor):
            return t.device
    p = next(iter(module.parameters()), None)
    return p.device if p is not None else torch.device("cpu")


@torch.no_grad()
def measure_latency(module: nn.Module, args: tuple, kwargs: dict | None = None, *, repeats: int = 20,
                    warmup: int = 3, min_time: float = 1e-3) -> float:
    """Median seconds of one ``module(*args, **kwargs)`` call over ``repeats`` timed runs.

    Each timed run repeats the call enough times to last ``min_time`` (tiny layers are faster than
    the clock's noise); CUDA is synchronised around every run.
    """
    kwargs = kwargs or {}
    device = _device_of(args, kwargs, module)
    for _ in range(max(1, warmup)):
        module(*args, **kwargs)
    _sync(device)
    t0 = time.perf_counter()
    module(*args, **kwargs)
    _sync(device)
    one = max(time.perf_counter() - t0, 1e-7)
    inner = int(min(1000, max(1, math.ceil(min_time / one))))
    times = []
    for _ in range(max(1, repeats)):
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(inner):
            module(*args, **kwargs)
        _sync(device)
        times.append((time.perf_counter() - t0) / inner)
    return float(statistics.median(times))


# ---------------------------------------------------------------------------------------------- fitting
def _features(x: float | torch.Tensor, y: float | torch.Tensor, nvar: int) -> list:
    if nvar == 0:
        return [1.0]
    if nvar == 1:
        return [1.0, x, x * x]
    return [1.0, x, y, x * x, x * y, y * y]


def fit_quadratic(points: list[tuple[float, float, float]], nvar: int) -> list[float]:
    """Least-squares quadratic ``t(x, y)`` with non-negative coefficients (active set: drop, refit).

    ``nvar`` = 0 (constant), 1 (in x) or 2 (in x and y). Non-negative coefficients make the model
    nondecreasing in both fractions on [0, 1], which the budget projection relies on.
    """
    if not points:
        raise ValueError("fit_quadratic needs at least one measured point")
    rows = torch.tensor([[float(v) for v in _features(x, y, nvar)] for x, y, _ in points], dtype=torch.float64)
    t = torch.tensor([p[2] for p in points], dtype=torch.float64)
    active = list(range(rows.shape[1]))
    coef = torch.zeros(rows.shape[1], dtype=torch.float64)
    while active:
        sol = torch.linalg.lstsq(rows[:, active], t[:, None], driver="gelsd").solution[:, 0]
        if bool((sol >= 0).all()):
            coef.zero_()
            coef[active] = sol
            break
        active.pop(int(torch.argmin(sol)))  # the most negative coefficient leaves the model
    return [float(c) for c in coef]


# ---------------------------------------------------------------------------------------------- model
@dataclass
class LayerLatency:
    """One measured layer: which spaces set its kept fractions, its blocks, and the fitted quadratic."""

    module: str
    kind: str
    out_space: Space | None
    in_space: Space | None
    blocks: tuple[str, ...]
    coef: list[float]
    points: list[tuple[float, float, float]] = field(default_factory=list)

    @property
    def nvar(self) -> int:
        return (self.out_space is not None) + (self.in_space is not None)

    def predict(self, x_out: Any = 1.0, x_in: Any = 1.0) -> Any:
        """Latency (seconds) at these kept fractions; works on floats and tensors (differentiable)."""
        xs = [v for v, sp in ((x_out, self.out_space), (x_in, self.in_space)) if sp is not None] + [1.0, 1.0]
        feats = _features(xs[0], xs[1], self.nvar)
        total: Any = 0.0
        for c, f in zip(self.coef, feats):
            if c:
                total = total + c * f
        return total


@dataclass
class LatencyModel:
    """``alpha + beta * sum(gate * layer quadratic) + gamma * kept blocks``: seconds per forward at ``batch_size``.

    ``gamma`` is what a removable block costs beyond its measured layers (activations, additions,
    module calls); ``calibration`` holds ``(width multiplier, shallow, measured, layer sum, kept blocks)``.
    """

    device: str
    batch_size: int
    layers: list[LayerLatency]
    alpha: float = 0.0
    beta: float = 1.0
    gamma: float = 0.0
    calibration: list[tuple[float, bool, float, float, float]] = field(default_factory=list)

    def layer_sum(self, frac: Callable[[Space], Any], gates: dict[str, Any]) -> Any:
        total: Any = 0.0
        for lay in self.layers:
            x = frac(lay.out_space) if lay.out_space is not None else 1.0
            y = frac(lay.in_space) if lay.in_space is not None else 1.0
            t = lay.predict(x, y)
            for b in lay.blocks:
                t = t * gates[b]
            total = total + t
        return total

    def value(self, frac: Callable[[Space], Any], gates: dict[str, Any]) -> Any:
        """Predicted latency for the kept fractions given by ``frac(space)`` and the block gates."""
        out = self.alpha + self.beta * self.layer_sum(frac, gates)
        if self.gamma:
            out = out + self.gamma * sum(gates.values(), 0.0)
        return out


# ---------------------------------------------------------------------------------------------- cache
class _Cache:
    """JSON table of measurements in a directory the caller names; written atomically."""

    def __init__(self, directory: str | None) -> None:
        self.path = None if directory is None else Path(directory) / CACHE_FILE
        self.data: dict[str, Any] = {"format": _CACHE_FORMAT, "version": 1, "layers": {}, "models": {}}
        self.dirty = False
        if self.path is not None and self.path.exists():
            if not self.path.is_file():
                raise ValueError(f"latency cache {self.path} exists and is not a regular file")
            try:
                data = json.loads(self.path.read_text())
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise ValueError(f"latency cache {self.path} is not a dmscale latency table ({exc}); "
                                 "move it away or name another latency_cache directory") from None
            if not isinstance(data, dict) or data.get("format") != _CACHE_FORMAT or \
                    not isinstance(data.get("layers"), dict) or not isinstance(data.get("models"), dict):
                raise ValueError(f"latency cache {self.path} is not a dmscale latency table; move it away or "
                                 "name another latency_cache directory")
            self.data = data

    def get(self, table: str, key: str) -> Any:
        return self.data[table].get(key)

    def put(self, table: str, key: str, value: Any) -> None:
        self.data[table][key] = value
        self.dirty = True

    def save(self) -> None:
        if self.path is None or not self.dirty:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-dmscale-latency-", dir=self.path.parent)
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(self.data, f, indent=1, sort_keys=True)
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        self.dirty = False


def _device_desc(device: torch.device, timer: Timer | None) -> str:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"{platform.machine()}-{platform.processor() or 'cpu'}-threads{torch.get_num_threads()}"
    who = "wallclock" if timer is None else getattr(timer, "__qualname__", type(timer).__name__)
    return f"{device.type}:{name}:torch{torch.__version__}:{who}"


# ---------------------------------------------------------------------------------------------- replicas
def _kept(n: int, x: float) -> int:
    return max(1, int(round(n * x)))


def _replica(mod: nn.Module, kind: str, inp: torch.Tensor, x_out: float, x_in: float,
             device: torch.device) -> tuple[nn.Module, torch.Tensor] | None:
    """A fresh layer with the kept widths, and a matching random input (None: kind not measurable)."""
    dtype = inp.dtype if inp.is_floating_point() else next(mod.parameters()).dtype
    shape = list(inp.shape)
    gen = torch.Generator().manual_seed(0)
    if kind in ("linear", "hf_conv1d"):
        w = mod.weight
        n_in, n_out = (w.shape[1], w.shape[0]) if kind == "linear" else (w.shape[0], w.shape[1])
        ci, co = _kept(n_in, x_in), _kept(n_out, x_out)
        rep: nn.Module = nn.Linear(ci, co, bias=getattr(mod, "bias", None) is not None)
        shape[-1] = ci
    elif kind == "conv":
        depthwise = mod.groups > 1 and mod.groups == mod.in_channels == mod.out_channels
        co = _kept(mod.out_channels, x_out)
        if depthwise:
            ci, groups = co, co
        else:
            groups = mod.groups
            ci = max(groups, int(round(_kept(mod.in_channels, x_in) / groups)) * groups)
            co = max(groups, int(round(co / groups)) * groups)
        rep = type(mod)(ci, co, mod.kernel_size, stride=mod.stride, padding=mod.padding, dilation=mod.dilation,
                        groups=groups, bias=mod.bias is not None, padding_mode=mod.padding_mode)
        shape[1] = ci
    elif kind == "batchnorm":
        bn = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}.get(inp.dim())
        if bn is None:
            return None
        c = _kept(mod.num_features, x_out)
        rep = bn(c)
        shape[1] = c
    elif kind in ("layernorm", "rmsnorm"):
        n = mod.weight.shape[0] if getattr(mod, "weight", None) is not None else shape[-1]
        c = _kept(n, x_out)
        rep = nn.LayerNorm(c) if kind == "layernorm" else nn.RMSNorm(c)
        shape[-1] = c
    elif kind == "embedding":
        c = _kept(mod.embedding_dim, x_out)
        rep = nn.Embedding(mod.num_embeddings, c)
        return rep.to(device).eval(), inp.to(device)
    else:
        return None
    x = torch.randn(shape, generator=gen).to(device=device, dtype=dtype)
    return rep.to(device=device, dtype=dtype).eval(), x


def _signature(mod: nn.Module, kind: str, inp: torch.Tensor) -> str:
    attrs = {k: v for k, v in vars(mod).items() if not k.startswith("_") and isinstance(v, (int, float, str, bool, tuple))}
    w = getattr(mod, "weight", None)
    return json.dumps([kind, type(mod).__name__, list(inp.shape), str(inp.dtype),
                       list(w.shape) if isinstance(w, torch.Tensor) else None,
                       sorted((k, str(v)) for k, v in attrs.items())])


# ---------------------------------------------------------------------------------------------- build
def _batched(obj: Any, b0: int, batch: int) -> Any:
    """Example inputs with their batch dimension (dim 0 of size b0) resized to ``batch``."""
    if isinstance(obj, torch.Tensor):
        if obj.dim() == 0 or obj.shape[0] != b0 or b0 == batch:
            return obj
        reps = math.ceil(batch / b0)
        return obj.repeat(reps, *([1] * (obj.dim() - 1)))[:batch]
    if isinstance(obj, tuple):
        return tuple(_batched(o, b0, batch) for o in obj)
    if isinstance(obj, list):
        return [_batched(o, b0, batch) for o in obj]
    if isinstance(obj, dict):
        return {k: _batched(v, b0, batch) for k, v in obj.items()}
    return obj


def _to(obj: Any, device: torch.device) -> Any:
    return tree_map(lambda t: t.to(device) if isinstance(t, torch.Tensor) else t, obj)


def _raw_param(mod: nn.Module, attr: str) -> Any:
    """The stored tensor behind ``mod.attr`` (the original under a mask parametrization)."""
    if parametrize.is_parametrized(mod, attr) and hasattr(mod.parametrizations[attr], "original"):
        return mod.parametrizations[attr].original
    return getattr(mod, attr, None)


def _param_records(dms: "DMS") -> dict[int, Any]:
    """id(stored weight tensor) -> its trace record (tied weights: one record for every owner)."""
    mods = dict(dms.model.named_modules())
    out: dict[int, Any] = {}
    for rec in dms.trace.params.values():
        mod = mods.get(rec.module)
        t = _raw_param(mod, rec.attr) if mod is not None and not rec.is_buffer else None
        if isinstance(t, torch.Tensor):
            out[id(t)] = rec
    return out


def _layer_spaces(kind: str, mod: nn.Module, rec: Any) -> tuple[Space | None, Space | None]:
    """(output-channel space, input-channel space) of a layer from its weight's record."""
    d = rec.dims
    if kind == "linear" or kind == "conv":
        return d[0], (d[1] if len(d) > 1 and d[1].find().size > 1 else None)
    if kind == "hf_conv1d":
        return d[1], d[0]
    if kind == "embedding":
        return d[1], None
    return d[0], None


def _timing_setup(dms: "DMS") -> tuple[torch.device, int, Any, Any]:
    """(device, batch size, example args and kwargs at that batch size, on the model's device) of a latency target."""
    tgt = dms.target
    p0 = next(iter(dms.model.parameters()), None)
    home = p0.device if p0 is not None else torch.device("cpu")
    device = torch.device(tgt.device) if tgt.device is not None else home
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"Target device={tgt.device!r}: CUDA is not available here")
    tensors = [t for t in list(dms.example_inputs) + list(dms.example_kwargs.values()) if isinstance(t, torch.Tensor)]
    b0 = int(tensors[0].shape[0]) if tensors and tensors[0].dim() > 0 else 1
    batch = int(tgt.batch_size or b0)
    return device, batch, _batched(dms.example_inputs, b0, batch), _batched(dms.example_kwargs, b0, batch)


def _timer(cfg: Any) -> Timer:
    """The user's ``latency_timer``, else the wall clock with ``latency_repeats`` spread over ``ROUNDS`` rounds."""
    each = max(3, math.ceil(cfg.latency_repeats / ROUNDS))
    return cfg.latency_timer or (lambda m, a, k: measure_latency(m, a, k, repeats=each))


@torch.no_grad()
def measure_export(dms: "DMS") -> float:
    """Seconds per forward of what ``dms.export()`` would return now, timed like the calibration (the target's
    device and batch size, median over ``ROUNDS`` rounds)."""
    device, _, args, kwargs = _timing_setup(dms)
    small = dms.export(check=False, project=False).to(device).eval()
    return _interleaved(_timer(dms.config), [(small, _to(args, device), _to(kwargs, device))], ROUNDS)[0]


@torch.no_grad()
def land_measured(dms: "DMS", when: str) -> Any:
    """Land a latency target on the *measured* latency of the export, not only on the model's prediction.

    The per-layer model is fitted on uniform widths; a searched structure mixes widths the grid never
    timed, and what the layers cost together differs from the sum of their costs alone. So: project to
    the target with the model (``budget.project``), export, time the export (``measure_export``); when
    it misses the target by more than ``config.latency_tolerance``, correct the model by the ratio
    measured / predicted at that structure (``dms.latency_scale``, which moves ``dms.target_fraction``)
    and project again from the searched ratios, up to ``config.latency_checks`` exports. The export
    closest to the target is kept (its ratios, its projection; ``kept`` in its record); every check is
    recorded in ``dms.latency_checks``. Returns the kept ``Projection``.
    """
    from .budget import project

    cfg = dms.config
    if cfg.latency_checks < 1:
        raise ValueError(f"land_measured needs latency_checks >= 1, got {cfg.latency_checks}")
    target = float(dms.target.latency)
    params = list(dms.structure_parameters())
    searched = [p.detach().clone() for p in params]
    best: tuple[float, Any, list[torch.Tensor], float, dict] | None = None
    for i in range(cfg.latency_checks):
        for p, s in zip(params, searched):
            p.copy_(s)
        frac = dms.target_fraction
        proj = project(dms, frac, warn=False, tolerance=cfg.tolerance)
        predicted = float(dms.resources.evaluate(soft=False)["latency"])
        measured = measure_export(dms)
        check = {"when": when, "check": i + 1, "model_fraction": frac, "predicted_s": predicted,
                 "measured_s": measured, "target_s": target, "kept": False}
        dms.latency_checks.append(check)
        err = abs(measured / target - 1.0)
        scale = measured / predicted if predicted > 0 else dms.latency_scale
        if best is None or err < best[0]:
            best = (err, proj, [p.detach().clone() for p in params], scale, check)
        if err <= cfg.latency_tolerance:
            break
        dms.latency_scale = scale  # this structure's measured / predicted: the next projection aims with it
    _, proj, ratios, dms.latency_scale, kept = best
    kept["kept"] = True
    for p, r in zip(params, ratios):
        p.copy_(r)
    return proj


@torch.no_grad()
def build_latency_model(dms: "DMS") -> LatencyModel:
    """Measure (or read from the cache) every searchable layer and the calibration; fit; return the model."""
    cfg = dms.config
    model = dms.model
    device, batch, args, kwargs = _timing_setup(dms)
    rounds = ROUNDS
    timer = _timer(cfg)
    desc = _device_desc(device, cfg.latency_timer)
    cache = _Cache(cfg.latency_cache)
    records = _param_records(dms)
    removable = dms.resources.removable
    masker = dms.masker

    # 1. the input of every measurable layer at the target batch size (masks off: the supernet)
    inputs: dict[str, torch.Tensor] = {}
    handles = []
    named = [(n, m, layer_kind(m)) for n, m in model.named_modules()]
    named = [(n, m, k) for n, m, k in named if k is not None and isinstance(_raw_param(m, "weight"), torch.Tensor)]
    for n, m, _ in named:
        def hook(mod: nn.Module, a: tuple, n: str = n) -> None:
            if a and isinstance(a[0], torch.Tensor) and n not in inputs:
                inputs[n] = a[0].detach()
        handles.append(m.register_forward_pre_hook(hook))
    was = model.training
    model.eval()
    try:
        with dms.unmasked():
            model(*args, **kwargs)
    finally:
        for h in handles:
            h.remove()
        model.train(was)

    # 2. per-layer measurements and fits
    layers: list[LayerLatency] = []
    layer_keys: list[str] = []
    for n, m, kind in named:
        rec = records.get(id(_raw_param(m, "weight")))
        if rec is None or n not in inputs:
            continue
        out_s, in_s = _layer_spaces(kind, m, rec)
        out_s = out_s if out_s is not None and masker.prunable(out_s) else None
        in_s = in_s if in_s is not None and masker.prunable(in_s) else None
        xs = GRID if out_s is not None else (1.0,)
        ys = GRID if in_s is not None else (1.0,)
        key = f"{desc}|{_signature(m, kind, inputs[n])}|{xs}|{ys}"
        pts = cache.get("layers", key)
        if pts is None:
            grid = [(x, y) for x in xs for y in ys]
            reps = [_replica(m, kind, inputs[n], x, y, device) for x, y in grid]
            if any(r is None for r in reps):
                continue  # a layer we cannot rebuild alone: left to the calibration
            times = _interleaved(timer, [(r[0], (r[1],), {}) for r in reps], rounds)
            pts = [(x, y, t) for (x, y), t in zip(grid, times)]
            cache.put("layers", key, pts)
        pts = [tuple(p) for p in pts]
        if out_s is None and in_s is not None:  # one variable: put it first
            fit_pts = [(y, x, t) for x, y, t in pts]
        else:
            fit_pts = pts
        nvar = (out_s is not None) + (in_s is not None)
        blocks = tuple(b for b in rec.blocks if b in removable)
        layers.append(LayerLatency(n, kind, out_s, in_s, blocks, fit_quadratic(fit_pts, nvar), pts))
        layer_keys.append(key.split("|", 1)[1])
    lat = LatencyModel(str(device), batch, layers)

    # 3. calibration on whole exported models: uniform widths, all removable blocks kept or removed
    sig = hashlib.sha256(json.dumps([type(model).__name__, [(g.name, g.size) for g in dms.groups], layer_keys,
                                     batch]).encode()).hexdigest()[:24]
    mkey = f"{desc}|{sig}"
    cal = cache.get("models", mkey)
    saved = {g.key: dms.space.ratio(g).detach().clone() for g in dms.groups}
    has_depth = any(g.kind == "depth" for g in dms.groups)
    configs = [(m, False) for m in CALIBRATION] + ([(1.0, True), (0.5, True)] if has_depth else [])

    def uniform(mult: float, shallow: bool) -> None:
        for g in dms.groups:
            if g.kind == "depth":
                r = g.min_ratio() if shallow else 1.0
            else:
                r = min(max(mult, g.min_ratio()), g.bounds.max_ratio)
            dms.space.ratio(g).fill_(r)

    rows = []
    dms.resources.latency = lat  # alpha 0, beta 1, gamma 0: the sum of the layer models
    try:
        if cal is None:
            exports = []
            for mult, shallow in configs:
                uniform(mult, shallow)
                exports.append(dms.export(check=False, project=False).to(device).eval())
            a_dev, k_dev = _to(args, device), _to(kwargs, device)
            times = _interleaved(timer, [(e, a_dev, k_dev) for e in exports], rounds)
            cal = [(mult, shallow, t) for (mult, shallow), t in zip(configs, times)]
            del exports
            cache.put("models", mkey, cal)
        for mult, shallow, measured in cal:
            uniform(mult, shallow)
            _, gates = dms.resources.kept_fractions(soft=False)
            blocks = float(sum(float(v) for v in gates.values()))
            rows.append((float(mult), bool(shallow), float(measured),
                         float(dms.resources.evaluate(soft=False)["latency"]), blocks))
    finally:
        dms.resources.latency = None
        for g in dms.groups:
            dms.space.ratio(g).copy_(saved[g.key])
    cache.save()
    lat.calibration = rows
    lat.alpha, lat.beta, lat.gamma = fit_calibration([(r[3], r[4], r[2]) for r in rows])
    return lat


def fit_calibration(rows: list[tuple[float, float, float]]) -> tuple[float, float, float]:
    """``measured ~ alpha + beta * layers + gamma * blocks`` for rows ``(layers, blocks, measured)``.

    Least squares with ``beta > 0`` and ``gamma >= 0``; gamma is dropped when the block count does
    not vary (no removable blocks) or comes out negative.
    """
    if not rows:
        return 0.0, 1.0, 0.0
    blocks = [b for _, b, _ in rows]
    if max(blocks) - min(blocks) > 1e-9 and len(rows) >= 3:
        a = torch.tensor([[1.0, p, b] for p, b, _ in rows], dtype=torch.float64)
        y = torch.tensor([[t] for _, _, t in rows], dtype=torch.float64)
        alpha, beta, gamma = (float(v) for v in torch.linalg.lstsq(a, y, driver="gelsd").solution[:, 0])
        if beta > 0 and gamma >= 0:
            return alpha, beta, gamma
    alpha, beta = _fit_affine([(p, t) for p, _, t in rows])
    return alpha, beta, 0.0


def _interleaved(timer: Timer, items: list[tuple[nn.Module, tuple, dict]], rounds: int) -> list[float]:
    """Median over ``rounds`` alternating rounds of each item's time: load changes hit every item alike."""
    times: list[list[float]] = [[] for _ in items]
    with torch.no_grad():
        for _ in range(rounds):
            for i, (mod, a, k) in enumerate(items):
                times[i].append(float(timer(mod, a, k)))
    return [float(statistics.median(t)) for t in times]


def _fit_affine(pairs: list[tuple[float, float]]) -> tuple[float, float]:
    """``measured ~ alpha + beta * predicted`` (least squares, beta > 0; else a pure offset)."""
    if not pairs:
        return 0.0, 1.0
    xs = [p for p, _ in pairs]
    ys = [t for _, t in pairs]
    if len(pairs) >= 2 and max(xs) - min(xs) > 1e-12:
        mx, my = statistics.fmean(xs), statistics.fmean(ys)
        beta = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
        if beta > 0:
            return my - beta * mx, beta
    if max(xs) > 0:
        return 0.0, statistics.fmean(ys) / statistics.fmean(xs)
    return statistics.fmean(ys), 1.0
