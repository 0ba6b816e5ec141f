"""Operator benchmark: ``dmscale.differentiable_topk`` (sort-based ranks) vs the reference's N x N ranks.

The reference normalizes importance with a pairwise comparison matrix::

    c' = (c[None, :] < c[:, None]).float().sum(1) / N      # O(N^2) time and memory
    m  = sigmoid(N * (c' - a))

dmscale ranks by sorting (O(N log N) time, O(N) memory). We time forward + backward (gradient
to the ratio) for N = 64 ... 16384 (11008 = Llama-7B MLP width) and measure memory two ways:

* ``alloc_bytes`` / ``largest_bytes``: analytic, a ``TorchDispatchMode`` sums the sizes of every
  tensor produced by an aten op during forward + backward (and the largest single one);
* ``rss_peak_delta``: real peak RSS growth of one forward + backward in a fresh subprocess:
  the kernel's high-water mark ``VmHWM`` (reset through ``/proc/self/clear_refs`` after warm-up)
  minus ``VmRSS`` before the call. (``getrusage`` ru_maxrss is not used: Linux carries it over
  ``fork``+``exec`` from the parent, so a child inherits the benchmark's own peak.)

    python benchmarks/bench_topk.py [--quick] [--device cuda]

With ``--device cuda`` the operator runs on the GPU (timings synchronize the device; the real
memory column is the CUDA allocator's peak growth, ``cuda_peak_delta``, instead of the RSS) and
the result file carries ``"device": "cuda"``.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

from dmscale import differentiable_topk  # noqa: E402

NAME = "bench_topk"
SIZES = [64, 256, 1024, 4096, 11008, 16384]


def reference_topk(c: torch.Tensor, ratio: torch.Tensor) -> torch.Tensor:
    """The reference implementation: pairwise N x N rank normalization, then the same sigmoid."""
    n = c.numel()
    cn = (c[None, :] < c[:, None]).float().sum(1) / n
    return torch.sigmoid(n * (cn - (1.0 - ratio)))


def scatter_topk(c: torch.Tensor, ratio: torch.Tensor) -> torch.Tensor:
    """dmscale's operator with the rank scatter written as ``scatter_`` instead of ``ranks[order] = ...``.

    Same result; measured because ``index_put_`` enters an intra-op parallel region whose thread
    wake-up costs milliseconds on a loaded machine (see BENCHMARKS.md, proposed core patch).
    """
    n = c.numel()
    order = torch.argsort(c.detach(), stable=True)
    ranks = torch.empty(n, dtype=c.dtype, device=c.device).scatter_(
        0, order, torch.arange(n, dtype=c.dtype, device=c.device))
    cn = (ranks + 0.5) / n
    return torch.sigmoid(n * (cn - (1.0 - ratio)))


IMPLS = {"dmscale": differentiable_topk, "reference": reference_topk, "dmscale_scatter": scatter_topk}


def fwd_bwd(impl, c: torch.Tensor, ratio: torch.Tensor) -> None:
    m = impl(c, ratio)
    (m * torch.linspace(0, 1, m.numel(), device=m.device)).sum().backward()  # a loss on every element
    ratio.grad = None


class AllocCounter(TorchDispatchMode):
    """Sums the bytes of every tensor an aten op returns (an allocation count, not live memory)."""

    def __init__(self) -> None:
        super().__init__()
        self.total = 0
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                b = t.numel() * t.element_size()
                self.total += b
                self.largest = max(self.largest, b)
        return out


def alloc_bytes(impl, n: int, device: str = "cpu") -> tuple[int, int]:
    c = torch.rand(n, device=device)
    ratio = torch.tensor(0.5, requires_grad=True, device=device)
    with AllocCounter() as ac:
        fwd_bwd(impl, c, ratio)
    return ac.total, ac.largest


_CHILD = r"""
import sys, torch
sys.path.insert(0, {bench!r})
import bench_topk as b
torch.set_num_threads({threads})
n = {n}
c = torch.rand(n); ratio = torch.tensor(0.5, requires_grad=True)
b.fwd_bwd(b.IMPLS['dmscale'], torch.rand(64), torch.tensor(0.5, requires_grad=True))  # load kernels
def status(key):
    for line in open('/proc/self/status'):
        if line.startswith(key + ':'):
            return int(line.split()[1]) * 1024
open('/proc/self/clear_refs', 'w').write('5')  # reset the peak RSS (VmHWM) to the current RSS
base = status('VmRSS')
b.fwd_bwd(b.IMPLS[{impl!r}], c, ratio)
print(status('VmHWM') - base)
"""


def rss_peak_delta(impl: str, n: int) -> int:
    """Peak RSS growth (bytes) of one forward+backward in a fresh interpreter."""
    code = _CHILD.format(bench=os.path.dirname(os.path.abspath(__file__)), threads=torch.get_num_threads(),
                         n=n, impl=impl)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1])


def cuda_peak_delta(impl, n: int) -> int:
    """Peak growth (bytes) of the CUDA caching allocator's allocated memory during one forward+backward."""
    c = torch.rand(n, device="cuda")
    ratio = torch.tensor(0.5, requires_grad=True, device="cuda")
    fwd_bwd(IMPLS["dmscale"], torch.rand(64, device="cuda"), torch.tensor(0.5, requires_grad=True, device="cuda"))
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fwd_bwd(impl, c, ratio)
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer repeats, skip RSS subprocesses for small N")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--name", default=NAME, help="result file stem")
    common.device_arg(ap)
    args = ap.parse_args()
    dev = common.check_device(args.device)
    mem_key = "cuda_peak_delta" if dev == "cuda" else "rss_peak_delta"
    if args.threads:
        torch.set_num_threads(args.threads)
    repeats = 7 if args.quick else 25
    rows, res = [], []
    for n in SIZES:
        c = torch.rand(n, device=dev)
        ratio = torch.tensor(0.5, requires_grad=True, device=dev)
        # correctness (random floats: no ties): dmscale ranks are (rank + 0.5) / N (so that round(ratio*N)
        # elements are kept); the reference uses rank / N. With that half-step shift applied they agree.
        with torch.no_grad():
            d = (differentiable_topk(c, ratio) - reference_topk(c, ratio + 0.5 / n)).abs().max().item()
            d2 = (differentiable_topk(c, ratio) - scatter_topk(c, ratio)).abs().max().item()
            assert d < 1e-3 and d2 == 0.0, (d, d2)
        fns = {k: common.synced(lambda f=f: fwd_bwd(f, c, ratio), dev) for k, f in IMPLS.items()}
        big = n >= 4096
        t = common.interleaved(fns, rounds=3 if big else 5, repeats=max(2, repeats // (3 if big else 1)),
                               warmup=1 if big else 3, inner=1 if big else 10)
        entry = {"n": n, "max_abs_mask_diff_vs_shifted_reference": d}
        for k in IMPLS:
            tot, largest = alloc_bytes(IMPLS[k], n, dev)
            entry[k] = {"time_s": t[k]["median"], "time_min_s": t[k]["min"], "time_iqr_s": t[k]["iqr"],
                        "alloc_bytes": tot, "largest_bytes": largest}
            if k != "dmscale_scatter" and (not args.quick or n in (4096, 11008)):
                entry[k][mem_key] = cuda_peak_delta(IMPLS[k], n) if dev == "cuda" else rss_peak_delta(k, n)
        entry["speedup"] = entry["reference"]["time_s"] / entry["dmscale"]["time_s"]
        entry["speedup_scatter"] = entry["reference"]["time_s"] / entry["dmscale_scatter"]["time_s"]
        entry["alloc_ratio"] = entry["reference"]["alloc_bytes"] / entry["dmscale"]["alloc_bytes"]
        res.append(entry)
        rows.append([n, entry["dmscale"]["time_s"] * 1e6, entry["reference"]["time_s"] * 1e6, entry["speedup"],
                     entry["dmscale_scatter"]["time_s"] * 1e6, entry["speedup_scatter"],
                     entry["dmscale"]["alloc_bytes"] / 1024, entry["reference"]["alloc_bytes"] / 1024,
                     entry["alloc_ratio"],
                     entry["dmscale"].get(mem_key, float("nan")) / 2**20,
                     entry["reference"].get(mem_key, float("nan")) / 2**20, d])
        print(f"N={n}: {entry['speedup']:.1f}x faster, {entry['alloc_ratio']:.0f}x fewer bytes", flush=True)
    at = next(e for e in res if e["n"] == 11008)
    goal = {"speedup_at_11008": at["speedup"], "alloc_ratio_at_11008": at["alloc_ratio"],
            "speedup_scatter_at_11008": at["speedup_scatter"], "speedup_goal": 50.0, "met": at["speedup"] >= 50.0,
            "dmscale_bytes_per_element_at_11008": at["dmscale"]["alloc_bytes"] / 11008,
            "reference_bytes_per_element_at_11008": at["reference"]["alloc_bytes"] / 11008}
    out = {"name": args.name, "quick": args.quick, "device": dev, "threads": torch.get_num_threads(), "sizes": SIZES,
           "results": res, "goal": goal,
           "memory_method": "alloc_bytes: TorchDispatchMode sum of aten-op output sizes during fwd+bwd "
                            "(analytic); rss_peak_delta: VmHWM growth in a fresh subprocess (real, CPU); "
                            "cuda_peak_delta: torch.cuda.max_memory_allocated growth (real, CUDA)",
           "timing": "median over interleaved repeats of forward+backward (grad to the ratio)"}
    common.save_result(args.name, out)

    print()
    print(common.table(rows, ["N", "dms us", "ref us", "speedup", "scatter us", "speedup(scatter)", "dms KiB", "ref KiB", "mem x",
                              f"dms {mem_key} MiB", f"ref {mem_key} MiB", "max|dm|"]))
    print(f"\nN=11008: {goal['speedup_at_11008']:.0f}x faster (goal >= 50x: {'MET' if goal['met'] else 'NOT MET'}), "
          f"{goal['dmscale_bytes_per_element_at_11008']:.0f} B/element vs "
          f"{goal['reference_bytes_per_element_at_11008']:.0f} B/element")

    p = common.plt()
    fig, ax = p.subplots(1, 2, figsize=(10, 4))
    ns = [e["n"] for e in res]
    for k, st in (("dmscale", "o-"), ("reference", "s--"), ("dmscale_scatter", "^:")):
        ax[0].loglog(ns, [e[k]["time_s"] * 1e3 for e in res], st, label=k)
        ax[1].loglog(ns, [e[k]["alloc_bytes"] / 2**20 for e in res], st, label=k)
    ax[0].set(xlabel="N", ylabel="fwd+bwd time (ms, median)", title="differentiable top-k: time")
    ax[1].set(xlabel="N", ylabel="bytes allocated (MiB)", title="memory (aten outputs)")
    for a in ax:
        a.axvline(11008, color="gray", lw=0.5)
        a.legend()
        a.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(common.plot_path(args.name), dpi=120)


if __name__ == "__main__":
    main()
