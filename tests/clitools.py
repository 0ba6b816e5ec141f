"""Shared helpers of the CLI tests: ``--set`` arguments from ``key=value`` lists."""

from __future__ import annotations


def set_args(*pairs: str) -> list[str]:
    """``["--set", "k=v", "--set", ...]`` for the given ``k=v`` strings."""
    out: list[str] = []
    for kv in pairs:
        out += ["--set", kv]
    return out
