"""Resource target schedule and search phases (decay to the target, then refine with depth frozen)."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any

__all__ = ["Target", "Schedule", "check_int", "check_float"]


def check_int(name: str, value: Any, lo: int | None = None, hi: int | None = None) -> int:
    """``value`` as an int, or a ValueError naming ``name``: booleans and floats (even 2.0) are refused."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    v = int(value)
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        rng = f">= {lo}" if hi is None else (f"<= {hi}" if lo is None else f"in [{lo}, {hi}]")
        raise ValueError(f"{name} must be {rng}, got {v}")
    return v


def check_float(name: str, value: Any, lo: float | None = None, hi: float | None = None, *,
                lo_open: bool = False, hi_open: bool = False) -> float:
    """``value`` as a finite float inside the given range, or a ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a number, got {value!r}")
    v = float(value)
    bad = not math.isfinite(v)
    if lo is not None:
        bad = bad or (v <= lo if lo_open else v < lo)
    if hi is not None:
        bad = bad or (v >= hi if hi_open else v > hi)
    if bad:
        left = "(" if lo_open else "["
        right = ")" if hi_open else "]"
        rng = f"{left}{'-inf' if lo is None else lo}, {'inf' if hi is None else hi}{right}"
        raise ValueError(f"{name} must be a finite number in {rng}, got {value!r}")
    return v


@dataclass(frozen=True)
class Target:
    """Resource budget: exactly one of ``flops`` or ``params`` (fractions of the supernet) or ``latency``.

    ``latency`` is absolute, in seconds per forward of a batch of ``batch_size`` (default: the
    example batch) on ``device`` (default: where the model is); ``DMS`` measures the searchable
    layers there and turns the target into a fraction of the supernet's predicted latency
    (``dms.target_fraction``).
    """

    flops: float | None = None
    params: float | None = None
    latency: float | None = None
    device: str | None = None
    batch_size: int | None = None

    def __post_init__(self) -> None:
        given = [(k, v) for k, v in (("flops", self.flops), ("params", self.params), ("latency", self.latency))
                 if v is not None]
        if len(given) != 1:
            raise ValueError("Target needs exactly one of flops=... or params=... (a fraction of the supernet) "
                             "or latency=... (seconds)")
        k, v = given[0]
        if k == "latency":
            if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(float(v)) or float(v) <= 0:
                raise ValueError(f"Target latency={v!r} must be a positive, finite number of seconds")
            if self.device is not None:
                import torch

                try:
                    object.__setattr__(self, "device", str(torch.device(self.device)))
                except (RuntimeError, TypeError) as exc:
                    raise ValueError(f"Target device={self.device!r} is not a torch device: {exc}") from None
            if self.batch_size is not None:
                object.__setattr__(self, "batch_size", check_int("Target batch_size", self.batch_size, 1))
        else:
            if isinstance(v, bool) or not isinstance(v, numbers.Real) or not 0.0 < float(v) <= 1.0:
                raise ValueError(f"Target {k}={v!r} must be a fraction in (0, 1] of the supernet's {k}")
            for extra in ("device", "batch_size"):
                if getattr(self, extra) is not None:
                    raise ValueError(f"Target {extra}= applies to latency targets only, not to {k}")

    @property
    def kind(self) -> str:
        """'flops', 'params' or 'latency'."""
        return "flops" if self.flops is not None else ("params" if self.params is not None else "latency")

    @property
    def fraction(self) -> float:
        """The final budget as a fraction of the supernet (flops/params targets; see ``DMS.target_fraction``)."""
        if self.latency is not None:
            raise ValueError("a latency target is absolute (seconds); its fraction of the supernet is known once "
                             "the layers are measured: use dms.target_fraction")
        return float(self.flops if self.flops is not None else self.params)


@dataclass
class Schedule:
    """``target(t) = final ** min(t / T_decay, 1)`` (as a fraction), refine phase after ``T_decay``."""

    total_steps: int
    decay_fraction: float = 0.8

    def __post_init__(self) -> None:
        self.total_steps = check_int("total_steps", self.total_steps, 1)
        self.decay_fraction = check_float("decay_fraction", self.decay_fraction, 0.0, 1.0, lo_open=True)

    @property
    def decay_steps(self) -> int:
        """Step at which the target is reached."""
        return max(1, int(round(self.total_steps * self.decay_fraction)))

    def target(self, step: int, final: float) -> float:
        """Target fraction of the supernet resource at a step."""
        return float(final) ** min(step / self.decay_steps, 1.0)

    def refining(self, step: int) -> bool:
        """True in the refine phase (depth frozen)."""
        return step >= self.decay_steps
