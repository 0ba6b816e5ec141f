"""Shared helpers of the CLI tests: the tiny digits run, ``--set`` arguments from ``key=value`` lists, a
deterministic latency timer."""

from __future__ import annotations

import torch.nn as nn

# a CLI run of a few seconds: digits, a two-stage ResNet, a handful of steps per phase
TINY = ["data.name=digits", "data.limit_train=256", "data.limit_test=128", "data.batch_size=32",
        "data.eval_batch_size=128", "model.widths=[4,8]", "model.depths=[1,2]", "search.steps=5",
        "retrain.steps=3", "pretrain.steps=3", "run.checkpoint_every=2", "run.threads=1"]


def set_args(*pairs: str) -> list[str]:
    """``["--set", "k=v", "--set", ...]`` for the given ``k=v`` strings."""
    out: list[str] = []
    for kv in pairs:
        out += ["--set", kv]
    return out


def tiny_sets(*extra: str) -> list[str]:
    """``--set`` arguments for the tiny digits config (``TINY``) plus extras."""
    return set_args(*TINY, *extra)


def fake_seconds(module: nn.Module) -> float:
    """A deterministic stand-in for a latency measurement: 1 us per parameter of the module timed (plus 1 us)."""
    return 1e-6 * (1 + sum(p.numel() for p in module.parameters()))


class Timer:
    """Stands in for ``dmscale.latency.measure_latency`` (``fake_seconds``); counts the calls and keeps the shape
    of each call's first input."""

    def __init__(self) -> None:
        self.calls = 0
        self.shapes: list[tuple[int, ...] | None] = []

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict | None = None, **_: object) -> float:
        self.calls += 1
        self.shapes.append(tuple(args[0].shape) if args and hasattr(args[0], "shape") else None)
        return fake_seconds(module)
