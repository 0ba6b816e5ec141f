"""Shared helpers for the dmscale benchmarks: machine info, timing, result files, models, training loops.

Every benchmark script writes ``benchmarks/results/<name>.json`` (numbers + machine info) and
``benchmarks/results/<name>.png`` (matplotlib, Agg backend). Timings are medians of repeats;
ratios are always computed from numbers measured in the same run (the machine may be shared).
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from typing import Any, Callable

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
RESULTS = os.path.join(HERE, "results")
if os.path.join(ROOT, "tests") not in sys.path:
    sys.path.insert(0, os.path.join(ROOT, "tests"))


# --------------------------------------------------------------------------- machine / results

def cpu_model() -> str:
    """CPU model name from /proc/cpuinfo (or platform.processor())."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info() -> dict[str, Any]:
    """What the numbers were measured on."""
    try:
        load = os.getloadavg()
    except OSError:
        load = None
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "affinity_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "loadavg_at_start": load,
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def save_result(name: str, data: dict[str, Any]) -> str:
    """Write ``results/<name>.json`` (adds machine info) and return its path."""
    os.makedirs(RESULTS, exist_ok=True)
    data = dict(data)
    data.setdefault("machine", machine_info())
    path = os.path.join(RESULTS, f"{name}.json")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2, default=_jsonable)
    os.replace(tmp, path)
    return path


def _jsonable(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return x.tolist()
    if hasattr(x, "item"):
        return x.item()
    return str(x)


def plot_path(name: str) -> str:
    os.makedirs(RESULTS, exist_ok=True)
    return os.path.join(RESULTS, f"{name}.png")


def plt():
    """matplotlib.pyplot with the Agg backend."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as p
    return p


def table(rows: list[list[Any]], header: list[str]) -> str:
    """A plain fixed-width text table."""
    cells = [[str(h) for h in header]] + [[_fmt(c) for c in r] for r in rows]
    w = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.rjust(w[i]) for i, c in enumerate(r)) for r in cells]
    lines.insert(1, "  ".join("-" * x for x in w))
    return "\n".join(lines)


def _fmt(c: Any) -> str:
    if isinstance(c, float):
        if c != c:
            return "nan"
        if abs(c) >= 1000 or (abs(c) < 1e-3 and c != 0):
            return f"{c:.3g}"
        return f"{c:.3f}"
    return str(c)


# --------------------------------------------------------------------------- timing

def time_fn(fn: Callable[[], Any], repeats: int = 20, warmup: int = 3, min_time: float = 0.0,
            inner: int = 1) -> dict[str, float]:
    """Median / min / IQR of ``repeats`` timed calls (each ``inner`` calls) after ``warmup`` calls, in seconds."""
    for _ in range(warmup):
        fn()
    ts: list[float] = []
    t_start = time.perf_counter()
    while len(ts) < repeats or (time.perf_counter() - t_start) < min_time:
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        ts.append((time.perf_counter() - t0) / inner)
        if len(ts) >= 10 * repeats:
            break
    ts.sort()
    q1, q3 = ts[len(ts) // 4], ts[(3 * len(ts)) // 4]
    return {"median": statistics.median(ts), "min": ts[0], "iqr": q3 - q1, "n": len(ts)}


def interleaved(fns: dict[str, Callable[[], Any]], rounds: int = 5, repeats: int = 5, warmup: int = 2,
                inner: int = 1) -> dict[str, dict[str, float]]:
    """Time several functions in alternating rounds (so machine noise hits them alike); median over all."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    ts: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            for _ in range(repeats):
                t0 = time.perf_counter()
                for _ in range(inner):
                    fn()
                ts[k].append((time.perf_counter() - t0) / inner)
    out = {}
    for k, v in ts.items():
        v.sort()
        out[k] = {"median": statistics.median(v), "min": v[0], "iqr": v[(3 * len(v)) // 4] - v[len(v) // 4],
                  "n": len(v)}
    return out


# --------------------------------------------------------------------------- DMS helpers

def set_common_ratio(dms, target_frac: float, kind: str = "flops", seed: int = 0, random_importance: bool = True,
                     tol: float = 0.005) -> float:
    """Random importance, then bisect one kept ratio shared by every group so the hard resource ≈ target.

    Depth groups keep their ratio at 1 (width-only export) unless width alone cannot reach the target.
    Returns the achieved hard fraction.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        if random_importance:
            for grp in dms.groups:
                imp = dms.space.importance(grp)
                imp.copy_(torch.rand(imp.shape, generator=g).to(imp))
        width = [grp for grp in dms.groups if grp.kind != "depth"]

        def frac(r: float) -> float:
            for grp in width:
                dms.space.ratio(grp).fill_(max(r, grp.min_ratio()))
            return float(dms.resource(soft=False)[f"{kind}_frac"])

        lo, hi = 0.0, 1.0
        for _ in range(40):
            mid = (lo + hi) / 2
            if frac(mid) > target_frac:
                hi = mid
            else:
                lo = mid
            if hi - lo < 1e-5:
                break
        # pick whichever side is closer to the target
        f_lo, f_hi = frac(lo), frac(hi)
        r = lo if abs(f_lo - target_frac) <= abs(f_hi - target_frac) else hi
        return frac(r)


def two_group_opt(dms, lr_w: float = 0.1, lr_s: float = 5e-3, momentum: float = 0.9, wd: float = 5e-4,
                  adam: bool = False) -> torch.optim.Optimizer:
    """The documented two-group optimizer: weights, and structure ratios without weight decay."""
    if adam:
        return torch.optim.AdamW([{"params": dms.weight_parameters(), "lr": lr_w, "weight_decay": wd},
                                  {"params": dms.structure_parameters(), "lr": lr_s, "weight_decay": 0.0}])
    return torch.optim.SGD([{"params": dms.weight_parameters(), "lr": lr_w, "momentum": momentum, "weight_decay": wd},
                            {"params": dms.structure_parameters(), "lr": lr_s, "momentum": momentum,
                             "weight_decay": 0.0}])
