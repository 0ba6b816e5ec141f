"""Shared helpers for the dmscale benchmarks: machine info, timing, result files, data streams.

Training, searching and one-shot pruning are dmscale's recipes (``dmscale.recipes``: the one training
loop, ``Search``, ``oneshot``), so the benchmarks measure what users run; models come from
``dmscale.app.zoo``. Benchmarks import the installed package only.

Every benchmark script writes ``benchmarks/results/<name>.json`` (numbers + machine info) and
``benchmarks/results/<name>.png`` (matplotlib, Agg backend). Timings are medians of repeats;
ratios are always computed from numbers measured in the same run (the machine may be shared).
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from typing import Any, Callable

import torch
import torch.nn as nn

from dmscale import DMS, Target
from dmscale.budget import bisect_max, hard_fraction
from dmscale.recipes import pipelines as recipes
from dmscale.recipes.loop import cosine_lr, make_optimizer
from dmscale.recipes.oneshot import common_ratio, rank
from dmscale.recipes.tasks import ImageClassification

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
# run_all.py sends the --quick runs to results/quick/ so they do not overwrite the full runs
RESULTS = os.environ.get("DMSCALE_BENCH_RESULTS") or os.path.join(HERE, "results")


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


def loadavg() -> list[float] | None:
    """The 1/5/15-minute load averages now (recorded next to results measured on a shared machine)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def ensure_fashion(install: bool = True) -> bool:
    """True if Fashion-MNIST's files are found. Otherwise, as root with apt-get, install Debian's
    ``dataset-fashion-mnist`` (``apt-get update && apt-get install -y dataset-fashion-mnist``) and look
    again; if it is still missing, print clearly that it is and how to get it, and return False."""
    from dmscale.app.datasets import FASHION_MNIST_HOWTO, load_dataset

    def found() -> bool:
        try:
            load_dataset("fashion-mnist", limit_train=10, limit_test=10)
            return True
        except FileNotFoundError:
            return False

    if found():
        return True
    why = "not root or no apt-get"
    if install and shutil.which("apt-get") and os.geteuid() == 0:
        print("fashion-mnist missing: installing Debian's dataset-fashion-mnist ...", flush=True)
        try:
            subprocess.run(["apt-get", "update"], check=True, capture_output=True, timeout=600)
            subprocess.run(["apt-get", "install", "-y", "dataset-fashion-mnist"], check=True, capture_output=True,
                           timeout=600)
        except (subprocess.SubprocessError, OSError) as e:
            why = f"apt-get failed: {e}"
        if found():
            return True
    print(f"*** Fashion-MNIST is MISSING on this machine ({why}); its benchmark rows are skipped. "
          f"Get it with: {FASHION_MNIST_HOWTO}", flush=True)
    return False


def save_result(name: str, data: dict[str, Any], indent: int | None = 2) -> str:
    """Write ``results/<name>.json`` (adds machine info) and return its path (``indent=None``: one line, for
    result files with many runs that are committed)."""
    os.makedirs(RESULTS, exist_ok=True)
    data = dict(data)
    data.setdefault("machine", machine_info())
    path = os.path.join(RESULTS, f"{name}.json")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=indent, default=_jsonable)
    os.replace(tmp, path)
    return path


def merge_parts(names: list[str]) -> dict[str, Any]:
    """One result from per-dataset result files of parallel runs (``results/<name>.json`` each): the first file,
    its ``datasets`` updated with the others', ``parts`` and their ``commands`` and machines listed, ``wall_s``
    the longest part's."""
    if not names:
        raise ValueError("merge_parts: no result names given")
    out: dict[str, Any] = {}
    for n in names:
        path = os.path.join(RESULTS, f"{n}.json")
        if not os.path.exists(path):
            raise FileNotFoundError(f"merge_parts: no result file {path} (run the part named {n!r} first)")
        with open(path) as f:
            d = json.load(f)
        if not out:
            out = d
            out["parts"], out["commands"], out["machines"] = [], [], []
        else:
            out["datasets"].update(d["datasets"])
            out["wall_s"] = max(out.get("wall_s", 0), d.get("wall_s", 0))
        out["parts"].append(n)
        out["commands"].append(d.get("command"))
        out["machines"].append(d.get("machine"))
    return out


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

def set_common_ratio(dms: DMS, target_frac: float, kind: str = "flops", seed: int = 0,
                     random_importance: bool = True) -> float:
    """Random importance (unless told otherwise), then one kept ratio for every width group, the largest whose
    hard resource is <= target (``dmscale.recipes.oneshot.common_ratio``). Returns the achieved hard fraction."""
    if random_importance:
        rank(dms, "random", seed=seed, groups=dms.groups)
    common_ratio(dms, target_frac, kind)
    return hard_fraction(dms, kind)


def two_group_opt(dms, lr_w: float = 0.1, lr_s: float = 5e-3, momentum: float = 0.9, wd: float = 5e-4,
                  adam: bool = False) -> torch.optim.Optimizer:
    """The documented two-group optimizer: weights, and structure ratios without weight decay."""
    if adam:
        return torch.optim.AdamW([{"params": dms.weight_parameters(), "lr": lr_w, "weight_decay": wd},
                                  {"params": dms.structure_parameters(), "lr": lr_s, "weight_decay": 0.0}])
    return torch.optim.SGD([{"params": dms.weight_parameters(), "lr": lr_w, "momentum": momentum, "weight_decay": wd},
                            {"params": dms.structure_parameters(), "lr": lr_s, "momentum": momentum,
                             "weight_decay": 0.0}])


# --------------------------------------------------------------------------- recipes (bench_quality)
# The phases follow docs/method: DMS = search on a random-init enlarged supernet then retrain;
# DMS_p = pretrain, search weights+structure, retrain; DMS_fast = pretrain, structure-only search
# with frozen weights (BN in train mode), then fine-tune.


class Stream:
    """Endless shuffled mini-batches of a TensorDataset, reproducible from a seed (``stream()`` or ``stream(step)``)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch: int, seed: int) -> None:
        self.x, self.y, self.batch = x, y, batch
        self.g = torch.Generator().manual_seed(seed)
        self.perm, self.pos = torch.randperm(len(x), generator=self.g), 0

    def __call__(self, step: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        if self.pos + self.batch > len(self.perm):
            self.perm, self.pos = torch.randperm(len(self.x), generator=self.g), 0
        idx = self.perm[self.pos:self.pos + self.batch]
        self.pos += self.batch
        return self.x[idx], self.y[idx]


def _sgd(lr: float, wd: float = 5e-4) -> Callable[[list], torch.optim.Optimizer]:
    return lambda params: make_optimizer(params, "sgd", lr=lr, momentum=0.9, weight_decay=wd)


def train(model: nn.Module, stream: Stream, steps: int, lr: float = 0.05, wd: float = 5e-4) -> nn.Module:
    """Plain SGD+momentum (Nesterov) training with a cosine schedule (``dmscale.recipes.pipelines.finetune``)."""
    recipes.finetune(model, ImageClassification(), stream, steps, lr=lr, optimizer=_sgd(lr, wd), schedule="cosine",
                     warmup=min(20, steps // 10))
    model.train()
    return model


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 1000) -> float:
    model.eval()
    correct = 0
    for i in range(0, len(x), batch):
        correct += int((model(x[i:i + batch]).argmax(1) == y[i:i + batch]).sum())
    return correct / len(x)


def recalibrator(batches: list, n: int | None = None) -> Callable[[nn.Module], None]:
    """``f(model)``: re-estimate BatchNorm statistics from ``batches`` (``dmscale.recalibrate_bn``)."""
    from dmscale import recalibrate_bn

    return lambda model: recalibrate_bn(model, batches, n)


def dms_search(model: nn.Module, stream: Stream, steps: int, target_of_model: float, lr: float = 0.05,
               freeze_weights: bool = False, seed: int = 0,
               recalibrate: Callable[[nn.Module], None] | None = None) -> tuple[nn.Module, dict]:
    """A DMS search to ``target_of_model`` (fraction of this model's FLOPs): ``dmscale.recipes`` DMS_p (weights +
    structure, no fine-tuning here) or DMS_fast (frozen weights); returns the export and info.

    The export lands on the budget (``budget.project``, within 1% below); ``recalibrate(model)`` re-estimates
    BatchNorm statistics of the found network before export (``recalibrator``)."""
    torch.manual_seed(seed)
    if freeze_weights:
        small, info = recipes.dms_fast(model, ImageClassification(), stream, Target(flops=target_of_model), steps,
                                       recalibrate=recalibrate)
    else:
        small, info = recipes.dms_p(model, ImageClassification(), stream, Target(flops=target_of_model), steps,
                                    lr=lr, optimizer=_sgd(lr), lr_schedule=cosine_lr(lr, steps, min(20, steps // 10)),
                                    recalibrate=recalibrate)
    for p in small.parameters():
        p.requires_grad_(True)
    proj = info.get("projection") or {}
    return small, {"search_steps": steps, "hard_flops_frac_of_searched_model": info["flops_frac"],
                   "target_of_searched_model": target_of_model, "search_ended_frac": proj.get("before"),
                   "kept": info["kept"]}


def land_export(dms: DMS) -> tuple[nn.Module, dict[str, Any]]:
    """Sharp masks (the kept weights are exported unscaled), land on the budget (``dms.project``: within 1%
    below the target), export. Info: where the ratios were before (``search_frac``), after, the move."""
    from dmscale.recipes.oneshot import SHARP

    before = hard_fraction(dms, dms.target.kind)
    for g in dms.groups:
        if g.kind != "depth":
            g.lam = SHARP * g.size
    p = dms.project(when="benchmark", warn=False)
    info = {"search_frac": before, "projected_frac": p.after, "projection_moved": p.moved,
            "projection_groups_changed": len(p.changes), "projection_tier": p.tier,
            "kept": [int(dms.space.keep(g).sum()) for g in dms.groups], "groups": [g.name for g in dms.groups]}
    return dms.export(project=False), info


ONESHOT_RANKINGS = ("l1", "taylor", "random", "uniform")


def oneshot_landed(model: nn.Module, example: torch.Tensor, frac: float, method: str, stream: Stream | None = None,
                   seed: int = 0, taylor_batches: int = 20) -> tuple[nn.Module, dict[str, Any]]:
    """One-shot width pruning of a copy of ``model`` to ``frac`` of its FLOPs, landed within 1% below.

    ``method``: ``l1`` / ``taylor`` / ``random`` (``dmscale.recipes.oneshot.rank``) or ``uniform`` (the first
    channels by index, no selection). One kept ratio for every width group (``common_ratio``), then
    ``land_export``: the common ratio alone lands 1-2% below the budget on the zoo ResNets, the projection's
    fine steps fill that."""
    import copy

    from dmscale.recipes.loop import frozen
    from dmscale.recipes.oneshot import SHARP, width_groups

    method = method.lower()
    if method not in ONESHOT_RANKINGS:
        raise ValueError(f"one-shot method must be one of {ONESHOT_RANKINGS}, got {method!r}")
    m = copy.deepcopy(model).eval()
    dms = DMS(m, (example[:2],), Target(flops=frac), 1, importance="taylor", prune_depth=False, warn=False)
    try:
        gs = width_groups(dms)
        with torch.no_grad():
            for g in gs:
                g.lam = SHARP * g.size
                dms.space.ratio(g).fill_(1.0)  # sharp masks at full keep: exactly the unpruned model
        if method == "uniform":
            with torch.no_grad():
                for g in gs:
                    dms.space.importance(g).copy_(torch.arange(g.size, 0, -1, dtype=torch.float32))
        else:
            with frozen(m):
                rank(dms, method, task=ImageClassification(), batches=stream, n_batches=taylor_batches, seed=seed,
                     groups=gs)
        r = common_ratio(dms, groups=gs)
        small, info = land_export(dms)
        info["common_ratio"] = r
    finally:
        dms.remove()
    return small, info


def random_arch(model: nn.Module, example: torch.Tensor, frac: float, seed: int) -> tuple[nn.Module, dict]:
    """A random architecture of ``frac`` of the model's FLOPs: random per-group ratios scaled to the budget,
    landed within 1% below (``land_export``); train it from scratch (``zoo.reinitialize``)."""
    g = torch.Generator().manual_seed(1000 + seed)
    dms = DMS(model, (example[:2],), Target(flops=frac), 10, warn=False, prune_depth=False)
    try:
        u = {grp.key: float(torch.empty(()).uniform_(0.25, 1.0, generator=g)) for grp in dms.groups}
        with torch.no_grad():
            for grp in dms.groups:
                dms.space.importance(grp).copy_(torch.rand(grp.size, generator=g))

        @torch.no_grad()
        def f(sc: float) -> float:
            for grp in dms.groups:
                dms.space.ratio(grp).fill_(max(grp.min_ratio(), min(1.0, sc * u[grp.key])))
            return hard_fraction(dms, "flops")

        f(bisect_max(f, frac, 0.0, 4.0))
        return land_export(dms)
    finally:
        dms.remove()


# --------------------------------------------------------------------------- statistics

def mean_std(xs: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    return statistics.mean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def permutation_p(diffs: list[float]) -> float:
    """Two-sided exact sign-flip permutation test of paired differences (mean 0 under H0); exact up to 2^16
    sign patterns, otherwise 20,000 random ones (seeded)."""
    import itertools
    import random

    n = len(diffs)
    if n == 0:
        return float("nan")
    obs = abs(sum(diffs))
    if n <= 16:
        pats = itertools.product((1, -1), repeat=n)
        total = 2 ** n
    else:
        rng = random.Random(0)
        total = 20000
        pats = ([rng.choice((1, -1)) for _ in range(n)] for _ in range(total))
    hit = sum(1 for s in pats if abs(sum(si * d for si, d in zip(s, diffs))) >= obs - 1e-12)
    return hit / total


def paired_test(a: list[float], b: list[float]) -> dict[str, Any]:
    """Paired comparison of a vs b (same seeds, same order): mean and std of a - b, wins, the exact
    sign-flip permutation p, and scipy's paired t-test and Wilcoxon signed-rank p when scipy is installed."""
    if len(a) != len(b):
        raise ValueError(f"paired_test needs equal lengths, got {len(a)} and {len(b)}")
    d = [x - y for x, y in zip(a, b)]
    m, s = mean_std(d)
    out: dict[str, Any] = {"n": len(d), "mean_diff": m, "std_diff": s, "wins": sum(x > 0 for x in d),
                           "losses": sum(x < 0 for x in d), "ties": sum(x == 0 for x in d),
                           "p_permutation": permutation_p(d)}
    try:
        from scipy import stats
    except ImportError:
        out["scipy"] = None
        return out
    out["scipy"] = True
    if len(d) > 1 and s > 0:
        out["p_ttest"] = float(stats.ttest_rel(a, b).pvalue)
    else:
        out["p_ttest"] = float("nan")
    nz = [x for x in d if x != 0]
    out["p_wilcoxon"] = float(stats.wilcoxon(d).pvalue) if nz else 1.0
    return out
