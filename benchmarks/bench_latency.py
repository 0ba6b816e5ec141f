"""Latency targets: does the exported model run in the time asked for? (paper Table 13)

For each model, batch size and target (a fraction of the supernet's measured latency), a DMS with
``Target(latency=seconds, device=..., batch_size=...)`` measures every searchable layer at several
kept widths on the device, fits its quadratic latency model, calibrates the sum on whole exported
models at uniform widths, then searches the structure (weights frozen, BatchNorm in train mode as
in DMS_fast, random images and labels: this benchmark is about time, not accuracy) and exports.
The export's latency is then measured (median of ``--runs`` medians of 20 timed calls) and
compared with the target; the goal is to land within +-10%. The search lands on the target with the
exports' measured latency (``DMSConfig.latency_checks``, ``dmscale.latency.land_measured``); each row records
those checks (``latency_checks``: model fraction aimed at, predicted and measured seconds), and
``--latency-checks 0`` measures what the latency model alone achieves. On a shared machine the load can
change between measuring the supernet (which sets the target) and the export, so the two are also
timed in alternating rounds at the end and ``export / supernet`` is compared with the target
fraction ("interleaved").

Models (no test imports): the library's ResNet (``dmscale.app.zoo``, widths 32/64/128, depths 2/2/2,
32x32 input) and a Hugging Face ViT (hidden 192, 6 layers, 6 heads, patch 4 on 32x32: 65 tokens).

    python benchmarks/bench_latency.py [--quick] [--threads 1] [--device cpu] [--cache DIR]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

import dmscale  # noqa: E402
from dmscale.app import zoo  # noqa: E402
from dmscale.latency import measure_latency  # noqa: E402

NAME = "bench_latency"


def make(key: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if key == "cnn":
        return zoo.ResNet(widths=(32, 64, 128), depths=(2, 2, 2), in_ch=3, n_classes=10)
    from transformers import ViTConfig, ViTForImageClassification

    return ViTForImageClassification(ViTConfig(image_size=32, patch_size=4, hidden_size=192, num_hidden_layers=6,
                                               num_attention_heads=6, intermediate_size=768, num_labels=10))


def logits(out):
    return out.logits if hasattr(out, "logits") else out


def latency(model: torch.nn.Module, x: torch.Tensor, runs: int) -> float:
    """Median over ``runs`` of the median of 20 timed calls (eval mode, inference mode)."""
    model.eval()
    with torch.inference_mode():
        return statistics.median(measure_latency(model, (x,), repeats=20) for _ in range(runs))


def run_one(key: str, batch: int, frac: float, device: str, steps: int, runs: int, cache: str,
            divisor: int = 1, checks: int = 4) -> dict:
    dev = torch.device(device)
    sup = make(key)
    x_dev = torch.randn(batch, 3, 32, 32, device=dev)
    full = latency(sup.to(dev), x_dev, runs)
    sup = sup.cpu()
    target = frac * full
    t0 = time.perf_counter()
    dms = dmscale.DMS(sup, (torch.randn(2, 3, 32, 32),), dmscale.Target(latency=target, device=device, batch_size=batch),
                      total_steps=steps, latency_cache=cache, warn=False, divisor=divisor, latency_checks=checks)
    t_model = time.perf_counter() - t0
    for p in sup.parameters():
        p.requires_grad_(False)
    sup.train()  # BatchNorm in train mode (batch statistics), weights frozen: DMS_fast
    opt = torch.optim.Adam(dms.structure_parameters(), lr=0.05)
    g = torch.Generator().manual_seed(1)
    t0 = time.perf_counter()
    for _ in range(steps):
        xb = torch.randn(16, 3, 32, 32, generator=g)
        yb = torch.randint(0, 10, (16,), generator=g)
        loss = dms.loss(F.cross_entropy(logits(sup(xb)), yb))
        opt.zero_grad()
        loss.backward()
        opt.step()
        dms.step()
    t_search = time.perf_counter() - t0
    small = dms.export(atol=1e-3, rtol=1e-3)
    with torch.no_grad():
        predicted = float(dms.resource(soft=False)["latency"])
    measured = latency(small.to(dev), x_dev, runs)
    # the same two models timed in alternating rounds: a ratio that machine load shifts alike
    plain = dms.remove().to(dev).eval()
    with torch.inference_mode():
        t = common.interleaved({"super": lambda: plain(x_dev), "export": lambda: small(x_dev)},
                               rounds=runs, repeats=5, warmup=2)
    ratio = t["export"]["median"] / t["super"]["median"]
    lm = dms.latency_model
    c_full = dmscale.count(make(key), (torch.randn(1, 3, 32, 32),))
    c = dmscale.count(small.cpu(), (torch.randn(1, 3, 32, 32),))
    return {"model": key, "device": device, "batch": batch, "divisor": divisor, "target_frac": frac,
            "latency_checks_allowed": checks,
            "supernet_latency_s": full,
            "target_latency_s": target, "predicted_export_latency_s": predicted, "measured_export_latency_s": measured,
            "measured_over_target": measured / target, "predicted_over_target": predicted / target,
            "within_10pct": abs(measured / target - 1) <= 0.10,
            "interleaved_export_over_supernet": ratio, "interleaved_ratio_over_target_frac": ratio / frac,
            "interleaved_within_10pct": abs(ratio / frac - 1) <= 0.10,
            "loadavg_after": os.getloadavg(), "flops_frac": c["flops"] / c_full["flops"],
            "params_frac": c["params"] / c_full["params"], "calibration_alpha_s": lm.alpha, "calibration_beta": lm.beta,
            "calibration_gamma_s": lm.gamma,
            "calibration": lm.calibration, "layers_measured": len(lm.layers), "latency_model_seconds": t_model,
            "search_seconds": t_search, "steps": steps, "kept": dms.kept(),
            "projections": [(w, str(p)) for w, p in dms.projections],
            "latency_checks": dms.latency_checks, "latency_scale": dms.latency_scale}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="CNN only, one batch size, one target")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1: reproducible)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--models", default="cnn,vit")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--divisor", type=int, default=1, help="exported widths are multiples of this")
    ap.add_argument("--latency-checks", type=int, default=4,
                    help="exports timed to land the target on its measured latency (0: the latency model alone)")
    ap.add_argument("--runs", type=int, default=7, help="latency: median of this many medians of 20 calls")
    ap.add_argument("--cache", default=None, help="latency table directory (default: a fresh temporary one)")
    ap.add_argument("--name", default=NAME, help="result file name (benchmarks/results/<name>.json)")
    ap.add_argument("--settings", default=None,
                    help="model:batch:fraction list, e.g. cnn:256:0.5,vit:64:0.5 (default: see the code)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cache = args.cache or tempfile.mkdtemp(prefix="dmscale-latency-")
    models = ["cnn"] if args.quick else args.models.split(",")
    settings = {"cnn": [(32, 0.5)] if args.quick else [(1, 0.5), (32, 0.5), (32, 0.7)],
                "vit": [(8, 0.5), (8, 0.7)]}
    plan = [(k, b, f) for k in models for b, f in settings[k]]
    if args.settings:
        plan = [(k, int(b), float(f)) for k, b, f in (item.split(":") for item in args.settings.split(","))]
    res, rows = [], []
    for key, batch, frac in plan:
        r = run_one(key, batch, frac, args.device, args.steps, args.runs, cache, args.divisor, args.latency_checks)
        res.append(r)
        rows.append([key, args.device, batch, frac, r["supernet_latency_s"] * 1e3, r["target_latency_s"] * 1e3,
                     r["predicted_export_latency_s"] * 1e3, r["measured_export_latency_s"] * 1e3,
                     r["measured_over_target"], r["interleaved_ratio_over_target_frac"], r["flops_frac"],
                     "yes" if r["within_10pct"] else "NO"])
        common.save_result(args.name, {"name": args.name, "quick": args.quick, "threads": args.threads,
                                       "device": args.device, "latency_checks": args.latency_checks,
                                       "results": res, "partial": True})
        print(f"{key} b={batch} target {frac:.2f}x: supernet {r['supernet_latency_s'] * 1e3:.2f} ms, target "
              f"{r['target_latency_s'] * 1e3:.2f} ms, export {r['measured_export_latency_s'] * 1e3:.2f} ms "
              f"(predicted {r['predicted_export_latency_s'] * 1e3:.2f}) -> {r['measured_over_target']:.3f} x target",
              flush=True)
    met = sum(r["within_10pct"] for r in res)
    common.save_result(args.name, {"name": args.name, "quick": args.quick, "threads": args.threads,
                                   "device": args.device, "latency_checks": args.latency_checks, "results": res,
                                   "goal": {"within": 0.10, "met": met, "of": len(res)}})
    print()
    print(common.table(rows, ["model", "device", "batch", "target", "super ms", "target ms", "predicted ms",
                              "export ms", "export/target", "interleaved", "FLOPs frac", "within 10%"]))
    print(f"\n{met}/{len(res)} exports within +-10% of their latency target")


if __name__ == "__main__":
    main()
