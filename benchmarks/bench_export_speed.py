"""Real speed-up of exported models: CPU latency of ``dms.export()`` vs the supernet at FLOPs ratios.

For each model and FLOPs ratio (0.75 / 0.5 / 0.25) a DMS gets random importance and one kept
ratio shared by all width groups, bisected so that ``dms.resource(soft=False)['flops_frac']`` ≈
the target (no training: latency does not depend on the weights). The exported model and an
unwrapped supernet are timed in alternating rounds (eval mode, ``torch.inference_mode``, warm-up,
median of many runs) at batch 1 and batch 64. ``efficiency = speed-up / (FLOPs_super / FLOPs_export)``
with FLOPs counted on the exported model by ``dmscale.count``; the goal is >= 0.8.

Models (``dmscale.app.zoo``): the ResNet-style CNN (widths (32, 64, 128), depths (2, 2, 2), 32x32 input)
and TinyViT (dim 192, 6 blocks, 6 heads, 32x32 input, patch 4 -> 65 tokens).

    python benchmarks/bench_export_speed.py [--quick] [--threads N] [--device cuda] [--batches 1,64]

``--device cuda`` times the models on the GPU (eval mode, ``torch.inference_mode``, each call
ends with a device synchronize); ``supernet_matmul_time_share`` is then not measured (null).
"""

from __future__ import annotations

import argparse
import copy
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

import dmscale  # noqa: E402
from dmscale.app.zoo import ResNet, TinyViT  # noqa: E402

NAME = "bench_export_speed"


def make(key: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if key == "cnn":
        return ResNet(widths=(32, 64, 128), depths=(2, 2, 2), n_classes=10, in_ch=3)
    return TinyViT(img=32, patch=4, dim=192, depth=6, heads=6, n_classes=10)


def export_at(key: str, frac: float, seed: int = 0, divisor: int = 1,
              device: str = "cpu") -> tuple[torch.nn.Module, float]:
    model = make(key).to(device)
    x = torch.randn(2, 3, 32, 32, device=device)
    dms = dmscale.DMS(model, (x,), dmscale.Target(flops=min(frac, 1.0)), total_steps=10, warn=False,
                      divisor=divisor)
    achieved = common.set_common_ratio(dms, frac, seed=seed)
    small = dms.export()
    return small, achieved


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (default 1: reproducible on a shared machine)")
    ap.add_argument("--models", default="cnn,vit")
    ap.add_argument("--batches", default="1,64", help="comma-separated batch sizes")
    ap.add_argument("--name", default=NAME, help="result file stem")
    common.device_arg(ap)
    args = ap.parse_args()
    dev = common.check_device(args.device)
    torch.set_num_threads(args.threads)
    fracs = [0.75, 0.5, 0.25]
    divisors = [1, 8]  # 1 = DMS default (step-1 widths); 8 = widths rounded to multiples of 8
    batches = [int(b) for b in args.batches.split(",")]
    res = []
    rows = []
    shares = {}
    for key in args.models.split(","):
        sup = make(key).eval()
        full = dmscale.count(sup, (torch.randn(1, 3, 32, 32),))  # FLOPs counted on the CPU
        sup.to(dev)
        exports = {}
        for f in fracs:
            for div in divisors:
                small, achieved = export_at(key, f, divisor=div, device=dev)
                exports[(f, div)] = (small.eval(), achieved)
        for b in batches:
            x = torch.randn(b, 3, 32, 32, device=dev)
            share = matmul_time_share(sup, x) if dev == "cpu" else None
            shares[(key, b)] = share
            if share is not None:
                print(f"{key} b={b}: {share:.0%} of the supernet's forward time is in conv/linear/matmul kernels")
            fns = {"super": common.synced(lambda m=sup: m(x), dev)}
            for fk, (small, _) in exports.items():
                fns[fk] = common.synced(lambda m=small: m(x), dev)
            if b == 1 or dev == "cuda":
                rounds, reps, inner = (3, 5, 5) if args.quick else (6, 10, 10)
            else:
                rounds, reps, inner = (2, 2, 1) if args.quick else (5, 4, 1)
            with torch.inference_mode():
                t = common.interleaved(fns, rounds=rounds, repeats=reps, warmup=2, inner=inner)
            for (f, div), (small, achieved) in exports.items():
                c = dmscale.count(copy.deepcopy(small).cpu(), (torch.randn(1, 3, 32, 32),))
                flops_ratio = c["flops"] / full["flops"]
                speedup = t["super"]["median"] / t[(f, div)]["median"]
                promise = 1.0 / flops_ratio
                eff = speedup / promise
                e = {"model": key, "device": dev, "batch": b, "target_flops_frac": f, "divisor": div, "dms_hard_flops_frac": achieved,
                     "exported_flops_frac": flops_ratio, "exported_params_frac": c["params"] / full["params"],
                     "super_latency_s": t["super"]["median"], "export_latency_s": t[(f, div)]["median"],
                     "widths": _widths(small),
                     "supernet_matmul_time_share": shares[(key, b)], "speedup": speedup, "promised_speedup": promise, "efficiency": eff, "met": eff >= 0.8}
                res.append(e)
                rows.append([key, b, f, div, flops_ratio, t["super"]["median"] * 1e3, t[(f, div)]["median"] * 1e3,
                             speedup,
                             promise, eff, "yes" if eff >= 0.8 else "NO"])
                print(f"{key} b={b} div={div} flops {flops_ratio:.3f}: speed-up {speedup:.2f}x of {promise:.2f}x "
                      f"-> efficiency {eff:.2f}", flush=True)
    n_met = sum(e["met"] for e in res if e["divisor"] == 1)
    n_all = sum(1 for e in res if e["divisor"] == 1)
    common.save_result(args.name, {"name": args.name, "quick": args.quick, "device": dev, "threads": args.threads,
                              "results": res,
                              "goal": {"efficiency_goal": 0.8, "met": n_met, "of": n_all,
                                       "min_efficiency": min(e["efficiency"] for e in res if e["divisor"] == 1)}})
    print()
    print(common.table(rows, ["model", "batch", "target", "divisor", "FLOPs frac", "super ms", "export ms", "speed-up",
                              "promise", "efficiency", ">= 0.8"]))
    print(f"\ndivisor 1: {n_met}/{n_all} settings reach >= 0.8 of the FLOPs promise")

    p = common.plt()
    keys = list(dict.fromkeys(e["model"] for e in res))
    fig, ax = p.subplots(1, len(keys), figsize=(5 * len(keys), 4), squeeze=False)
    for a, key in zip(ax[0], keys):
        for b, st in zip(batches, ("o", "s")):
            for div, ls in zip(divisors, ("-", ":")):
                es = [e for e in res if e["model"] == key and e["batch"] == b and e["divisor"] == div]
                a.plot([e["exported_flops_frac"] for e in es], [e["speedup"] for e in es], st + ls,
                       label=f"batch {b}, divisor {div}")
        xs = [0.2, 1.0]
        a.plot(xs, [1 / v for v in xs], "k--", lw=1, label="1 / FLOPs ratio")
        a.plot(xs, [0.8 / v for v in xs], "k:", lw=1, label="0.8 x promise")
        a.set(xlabel="exported FLOPs / supernet FLOPs", ylabel="measured speed-up", title=f"{key}: {dev.upper()} latency",
              ylim=(0, 5.5))
        a.legend()
        a.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(common.plot_path(args.name), dpi=120)


def matmul_time_share(model: torch.nn.Module, x: torch.Tensor) -> float:
    """Fraction of the forward's CPU self time spent in conv / linear / matmul kernels (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    with torch.inference_mode():
        for _ in range(2):
            model(x)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(3):
                model(x)
    tot = mm = 0.0
    for ev in prof.key_averages():
        tot += ev.self_cpu_time_total
        if any(k in ev.key for k in ("conv", "mkldnn", "addmm", "matmul", "mm", "bmm", "linear",
                                     "scaled_dot_product")):
            mm += ev.self_cpu_time_total
    return mm / tot if tot else float("nan")


def _widths(m: torch.nn.Module) -> list[int]:
    """Output widths of the exported model's conv / linear layers (to see odd channel counts)."""
    return [getattr(mod, "out_channels", getattr(mod, "out_features", 0)) for mod in m.modules()
            if isinstance(mod, (torch.nn.Conv2d, torch.nn.Linear))]


if __name__ == "__main__":
    main()
