"""``DMS``: the public entry point that wraps a model for differentiable width/depth search."""

from __future__ import annotations

import contextlib
import math
import warnings
from typing import Any, Iterable, Iterator

import torch
import torch.nn as nn

from .importance import ImportanceTracker
from .masking import Masker, install_checked
from .resources import Resources
from .schedule import Schedule, Target
from .space import GroupBounds, SearchSpace, build_search_space
from .trace.tracer import TraceError, trace

__all__ = ["DMS"]


def _as_bounds(b: Any) -> GroupBounds:
    if isinstance(b, GroupBounds):
        return b
    if isinstance(b, dict):
        unknown = set(b) - {"min_ratio", "max_ratio", "divisor"}
        if unknown:
            raise ValueError(f"unknown bound key(s) {sorted(unknown)}; use min_ratio, max_ratio, divisor")
        return GroupBounds(**b)
    raise TypeError(f"bounds must be a GroupBounds or a dict, got {type(b).__name__}")


class DMS:
    """Differentiable Model Scaling of any ``nn.Module``: masks in, resource loss, export out.

    Usage::

        dms = DMS(model, example_inputs=(x,), target=Target(flops=0.5), total_steps=2000)
        loss = dms.loss(task_loss); loss.backward(); opt.step(); dms.step()
        small = dms.export()
    """

    def __init__(self, model: nn.Module, example_inputs: tuple | torch.Tensor, target: Target,
                 total_steps: int, *, example_kwargs: dict | None = None, importance: str = "taylor",
                 importance_decay: float = 0.99, resource_weight: float = 1.0, decay_fraction: float = 0.8,
                 exclude: Iterable[str] = (), bounds: dict[str, Any] | None = None, divisor: int = 1,
                 min_ratio: float = 0.0, prune_width: bool = True, prune_heads: bool = True,
                 prune_head_dim: bool = False, prune_depth: bool = True,
                 depth_containers: Iterable[str] | None = None,
                 depth_blocks: Iterable[Iterable[str]] | None = None, adaptive_weight: float = 1.0,
                 fold_masks: bool = True, warn: bool = True) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        if not isinstance(target, Target):
            raise TypeError("target must be dmscale.Target(flops=...) or Target(params=...)")
        if isinstance(example_inputs, torch.Tensor):
            example_inputs = (example_inputs,)
        if not isinstance(example_inputs, (tuple, list)):
            raise TypeError("example_inputs must be a tuple of the model's positional inputs")
        self.model = model
        self.model_class = type(model)  # parametrizations swap the class while masks are in
        self.example_inputs = tuple(example_inputs)
        self.example_kwargs = dict(example_kwargs or {})
        self.target = target
        self.schedule = Schedule(int(total_steps), decay_fraction)
        self.resource_weight = float(resource_weight)
        if self.resource_weight <= 0:
            raise ValueError(f"resource_weight must be positive, got {resource_weight}")
        if not 0.0 <= adaptive_weight <= 100.0:
            raise ValueError(f"adaptive_weight must be in [0, 100], got {adaptive_weight}")
        self.adaptive_weight = float(adaptive_weight)
        self.weight = self.resource_weight  # current (adaptive) weight of the resource loss
        try:
            self.trace = trace(model, self.example_inputs, self.example_kwargs, depth_containers, depth_blocks)
        except (TraceError, ValueError):
            raise
        except Exception as exc:
            raise TraceError(f"running the model on example_inputs failed while tracing: {exc}") from exc
        default = GroupBounds(min_ratio=min_ratio, divisor=divisor)
        self.groups = build_search_space(
            self.trace, exclude=exclude, bounds={k: _as_bounds(v) for k, v in (bounds or {}).items()},
            default_bounds=default, prune_width=prune_width, prune_heads=prune_heads,
            prune_head_dim=prune_head_dim, prune_depth=prune_depth)
        if not self.groups:
            raise ValueError("no prunable group found in the model: every dimension is an input/output or "
                             "fixed by an unsupported op" + self._unsupported_text())
        p0 = next(iter(model.parameters()), None)
        self.space = SearchSpace(self.groups, device=p0.device if p0 is not None else None)
        self.masker = Masker(model, self.trace, self.space, self.groups)
        l1 = {}
        if importance == "l1":
            l1 = self._l1_sources()
        self.importance = ImportanceTracker(self.space, importance, importance_decay, l1)
        self.masker.on_mask = self.importance.attach
        self.masker.fold = bool(fold_masks)
        self.resources = Resources(self.trace, self.masker, self.groups, model)  # before masks rename params
        install_checked(self.masker, self.example_inputs, self.example_kwargs)  # full masks == the model
        self.step_count = 0
        self.nonfinite_steps = 0
        self._skipped_seen = 0
        self._scaler: Any = None
        self._last_scale: float | None = None
        self.last: dict[str, float] = {}
        self._refine_started = False
        lo = self.resources.minimum(target.kind) / self.resources.full[target.kind]
        if target.fraction < lo - 1e-9:
            raise ValueError(f"target {target.kind}={target.fraction} is below what the minimum widths allow "
                             f"({lo:.4f} of the supernet); lower min_ratio/divisor or raise the target")
        if warn and self.trace.lost:
            warnings.warn("dmscale: these dimensions could be searched but are fixed (an op with no channel rule, "
                          "or what the model does with them):" + self.trace.lost_text(), stacklevel=2)
        self.importance.refresh_l1()
        self.distributed = False
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            self._setup_distributed()

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
        return self.schedule.target(self.step_count, self.target.fraction)

    def resource(self, soft: bool = True) -> dict[str, Any]:
        """Current FLOPs/params of the masked supernet (fractions under 'flops_frac', 'params_frac')."""
        r = self.resources.evaluate(soft=soft)
        full = self.resources.full
        r["flops_frac"] = r["flops"] / full["flops"]
        r["params_frac"] = r["params"] / full["params"]
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
        res = self.resource_loss().to(task_loss.device)
        self.last["task_loss"] = float(task_loss.detach())
        self.last["resource_loss"] = float(res.detach())
        self.last["resource_weight"] = self.weight
        return task_loss + self.weight * res

    @torch.no_grad()
    def step(self) -> None:
        """Advance the schedule by one step: clamp ratios; freeze depth in the refine phase."""
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
            self._refine_started = True
            for g in self.groups:
                if g.kind == "depth":
                    self.space.ratio(g).requires_grad_(False)
                    self.space.ratio(g).grad = None
        self.importance.refresh_l1()

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
        """Multiplier update of the resource weight: ``w <- max(w0, w * exp(rate * (R / R_target - 1)))``.

        The one-sided log loss pushes with a constant force, so a task loss that resists pruning
        (frozen, trained weights) can hold the resource above target for good. Growing the weight
        in proportion to the violation (and shrinking it in proportion to the slack, never below
        ``resource_weight``) is a dual-ascent step: the target is reached without overshooting.
        """
        if not self.adaptive_weight or "resource" not in self.last:
            return
        rel = self.last["resource"] / max(self.last["target"], 1e-12) - 1.0
        self.weight = max(self.resource_weight, self.weight * math.exp(self.adaptive_weight * max(-1.0, min(1.0, rel))))

    @property
    def refining(self) -> bool:
        """True once the target is reached and depth is frozen."""
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

    def export(self, check: bool = True, atol: float = 1e-4, rtol: float = 1e-4) -> nn.Module:
        """A physically smaller copy of the model (same classes) that computes the hard-masked supernet."""
        from .export import export_model

        return export_model(self, check=check, atol=atol, rtol=rtol)

    def summary(self) -> str:
        """Table: each group, full width -> kept width, depth per stage, and the resources."""
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
        lines.append(f"target {self.target.kind} {self.target.fraction:.3f}; step {self.step_count}/"
                     f"{self.schedule.total_steps}")
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
            "target": {"kind": self.target.kind, "fraction": self.target.fraction},
            "groups": [g.name for g in self.groups],
            "importance_skipped": self.importance.skipped,
            "nonfinite_steps": self.nonfinite_steps,
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
        for g in self.groups:
            if g.kind == "depth":
                self.space.ratio(g).requires_grad_(not self._refine_started)

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
                        idx = _leaf_index(s, leaf)
                        out.setdefault(g.key, []).append((getattr(mods[rec.module], rec.attr), d, idx))
        return out


def _leaf_index(space: Any, leaf: Any) -> torch.Tensor:
    """For each flat position of a composite space, the element of ``leaf`` it belongs to (-1: none)."""
    root = space.find()
    if root is leaf:
        return torch.arange(root.size)
    if root.kind == "atomic":
        return torch.full((root.size,), -1, dtype=torch.long)
    parts = [_leaf_index(c, leaf) for c in root.children]
    if root.kind == "concat":
        return torch.cat(parts)
    out = parts[0]
    for p in parts[1:]:  # row-major product: combine the (at most one) factor that holds the leaf
        out = torch.maximum(out[:, None].expand(-1, p.numel()), p[None, :].expand(out.numel(), -1)).reshape(-1)
    return out


def _human(x: float) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(x) >= div:
            return f"{x / div:.2f}{unit}"
    return f"{x:.0f}"
