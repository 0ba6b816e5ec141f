"""Resource target schedule and search phases (decay to the target, then refine with depth frozen)."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Target", "Schedule"]


@dataclass(frozen=True)
class Target:
    """Resource budget as a fraction of the supernet: exactly one of ``flops`` or ``params``."""

    flops: float | None = None
    params: float | None = None

    def __post_init__(self) -> None:
        given = [(k, v) for k, v in (("flops", self.flops), ("params", self.params)) if v is not None]
        if len(given) != 1:
            raise ValueError("Target needs exactly one of flops=... or params=... (a fraction of the supernet)")
        k, v = given[0]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 < float(v) <= 1.0:
            raise ValueError(f"Target {k}={v!r} must be a fraction in (0, 1] of the supernet's {k}")

    @property
    def kind(self) -> str:
        """'flops' or 'params'."""
        return "flops" if self.flops is not None else "params"

    @property
    def fraction(self) -> float:
        """The final budget as a fraction of the supernet."""
        return float(self.flops if self.flops is not None else self.params)


@dataclass
class Schedule:
    """``target(t) = final ** min(t / T_decay, 1)`` (as a fraction), refine phase after ``T_decay``."""

    total_steps: int
    decay_fraction: float = 0.8

    def __post_init__(self) -> None:
        if int(self.total_steps) < 1:
            raise ValueError(f"total_steps must be >= 1, got {self.total_steps}")
        if not 0.0 < self.decay_fraction <= 1.0:
            raise ValueError(f"decay_fraction must be in (0, 1], got {self.decay_fraction}")

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
