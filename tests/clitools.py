"""Shared helpers of the CLI tests: the tiny digits run, ``--set`` arguments from ``key=value`` lists."""

from __future__ import annotations

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
