"""``DMS``: the public entry point that wraps a model for differentiable width/depth search."""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import fnmatch
import math
import os
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch
import torch.nn as nn

from . import budget
from . import distributed as _dist
from .budget import Projection
from .export import export_model
from .importance import METHODS, ImportanceTracker
from .latency import build_latency_model, land_measured
from .masking import Masker, install_checked
from .resources import Resources
from .schedule import Schedule, Target, check_float, check_int
from .space import GroupBounds, SearchSpace, build_search_space, leaf_index
from .trace.tracer import TraceError, trace

__all__ = ["DMS", "DMSConfig"]


def _str_list(name: str, value: Any) -> tuple[str, ...]:
    """A string or an iterable of non-empty strings, as a tuple (a single string is one name)."""
    if isinstance(value, str):
        value = (value,)
    try:
        out = tuple(value)
    except TypeError:
        raise ValueError(f"{name} must be a list of module names, got {value!r}") from None
    for v in out:
        if not isinstance(v, str) or not v:
            raise ValueError(f"{name} must hold non-empty module names (strings), got {v!r}")
    return out


MAX_WEIGHT_FACTOR = 1e4  # the adaptive resource weight stays within [resource_weight, 1e4 x resource_weight]


@dataclass
class DMSConfig:
    """Every option of a DMS search. ``DMS(model, x, config=DMSConfig(...))``; keyword arguments override.

    * ``target`` (``Target``) and ``total_steps``: the budget and the search length (both required).
    * ``importance`` ('taylor' | 'fisher' | 'snip' | 'l1'), ``importance_decay``: element importance.
    * ``resource_weight``: w of ``task + w * resource loss``; ``adaptive_weight``: rate of its multiplier
      update (0 = fixed weight); ``decay_fraction``: part of the search over which the target decays.
    * ``exclude``: module names (or glob patterns) whose dimensions stay unpruned; every one must match.
    * ``bounds``: ``{group name or pattern: {"min_ratio", "max_ratio", "divisor"}}``; ``divisor`` and
      ``min_ratio`` are the defaults for every group.
    * ``prune_width / prune_heads / prune_head_dim / prune_depth``: which kinds of dimension are searched;
      ``depth_containers`` limits block discovery, ``depth_blocks`` declares stages by module name.
    * ``fold_masks``: mask conv/BN through their weights (same values, less overhead).
    * ``project_refine``: land on the budget when the refine phase starts; ``project_export``: ``export()``
      lands on it (``budget.project``) unless told otherwise; ``tolerance``: the band below the target.
    * ``recover_below``: when the exported resource falls more than this fraction below the current
      target during the search (momentum, a task loss that does not resist pruning), the widths are
      projected back up to it; 0 disables.
    * ``latency_cache``: directory for latency measurement tables (``Target(latency=...)``);
      ``latency_repeats``: timed runs per measurement (median); ``latency_timer``: a callable
      ``(module, args, kwargs) -> seconds`` replacing the wall-clock timer (tests, other devices);
      ``latency_checks``: exports timed to land a latency target on its measured value (at the refine
      start and at export; 0 trusts the model alone); ``latency_tolerance``: the relative miss that
      ends those checks.
    * ``warn``: warnings about unsupported ops.
    """

    target: Target | None = None
    total_steps: int | None = None
    importance: str = "taylor"
    importance_decay: float = 0.99
    resource_weight: float = 1.0
    adaptive_weight: float = 1.0
    decay_fraction: float = 0.8
    exclude: Sequence[str] = ()
    bounds: dict[str, Any] | None = None
    divisor: int = 1
    min_ratio: float = 0.0
    prune_width: bool = True
    prune_heads: bool = True
    prune_head_dim: bool = False
    prune_depth: bool = True
    depth_containers: Sequence[str] | None = None
    depth_blocks: Sequence[Sequence[str]] | None = None
    fold_masks: bool = True
    warn: bool = True
    project_refine: bool = True
    project_export: bool = True
    tolerance: float = 0.01
    recover_below: float = 0.05
    latency_cache: str | None = None
    latency_repeats: int = 20
    latency_timer: Callable[..., float] | None = None
    latency_checks: int = 4
    latency_tolerance: float = 0.05

    def __post_init__(self) -> None:
        if self.target is not None and not isinstance(self.target, Target):
            raise TypeError("target must be dmscale.Target(flops=...), Target(params=...) or Target(latency=...), "
                            f"got {type(self.target).__name__}")
        if self.total_steps is not None:
            self.total_steps = check_int("total_steps", self.total_steps, 1)
        if self.importance not in METHODS:
            hint = difflib.get_close_matches(str(self.importance), METHODS, 1)
            raise ValueError(f"importance must be one of {METHODS}, got {self.importance!r}"
                             + (f" (did you mean {hint[0]!r}?)" if hint else ""))
        self.importance_decay = check_float("importance_decay", self.importance_decay, 0.0, 1.0, hi_open=True)
        self.resource_weight = check_float("resource_weight", self.resource_weight, 0.0, lo_open=True)
        self.adaptive_weight = check_float("adaptive_weight", self.adaptive_weight, 0.0, 100.0)
        self.decay_fraction = check_float("decay_fraction", self.decay_fraction, 0.0, 1.0, lo_open=True)
        self.exclude = _str_list("exclude", self.exclude)
        if self.bounds is not None:
            if not isinstance(self.bounds, dict) or not all(isinstance(k, str) for k in self.bounds):
                raise ValueError(f"bounds must be a dict {{group name or pattern: bounds}}, got {self.bounds!r}")
            self.bounds = {k: _as_bounds(v, k) for k, v in self.bounds.items()}
        self.divisor = check_int("divisor", self.divisor, 1)
        self.min_ratio = check_float("min_ratio", self.min_ratio, 0.0, 1.0)
        for name in ("prune_width", "prune_heads", "prune_head_dim", "prune_depth", "fold_masks", "warn",
                     "project_refine", "project_export"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if self.depth_containers is not None:
            self.depth_containers = _str_list("depth_containers", self.depth_containers)
        if self.depth_blocks is not None:
            if isinstance(self.depth_blocks, str):
                raise ValueError("depth_blocks must be a list of stages, each a list of block names")
            self.depth_blocks = tuple(_str_list("depth_blocks stage", st) for st in self.depth_blocks)
        self.tolerance = check_float("tolerance", self.tolerance, 0.0, 0.5, lo_open=True)
        self.recover_below = check_float("recover_below", self.recover_below, 0.0, 1.0, hi_open=True)
        if self.recover_below and self.recover_below <= self.tolerance:
            raise ValueError(f"recover_below={self.recover_below} must be 0 (off) or larger than "
                             f"tolerance={self.tolerance}")
        if self.latency_cache is not None:
            if not isinstance(self.latency_cache, (str, os.PathLike)):
                raise ValueError(f"latency_cache must be a directory path, got {self.latency_cache!r}")
            self.latency_cache = os.fspath(self.latency_cache)
        self.latency_repeats = check_int("latency_repeats", self.latency_repeats, 1)
        self.latency_checks = check_int("latency_checks", self.latency_checks, 0)
        self.latency_tolerance = check_float("latency_tolerance", self.latency_tolerance, 0.0, 1.0, lo_open=True,
                                             hi_open=True)
        if self.latency_timer is not None and not callable(self.latency_timer):
            raise ValueError(f"latency_timer must be callable (module, args, kwargs) -> seconds, "
                             f"got {self.latency_timer!r}")


_CONFIG_FIELDS = tuple(f.name for f in dataclasses.fields(DMSConfig))


def _as_bounds(b: Any, key: str = "") -> GroupBounds:
    where = f"bounds[{key!r}]: " if key else ""
    if isinstance(b, GroupBounds):
        return b
    if isinstance(b, dict):
        unknown = set(b) - {"min_ratio", "max_ratio", "divisor"}
        if unknown:
            raise ValueError(f"{where}unknown bound key(s) {sorted(unknown)}; use min_ratio, max_ratio, divisor")
        try:
            return GroupBounds(**b)
        except ValueError as exc:
            raise ValueError(f"{where}{exc}") from None
    raise TypeError(f"{where}bounds must be a GroupBounds or a dict, got {type(b).__name__}")


def _matches(name: str, pattern: str) -> bool:
    return name == pattern or name.startswith(pattern + ".") or fnmatch.fnmatchcase(name, pattern)


def _check_patterns(what: str, patterns: Iterable[str], names: list[str]) -> None:
    """Refuse patterns that match none of ``names``, suggesting near misses."""
    bad = [p for p in patterns if not any(_matches(n, p) for n in names)]
    if bad:
        hints = {p: difflib.get_close_matches(p, names, 3) for p in bad}
        txt = "; ".join(f"{p!r}" + (f" (did you mean {', '.join(map(repr, h))}?)" if h else "")
                        for p, h in hints.items())
        raise ValueError(f"{what}: {txt} match(es) nothing in this model")


def _check_inputs(example_inputs: tuple, example_kwargs: dict) -> None:
    for where, t in [(f"example_inputs[{i}]", v) for i, v in enumerate(example_inputs)] + \
            [(f"example_kwargs[{k!r}]", v) for k, v in example_kwargs.items()]:
        if isinstance(t, torch.Tensor) and t.numel() == 0:
            raise ValueError(f"{where} is empty (shape {tuple(t.shape)}): the example batch needs at least one sample")


class DMS:
    """Differentiable Model Scaling of any ``nn.Module``: masks in, resource loss, export out.

    Usage::

        dms = DMS(model, example_inputs=(x,), target=Target(flops=0.5), total_steps=2000)
        loss = dms.loss(task_loss); loss.backward(); opt.step(); dms.step()
        small = dms.export()          # lands within 1% below the budget (dms.summary() shows how)

    Options are the fields of ``DMSConfig``: pass ``config=DMSConfig(...)`` and/or keyword arguments
    (keywords override the config's fields); ``target`` and ``total_steps`` may be positional.
    """

    def __init__(self, model: nn.Module, example_inputs: tuple | torch.Tensor, target: Target | None = None,
                 total_steps: int | None = None, *, config: DMSConfig | None = None,
                 example_kwargs: dict | None = None, **options: Any) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        _dist.refuse_sharded(model)  # FSDP2: build DMS first, then fully_shard (dmscale.distributed)
        if config is None:
            config = DMSConfig()
        elif not isinstance(config, DMSConfig):
            raise TypeError(f"config must be a dmscale.DMSConfig, got {type(config).__name__}")
        unknown = [k for k in options if k not in _CONFIG_FIELDS]
        if unknown:
            hints = {k: difflib.get_close_matches(k, _CONFIG_FIELDS, 1) for k in unknown}
            raise TypeError("DMS got unknown option(s) " + ", ".join(
                f"{k!r}" + (f" (did you mean {h[0]!r}?)" if h else "") for k, h in hints.items()))
        if target is not None:
            options["target"] = target
        if total_steps is not None:
            options["total_steps"] = total_steps
        cfg = dataclasses.replace(config, **options) if options else config
        if cfg.target is None:
            raise TypeError("DMS needs a target: DMS(model, x, Target(flops=0.5), total_steps=...) or "
                            "config=DMSConfig(target=...)")
        if cfg.total_steps is None:
            raise TypeError("DMS needs total_steps (the number of search steps)")
        self.config = cfg
        if isinstance(example_inputs, torch.Tensor):
            example_inputs = (example_inputs,)
        if not isinstance(example_inputs, (tuple, list)):
            raise TypeError("example_inputs must be a tuple of the model's positional inputs")
        if example_kwargs is not None and not isinstance(example_kwargs, dict):
            raise TypeError(f"example_kwargs must be a dict, got {type(example_kwargs).__name__}")
        _check_inputs(tuple(example_inputs), dict(example_kwargs or {}))
        module_names = [n for n, _ in model.named_modules() if n]
        _check_patterns("exclude", cfg.exclude, module_names)
        self.model = model
        self.model_class = type(model)  # parametrizations swap the class while masks are in
        self.example_inputs = tuple(example_inputs)
        self.example_kwargs = dict(example_kwargs or {})
        self.target = cfg.target
        self.schedule = Schedule(cfg.total_steps, cfg.decay_fraction)
        self.resource_weight = cfg.resource_weight
        self.adaptive_weight = cfg.adaptive_weight
        self.weight = self.resource_weight  # current (adaptive) weight of the resource loss
        try:
            self.trace = trace(model, self.example_inputs, self.example_kwargs, cfg.depth_containers,
                               cfg.depth_blocks)
        except (TraceError, ValueError):
            raise
        except Exception as exc:
            raise TraceError(f"running the model on example_inputs failed while tracing: {exc}") from exc
        default = GroupBounds(min_ratio=cfg.min_ratio, divisor=cfg.divisor)
        bounds = dict(cfg.bounds or {})
        self.groups = build_search_space(
            self.trace, exclude=cfg.exclude, bounds=bounds, default_bounds=default, prune_width=cfg.prune_width,
            prune_heads=cfg.prune_heads, prune_head_dim=cfg.prune_head_dim, prune_depth=cfg.prune_depth)
        if not self.groups:
            raise ValueError("no prunable group found in the model: every dimension is an input/output or "
                             "fixed by an unsupported op" + self._unsupported_text())
        if bounds:
            names = [g.name for g in self.groups]
            _check_patterns("bounds", bounds, names + [n.rsplit("[", 1)[0].rstrip("'") for n in names])
        p0 = next(iter(model.parameters()), None)
        self.space = SearchSpace(self.groups, device=p0.device if p0 is not None else None)
        self.masker = Masker(model, self.trace, self.space, self.groups)
        l1 = {}
        if cfg.importance == "l1":
            l1 = self._l1_sources()
        self.importance = ImportanceTracker(self.space, cfg.importance, cfg.importance_decay, l1)
        self.masker.on_mask = self.importance.attach
        self.masker.fold = cfg.fold_masks
        self.resources = Resources(self.trace, self.masker, self.groups, model)  # before masks rename params
        install_checked(self.masker, self.example_inputs, self.example_kwargs)  # full masks == the model
        try:
            self.step_count = 0
            self.nonfinite_steps = 0
            self._skipped_seen = 0
            self._scaler: Any = None
            self._last_scale: float | None = None
            self.last: dict[str, float] = {}
            self._refine_started = False
            self.projections: list[tuple[str, Projection]] = []  # (when, what) for every projection made
            self.recoveries = 0  # times the search fell recover_below under its current target and was lifted
            self.last_recovery: Projection | None = None
            self.latency_model: Any = None
            self.latency_scale = 1.0  # measured / predicted latency at the last landed structure (land_measured)
            self.latency_checks: list[dict[str, Any]] = []  # every export timed to land the latency target
            if self.target.kind == "latency":
                self.latency_model = build_latency_model(self)
                self.resources.attach_latency(self.latency_model)
            kind = self.target.kind
            if self.resources.full[kind] <= 0:
                raise ValueError(f"the model has no {kind} on example_inputs (0 counted): use another Target")
            lo = self.resources.minimum(kind) / self.resources.full[kind]
            if self.target_fraction < lo - 1e-9:
                raise ValueError(f"target {self._target_text()} is below what the minimum widths allow "
                                 f"({lo:.4f} of the supernet); lower min_ratio/divisor or raise the target")
            if cfg.warn and self.trace.lost:
                warnings.warn("dmscale: these dimensions could be searched but are fixed (an op with no channel rule, "
                              "or what the model does with them):" + self.trace.lost_text(), stacklevel=2)
            self.importance.refresh_l1()
            self.distributed = False
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                self._setup_distributed()
            self._snapshot()
        except BaseException:
            self.masker.remove()  # the user's model is left as it was
            raise

    @property
    def target_fraction(self) -> float:
        """The budget as a fraction of the supernet's resource (a latency target over the predicted latency)."""
        if self.target.kind != "latency":
            return self.target.fraction
        frac = float(self.target.latency) / self.resources.full["latency"]
        if frac > 1.0 + 1e-9:
            raise ValueError(f"Target(latency={self.target.latency:.6g}) is above the supernet's own predicted "
                             f"latency {self.resources.full['latency']:.6g} s on {self.latency_model.device}: "
                             "nothing to prune")
        return min(frac / self.latency_scale, 1.0)  # the model corrected by what the exports measured

    def _target_text(self) -> str:
        if self.target.kind == "latency":
            return f"latency={self.target.latency:.6g} s ({self.target_fraction:.4f} of the supernet)"
        return f"{self.target.kind}={self.target.fraction}"

    # ------------------------------------------------------------------ distributed / AMP
    def _setup_distributed(self) -> None:
        """Under torch.distributed: average mask gradients (importance) and ratio gradients over ranks.

        Every rank then holds identical importance and ratios, equal to a single process on the
        global batch; the ratios start equal (deterministic init) and get identical updates.
        """
        import torch.distributed as dist

        world = dist.get_world_size()

        def mean(t: torch.Tensor) -> torch.Tensor:
            t = t.clone()
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
            return t / world

        self.importance.reducer = mean
        for p in self.structure_parameters():
            p.register_hook(mean)
        self.distributed = True
        self._skeleton = _dist.take_skeleton(self)  # meta copy: the sharded export fills it (FSDP2)

    def attach_grad_scaler(self, scaler: Any) -> None:
        """Use with fp16 ``torch.amp.GradScaler``: importance is computed from unscaled gradients."""
        self.importance.grad_scale = scaler.get_scale
        self._scaler = scaler
        self._last_scale = float(scaler.get_scale())

    # ------------------------------------------------------------------ parameters
    def weight_parameters(self) -> list[nn.Parameter]:
        """The model's own parameters (for the weight optimizer group)."""
        seen: set[int] = set()
        out = []
        for p in self.model.parameters():
            if id(p) not in seen and p.requires_grad:
                seen.add(id(p))
                out.append(p)
        return out

    def structure_parameters(self) -> list[nn.Parameter]:
        """The kept-ratio parameters (own optimizer group, no weight decay)."""
        return list(self.space.ratios.values())

    # ------------------------------------------------------------------ training
    def current_target(self) -> float:
        """Target fraction of the supernet resource at the current step."""
        return self.schedule.target(self.step_count, self.target_fraction)

    def resource(self, soft: bool = True) -> dict[str, Any]:
        """Current resources of the masked supernet, absolute and as fractions ('flops_frac', 'params_frac',
        and 'latency' / 'latency_frac' under a latency target)."""
        r = self.resources.evaluate(soft=soft)
        full = self.resources.full
        for k in self.resources.kinds():
            r[f"{k}_frac"] = r[k] / full[k]
        return r

    def resource_loss(self) -> torch.Tensor:
        """One-sided log loss ``log(R / R_target)`` when above target, else 0."""
        r = self.resource(soft=True)[f"{self.target.kind}_frac"]
        if not isinstance(r, torch.Tensor):
            r = torch.tensor(float(r))
        tgt = self.current_target()
        self.last = {"resource": float(r.detach()), "target": tgt}
        if float(r.detach()) > tgt:
            return torch.log(r / tgt)
        return r * 0.0

    def loss(self, task_loss: torch.Tensor) -> torch.Tensor:
        """Task loss plus the weighted resource loss on the current target."""
        if not isinstance(task_loss, torch.Tensor):
            raise TypeError("dms.loss(task_loss): task_loss must be the task's scalar loss tensor, got "
                            f"{type(task_loss).__name__} {task_loss!r}"[:200])
        if task_loss.numel() != 1:
            raise ValueError(f"dms.loss(task_loss): task_loss must be a scalar, got shape {tuple(task_loss.shape)} "
                             "(reduce it, e.g. .mean())")
        res = self.resource_loss()  # float64 (exact hard counts); the loss keeps the task's precision (>= float32)
        res = res.to(task_loss.device, torch.promote_types(task_loss.dtype, torch.float32))
        self.last["task_loss"] = float(task_loss.detach())
        self.last["resource_loss"] = float(res.detach())
        self.last["resource_weight"] = self.weight
        return task_loss.reshape(()) + self.weight * res

    @torch.no_grad()
    def step(self) -> None:
        """Advance the schedule by one step: clamp ratios. When the refine phase starts: land on the budget
        (``config.project_refine``), then freeze depth and attention heads (as the official code does)."""
        for p in self.structure_parameters():
            if not bool(torch.isfinite(p).all()):
                raise FloatingPointError("a structure ratio became non-finite; lower the structure learning rate "
                                         "(with fp16 put the structure parameters in the GradScaler's optimizer)")
        if self._nonfinite_this_step():
            self.nonfinite_steps += 1  # inf/nan loss or gradients (e.g. fp16 overflow): counted, reported
        self.space.clamp_()
        self._adapt_weight()
        self.step_count += 1
        if self.schedule.refining(self.step_count) and not self._refine_started:
            if self.config.project_refine:
                self.land(when="refine", warn=False)
            self._refine_started = True
            self._freeze_refined()
        elif self.config.recover_below and "resource" in self.last:
            self._recover()
        self.importance.refresh_l1()
        self._snapshot()

    def _recover(self) -> None:
        """Widths back up to the current target when the search fell far below it.

        The paper's resource loss is zero below the target, so nothing pulls the ratios back: momentum
        (SGD or Adam) and a task loss that does not resist pruning carry them down, and a layer can
        collapse to one channel. The last step's resource (its forward value is the exact hard
        count) decides; the projection moves the free width groups only.
        """
        tgt = self.current_target()
        if self.last["resource"] >= tgt * (1.0 - self.config.recover_below):
            return
        p = budget.project(self, tgt, warn=False, fallback=False, tolerance=self.config.tolerance)
        self.recoveries += 1
        self.last_recovery = p

    def _freeze_refined(self) -> None:
        """Depth and heads are fixed in the refine phase; the widths keep learning."""
        for g in self.groups:
            if g.kind in ("depth", "heads"):
                self.space.ratio(g).requires_grad_(not self._refine_started)
                if self._refine_started:
                    self.space.ratio(g).grad = None

    def project(self, fraction: float | None = None, *, when: str = "manual", warn: bool = True,
                **kwargs: Any) -> Projection:
        """Land the hard resource within ``config.tolerance`` below the target (``budget.project``).

        The projection is recorded (``dms.projections``, shown by ``summary()``)."""
        kwargs.setdefault("tolerance", self.config.tolerance)
        p = budget.project(self, fraction, warn=warn, **kwargs)
        self.projections.append((when, p))
        self._snapshot()
        return p

    def _snapshot(self) -> None:
        self._ratio_snapshot = [p.detach().clone() for p in self.structure_parameters()]

    def _ratios_as_left(self) -> bool:
        """True when the ratios are those the search (or a projection) left: nobody set them by hand."""
        return all(torch.equal(a.detach(), b) for a, b in zip(self.structure_parameters(), self._ratio_snapshot))

    def _nonfinite_this_step(self) -> bool:
        """Inf/nan task loss, a skipped importance update, inf/nan ratio gradients or a GradScaler backoff."""
        bad = "task_loss" in self.last and not math.isfinite(self.last["task_loss"])
        bad = bad or self.importance.skipped > self._skipped_seen
        self._skipped_seen = self.importance.skipped
        bad = bad or any(p.grad is not None and not bool(torch.isfinite(p.grad).all())
                         for p in self.structure_parameters())
        if self._scaler is not None:  # GradScaler lowers its scale only after a step it skipped for inf/nan
            scale = float(self._scaler.get_scale())
            bad = bad or (self._last_scale is not None and scale < self._last_scale)
            self._last_scale = scale
        return bad

    def _adapt_weight(self) -> None:
        """Multiplier update of the resource weight: ``w <- max(w0, w * exp(rate * (R / R_target - 1)))``, at most
        ``MAX_WEIGHT_FACTOR * w0``.

        The one-sided log loss pushes with a constant force, so a task loss that resists pruning
        (frozen, trained weights) can hold the resource above target for good. Growing the weight
        in proportion to the violation (and shrinking it in proportion to the slack, never below
        ``resource_weight``) is a dual-ascent step: the target is reached without overshooting.
        """
        if not self.adaptive_weight or "resource" not in self.last:
            return
        rel = self.last["resource"] / max(self.last["target"], 1e-12) - 1.0
        w = self.weight * math.exp(self.adaptive_weight * max(-1.0, min(1.0, rel)))
        # capped: while the hard resource cannot move (a structure stuck above target) the weight would grow by
        # ~e per step and weight x loss overflow float32 within ~100 steps
        self.weight = min(max(self.resource_weight, w), self.resource_weight * MAX_WEIGHT_FACTOR)

    @property
    def refining(self) -> bool:
        """True once the target is reached and depth (and heads) are frozen."""
        return self._refine_started

    # ------------------------------------------------------------------ modes
    @contextlib.contextmanager
    def hard(self) -> Iterator[None]:
        """Run the supernet with hard masks: computes exactly what ``export()`` will."""
        with self.masker.use_mode("hard"):
            yield

    @contextlib.contextmanager
    def unmasked(self) -> Iterator[None]:
        """Run the supernet with masks switched off (the full model)."""
        with self.masker.use_mode("off"):
            yield

    def remove(self) -> nn.Module:
        """Take all masks out of the model; returns the original (full-size) model."""
        self.masker.remove()
        return self.model

    # ------------------------------------------------------------------ results
    def kept(self) -> dict[str, tuple[int, int]]:
        """Group name -> (full size, kept size) under the hard masks."""
        out = {}
        with torch.no_grad():
            for g in self.groups:
                out[g.name] = (g.size, int(self.space.keep(g).sum()))
        return out

    def export(self, check: bool = True, atol: float = 1e-4, rtol: float = 1e-4,
               project: bool | None = None) -> nn.Module:
        """A physically smaller copy of the model (same classes) that computes the hard-masked supernet.

        ``project``: land on the budget first (``budget.project``; the ratios change in place, so
        ``dms.hard()`` computes the export afterwards). The default (None) projects when
        ``config.project_export`` is on and the ratios are those the search left; ratios set by hand
        after the last ``step()`` (one-shot pruning, fixed architectures) are exported as they are.
        """
        if _dist.is_sharded(self.model):  # FSDP2: collective, every rank gets the model (dmscale.distributed)
            return _dist.export(self, check=check, atol=atol, rtol=rtol, project=project)
        if project is None:
            project = self.config.project_export and self._ratios_as_left()
        if project:
            self.land(when="export")
        return export_model(self, check=check, atol=atol, rtol=rtol)

    def land(self, when: str = "export", warn: bool = True) -> Projection:
        """Land on the budget as the refine start and ``export()`` do: a latency target on the *measured*
        latency of the export (``latency.land_measured``, while ``config.latency_checks`` > 0), every other
        target on the exact count (``project``). Recorded in ``dms.projections``."""
        if self.target.kind == "latency" and self.config.latency_checks and not _dist.is_sharded(self.model):
            p = land_measured(self, when)
            self.projections.append((when, p))
            self._snapshot()
            return p
        return self.project(when=when, warn=warn)

    def summary(self) -> str:
        """Table: each group, full width -> kept width, depth per stage; resources, target and projections."""
        rows = [("group", "kind", "full", "kept", "ratio")]
        kept_all = self.kept()
        for g in self.groups:
            full, kept = kept_all[g.name]
            rows.append((g.name, g.kind, str(full), str(kept), f"{kept / full:.2f}"))
        with torch.no_grad():
            r = self.resource(soft=False)
        w = [max(len(r_[i]) for r_ in rows) for i in range(5)]
        lines = ["  ".join(c.ljust(w[i]) for i, c in enumerate(row)) for row in rows]
        lines.insert(1, "  ".join("-" * x for x in w))
        full = self.resources.full
        lines.append("")
        lines.append(f"FLOPs  {_human(full['flops'])} -> {_human(float(r['flops']))} "
                     f"({float(r['flops_frac']):.3f} of supernet)")
        lines.append(f"params {_human(full['params'])} -> {_human(float(r['params']))} "
                     f"({float(r['params_frac']):.3f} of supernet)")
        if "latency" in full:
            lines.append(f"latency {full['latency'] * 1e3:.3f} ms -> {float(r['latency']) * 1e3:.3f} ms predicted "
                         f"({float(r['latency_frac']):.3f} of supernet) on {self.latency_model.device}, "
                         f"batch {self.latency_model.batch_size}")
        kind = self.target.kind
        got = float(r[f"{kind}_frac"])
        tgt = self.target_fraction
        lines.append(f"target {self._target_text()}; achieved {got:.4f} of the supernet ({got / tgt - 1:+.2%} of "
                     f"target); step {self.step_count}/{self.schedule.total_steps}")
        if self.recoveries:
            lines.append(f"the search fell more than {self.config.recover_below:.0%} below its current target "
                         f"{self.recoveries} time(s); the widths were projected back up each time")
        for c in self.latency_checks:
            lines.append(f"latency check at {c['when']} #{c['check']}: export measured {c['measured_s'] * 1e3:.3f} ms "
                         f"for a target of {c['target_s'] * 1e3:.3f} ms ({c['measured_s'] / c['target_s'] - 1:+.1%}; "
                         f"the model predicted {c['predicted_s'] * 1e3:.3f} ms)" + (", kept" if c.get("kept") else ""))
        for when, p in self.projections:
            lines.append(f"projection at {when}: {p.before:.4f} -> {p.after:.4f} (resource moved {p.moved:+.2%}; "
                         f"{len(p.changes)} group(s) changed, mean width shift {p.shift:.1%}, offset {p.offset:+.4f}, "
                         f"{p.fine_steps} fine step(s)" + ("" if p.tier == "width" else f", moved {p.tier} too")
                         + ("" if p.ok else "; NOT within tolerance: search space too coarse") + ")")
        if self.trace.lost:
            lines.append("not searched (fixed):" + self.trace.lost_text())
        return "\n".join(lines)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """Everything the search needs to resume: ratios, importance, step, schedule flags."""
        return {
            "space": {k: v.detach().clone() for k, v in self.space.state_dict().items()},
            "step": self.step_count,
            "weight": self.weight,
            "last": dict(self.last),
            "refine_started": self._refine_started,
            "target": {"kind": self.target.kind, "fraction": self.target_fraction},
            "groups": [g.name for g in self.groups],
            "importance_skipped": self.importance.skipped,
            "nonfinite_steps": self.nonfinite_steps,
            "projections": [(when, dataclasses.asdict(p)) for when, p in self.projections],
            "recoveries": self.recoveries,
            "latency_scale": self.latency_scale,
            "latency_checks": [dict(c) for c in self.latency_checks],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a search state saved by ``state_dict`` (the group list must match)."""
        names = [g.name for g in self.groups]
        if list(state.get("groups", [])) != names:
            raise ValueError("search state does not match this model's groups: "
                             f"saved {len(state.get('groups', []))} groups, model has {len(names)}")
        self.space.load_state_dict(state["space"])
        self.step_count = int(state["step"])
        self.weight = float(state.get("weight", self.resource_weight))
        self.last = dict(state.get("last", {}))
        self._refine_started = bool(state["refine_started"])
        self.importance.skipped = int(state.get("importance_skipped", 0))
        self._skipped_seen = self.importance.skipped
        self.nonfinite_steps = int(state.get("nonfinite_steps", 0))
        self.projections = [(str(w), Projection(**p)) for w, p in state.get("projections", [])]
        self.recoveries = int(state.get("recoveries", 0))
        self.latency_scale = float(state.get("latency_scale", 1.0))
        self.latency_checks = [dict(c) for c in state.get("latency_checks", [])]
        self._freeze_refined()
        self._snapshot()

    # ------------------------------------------------------------------ helpers
    def _unsupported_text(self) -> str:
        return "".join(f"\n  {op} (in {', '.join(m or 'model' for m in mods[:3])})"
                       for op, mods in self.trace.unsupported.items())

    def _l1_sources(self) -> dict[str, list[tuple[torch.Tensor, int, torch.Tensor | None]]]:
        """For L1 importance: (parameter, dim, flat index -> group element or -1) for every weight slice."""
        mods = dict(self.model.named_modules())
        out: dict[str, list[tuple[torch.Tensor, int, torch.Tensor | None]]] = {}
        for g in self.groups:
            if g.space is None:
                continue
            leaf = g.space.find()
            for rec in self.trace.params.values():
                if rec.is_buffer:
                    continue
                for d, s in enumerate(rec.dims):
                    if s.find() is leaf:
                        out.setdefault(g.key, []).append((getattr(mods[rec.module], rec.attr), d, None))
                    elif any(x is leaf for x in s.leaves()):
                        idx = leaf_index(s, leaf)
                        out.setdefault(g.key, []).append((getattr(mods[rec.module], rec.attr), d, idx))
        return out


def _human(x: float) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(x) >= div:
            return f"{x / div:.2f}{unit}"
    return f"{x:.0f}"
