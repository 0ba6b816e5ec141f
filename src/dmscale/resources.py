"""Differentiable resource accounting (FLOPs, params, latency) from the masks, and exact counting of a model.

FLOPs follow ``torch.utils.flop_counter``: 2 FLOPs per multiply-add, matmul-like ops only
(linear, conv, matmul/bmm, attention); norms, activations and additions count 0. Every traced
op's FLOPs at full size are scaled by the kept fraction of each dimension it runs over, so the
count is exact for the exported network. Kept counts are straight-through: the forward value
is the hard count (what export keeps), the gradient is that of the soft mask's sum. Resources are
computed in float64, so the hard value equals the projection's exact count (``budget.within_budget``
compares it with the target with a relative slack of 1e-9, for summation order only).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

from .masking import Masker
from .space import Group
from .trace.flops import FLOP_FORMULAS
from .trace.tracer import Space, TraceResult

__all__ = ["Resources", "count"]


def count(model: nn.Module, example_inputs: tuple, example_kwargs: dict | None = None) -> dict[str, float]:
    """Exact FLOPs (``FlopCounterMode``, 2 per multiply-add) of one forward, and the parameter count."""
    example_kwargs = example_kwargs or {}
    was = model.training
    model.eval()
    # FlopCounterMode's module tracker hooks the backward of every module input that requires grad: a view
    # of a parameter taken under no_grad (DeBERTa's relative embedding table, sliced and passed to a
    # projection) requires grad but has no graph, and the hook fails. Nothing here needs gradients.
    grads = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in grads:
            p.requires_grad_(False)
        with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=FLOP_FORMULAS) as fc:  # + fused RNN/MHA
            model(*example_inputs, **example_kwargs)
    finally:
        for p, req in grads:
            p.requires_grad_(req)
        model.train(was)
    seen: set[int] = set()
    params = 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            params += p.numel()
    return {"flops": float(fc.get_total_flops()), "params": float(params)}


def _f64_device(t: torch.Tensor) -> torch.device:
    """Where float64 resource counts of ``t``'s group live: its device, or the CPU for MPS (no float64)."""
    return t.device if t.device.type != "mps" else torch.device("cpu")


class Resources:
    """FLOPs and params of the masked supernet as differentiable functions of the ratios."""

    def __init__(self, tr: TraceResult, masker: Masker, groups: list[Group], model: nn.Module) -> None:
        self.tr = tr
        self.masker = masker
        self.groups = groups
        removable = {b.name for g in groups for b in g.blocks}
        self.removable = removable
        self.op_terms: list[tuple[float, list[Space], list[str]]] = []
        counted = 0.0
        for op in tr.ops:
            blocks = [b for b in op.blocks if b in removable]
            self.op_terms.append((op.flops, list(op.dims), blocks))
            counted += op.flops
        self.flops_const = max(0.0, tr.total_flops - counted)  # ops the tracer saw but could not scale
        self.param_terms: list[tuple[float, list[Space], list[str]]] = []
        seen_names = set()
        for rec in tr.params.values():
            if rec.is_buffer:
                continue
            seen_names.add(rec.name)
            blocks = [b for b in rec.blocks if b in removable]
            numel = 1
            for s in rec.dims:
                numel *= s.find().size
            self.param_terms.append((float(numel), list(rec.dims), blocks))
        # parameters the forward never touched still count (and are kept by export)
        seen_ids = set()
        other = 0
        names = {}
        for mname, mod in model.named_modules():
            for pname, p in mod.named_parameters(recurse=False):
                names.setdefault(id(p), f"{mname}.{pname}" if mname else pname)
        for p in model.parameters():
            if id(p) in seen_ids:
                continue
            seen_ids.add(id(p))
            if names.get(id(p)) not in seen_names:
                other += p.numel()
        self.params_const = float(other)
        self.latency: Any = None  # a dmscale.latency.LatencyModel once a latency target is measured
        self.full = {"flops": tr.total_flops, "params": self.evaluate(hard_full=True)["params"]}

    def attach_latency(self, model: Any) -> None:
        """Use ``model`` (``value(frac, gates)``) as the latency resource; sets ``full['latency']``."""
        self.latency = model
        self.full["latency"] = float(self.evaluate(hard_full=True)["latency"])

    # --------------------------------------------------------------- evaluation
    def _frac(self, s: Space, kept: dict[int, torch.Tensor], cache: dict[int, Any]) -> Any:
        root = s.find()
        if id(root) in cache:
            return cache[id(root)]
        if root.kind == "atomic":
            g = self.masker.leaf_group.get(id(root))
            val = 1.0 if g is None else kept[g.index]
        elif root.kind == "product":
            val = 1.0
            for c in root.children:
                val = val * self._frac(c, kept, cache)
        else:
            tot = 0.0
            for c in root.children:
                tot = tot + self._frac(c, kept, cache) * c.find().size
            val = tot / root.size
        cache[id(root)] = val
        return val

    def kept_fractions(self, *, hard_full: bool = False, soft: bool = True) -> tuple[dict[int, Any], dict[str, Any]]:
        """Kept fraction per group (straight-through) and depth gate per removable block."""
        kept: dict[int, Any] = {}
        gates: dict[str, Any] = {}
        sp = self.masker.space
        for g in self.groups:
            m = None if hard_full else sp.soft_mask(g)
            if g.kind == "depth":
                # float64 like the widths: the hard value is exact (budget.within_budget compares it to 1e-9)
                dev = None if m is None else _f64_device(m)
                keep = None if m is None else sp.keep(g, m).to(dev, torch.float64)  # once per group, not per block
                for i, b in enumerate(g.blocks):
                    if m is None:
                        gates[b.name] = 1.0
                    else:
                        gates[b.name] = keep[i] + (m[i] - m[i].detach()).to(dev, torch.float64) if soft else keep[i]
            else:
                if m is None:
                    kept[g.index] = 1.0
                else:  # float64: the hard count's fraction is exact (compared with the target to 1e-9)
                    dev = _f64_device(m)
                    hard = torch.tensor(float(g.hard_count(m)), dtype=torch.float64, device=dev)
                    ste = hard + (m.sum() - m.sum().detach()).to(dev, torch.float64) if soft else hard
                    kept[g.index] = ste / g.size
        return kept, gates

    def _total(self, kind: str, kept: dict[int, Any], gates: dict[str, Any], cache: dict[int, Any]) -> Any:
        if kind == "latency":
            if self.latency is None:
                raise ValueError("no latency model: use Target(latency=...) to measure one")
            return self.latency.value(lambda s: self._frac(s, kept, cache), gates)
        terms = self.op_terms if kind == "flops" else self.param_terms
        total: Any = self.flops_const if kind == "flops" else self.params_const
        for coef, dims, blocks in terms:
            term: Any = coef
            for s in dims:
                term = term * self._frac(s, kept, cache)
            for b in blocks:
                term = term * gates[b]
            total = total + term
        return total

    def kinds(self) -> tuple[str, ...]:
        """The resources this object computes: flops, params (and latency once a model is attached)."""
        return ("flops", "params") + (("latency",) if self.latency is not None else ())

    def evaluate(self, *, hard_full: bool = False, soft: bool = True) -> dict[str, Any]:
        """Current FLOPs and params (and latency) (tensors with gradients to the ratios when soft=True)."""
        kept, gates = self.kept_fractions(hard_full=hard_full, soft=soft)
        cache: dict[int, Any] = {}
        return {k: self._total(k, kept, gates, cache) for k in self.kinds()}

    def value(self, kind: str, kept: dict[int, float], gates: dict[str, float]) -> float:
        """The resource for explicit kept fractions (group index -> fraction) and block gates (name -> 0/1)."""
        return float(self._total(kind, kept, gates, {}))

    def minimum(self, kind: str) -> float:
        """The resource with every group at its smallest allowed size (to reject impossible targets)."""
        kept: dict[int, Any] = {}
        gates: dict[str, Any] = {}
        for g in self.groups:
            c = g.min_count()
            if g.kind == "depth":
                for i, b in enumerate(g.blocks):
                    gates[b.name] = 1.0 if i >= g.size - c else 0.0
            else:
                kept[g.index] = c / g.size
        return self.value(kind, kept, gates)
