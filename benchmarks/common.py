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
# run_all.py sends the --quick runs to results/quick/ so they do not overwrite the full runs
RESULTS = os.environ.get("DMSCALE_BENCH_RESULTS") or os.path.join(HERE, "results")
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
        "gpu": gpu_info(),
    }


def gpu_info() -> dict[str, Any] | None:
    """Name, count and memory of the CUDA devices (None without CUDA)."""
    if not torch.cuda.is_available():
        return None
    p = torch.cuda.get_device_properties(0)
    return {"name": p.name, "count": torch.cuda.device_count(), "memory_gib": round(p.total_memory / 2**30, 1),
            "cuda": torch.version.cuda, "capability": f"{p.major}.{p.minor}"}


def device_arg(ap) -> None:
    """Add ``--device cpu|cuda`` to a benchmark's argument parser."""
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                    help="where to run (cuda: timings synchronize the device; results carry a 'device' field)")


def check_device(device: str) -> str:
    if device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: torch.cuda.is_available() is False")
    return device


def synced(fn: Callable[[], Any], device: str) -> Callable[[], Any]:
    """``fn`` followed by a device synchronize, so wall-clock timing covers the queued GPU work."""
    if device != "cuda":
        return fn

    def run() -> Any:
        out = fn()
        torch.cuda.synchronize()
        return out
    return run


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


# --------------------------------------------------------------------------- training loops (bench_quality)
# Written on DMS directly (not dmscale.app.pipelines, which was uncommitted and changing while these
# benchmarks were written); the phases follow docs/method: DMS = search on a random-init enlarged
# supernet then retrain; DMS_p = pretrain, search weights+structure, retrain; DMS_fast = pretrain,
# structure-only search with frozen weights (BN in train mode), then fine-tune.

import math  # noqa: E402

import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402


class Stream:
    """Endless shuffled mini-batches of a TensorDataset, reproducible from a seed."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch: int, seed: int) -> None:
        self.x, self.y, self.batch = x, y, batch
        self.g = torch.Generator().manual_seed(seed)
        self.perm, self.pos = torch.randperm(len(x), generator=self.g), 0

    def __call__(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.pos + self.batch > len(self.perm):
            self.perm, self.pos = torch.randperm(len(self.x), generator=self.g), 0
        idx = self.perm[self.pos:self.pos + self.batch]
        self.pos += self.batch
        return self.x[idx], self.y[idx]


def cosine_lr(opt: torch.optim.Optimizer, step: int, total: int, base: list[float], warmup: int = 0) -> None:
    f = (step + 1) / warmup if step < warmup else 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))
    for gr, b in zip(opt.param_groups, base):
        gr["lr"] = b * f


def train(model: nn.Module, stream: Stream, steps: int, lr: float = 0.05, wd: float = 5e-4) -> nn.Module:
    """Plain SGD+momentum training with a cosine schedule."""
    if steps <= 0:
        return model
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=wd, nesterov=True)
    for s in range(steps):
        cosine_lr(opt, s, steps, [lr], warmup=min(20, steps // 10))
        x, y = stream()
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return model


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 1000) -> float:
    model.eval()
    correct = 0
    for i in range(0, len(x), batch):
        correct += int((model(x[i:i + batch]).argmax(1) == y[i:i + batch]).sum())
    return correct / len(x)


def dms_search(model: nn.Module, stream: Stream, steps: int, target_of_model: float, lr: float = 0.05,
               freeze_weights: bool = False, seed: int = 0) -> tuple[nn.Module, dict]:
    """Run a DMS search to ``target_of_model`` (fraction of this model's FLOPs); return the export and info."""
    import dmscale

    x0, _ = stream()
    torch.manual_seed(seed)
    dms = dmscale.DMS(model, (x0[:2],), dmscale.Target(flops=target_of_model), total_steps=steps, warn=False)
    s_lr = min(0.1, max(0.005, 2.0 / steps))  # Adam moves a ratio ~lr per step (as dmscale's pipelines)
    groups = [{"params": dms.structure_parameters(), "lr": s_lr, "weight_decay": 0.0}]
    w_opt = None
    if freeze_weights:
        for p in dms.weight_parameters():
            p.requires_grad_(False)
    else:
        w_opt = torch.optim.SGD(dms.weight_parameters(), lr=lr, momentum=0.9, weight_decay=5e-4, nesterov=True)
    s_opt = torch.optim.Adam(groups, betas=(0.9, 0.999))
    model.train()  # BN in train mode even with frozen weights
    for s in range(steps):
        if w_opt is not None:
            cosine_lr(w_opt, s, steps, [lr], warmup=min(20, steps // 10))
        x, y = stream()
        loss = dms.loss(F.cross_entropy(model(x), y))
        s_opt.zero_grad(set_to_none=True)
        if w_opt is not None:
            w_opt.zero_grad(set_to_none=True)
        loss.backward()
        s_opt.step()
        if w_opt is not None:
            w_opt.step()
        dms.step()
    with torch.no_grad():
        r = dms.resource(soft=False)
    info = {"search_steps": steps, "hard_flops_frac_of_searched_model": float(r["flops_frac"]),
            "target_of_searched_model": target_of_model, "kept": dms.kept()}
    small = dms.export()
    for p in small.parameters():
        p.requires_grad_(True)
    return small, info


def one_shot_prune(model: nn.Module, stream: Stream, frac: float, method: str, taylor_batches: int = 20) -> nn.Module:
    """Classic one-shot pruning: L1 or Taylor channel importance, one kept ratio for every layer, export."""
    import dmscale

    x0, _ = stream()
    dms = dmscale.DMS(model, (x0[:2],), dmscale.Target(flops=frac), total_steps=10, warn=False, prune_depth=False,
                      importance="l1" if method == "l1" else "taylor", importance_decay=0.9)
    if method == "taylor":
        model.train()
        for _ in range(taylor_batches):
            x, y = stream()
            F.cross_entropy(model(x), y).backward()
        model.zero_grad(set_to_none=True)
    set_common_ratio(dms, frac, random_importance=False)
    small = dms.export()
    return small


def random_arch(model: nn.Module, example: torch.Tensor, frac: float, seed: int) -> nn.Module:
    """A random architecture of ``frac`` of the model's FLOPs: random per-group ratios scaled to the budget."""
    import dmscale

    g = torch.Generator().manual_seed(1000 + seed)
    dms = dmscale.DMS(model, (example,), dmscale.Target(flops=frac), total_steps=10, warn=False, prune_depth=False)
    u = {grp.key: float(torch.empty(()).uniform_(0.25, 1.0, generator=g)) for grp in dms.groups}
    with torch.no_grad():
        for grp in dms.groups:
            imp = dms.space.importance(grp)
            imp.copy_(torch.rand(imp.shape, generator=g))

        def f(sc: float) -> float:
            for grp in dms.groups:
                dms.space.ratio(grp).fill_(max(grp.min_ratio(), min(1.0, sc * u[grp.key])))
            return float(dms.resource(soft=False)["flops_frac"])
        lo, hi = 0.0, 4.0
        for _ in range(40):
            mid = (lo + hi) / 2
            lo, hi = (lo, mid) if f(mid) > frac else (mid, hi)
        f(lo)
    return dms.export()
