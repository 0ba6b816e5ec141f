"""Run the quick version of every dmscale benchmark (< 15 min on 2 CPU cores) and write results/summary.json.

    python benchmarks/run_all.py            # quick versions
    python benchmarks/run_all.py --full     # full versions (much longer: see BENCHMARKS.md)
    python benchmarks/run_all.py --only bench_topk,bench_overhead

Each benchmark runs in its own interpreter and writes into results/quick/ (or results/full/),
so a quick run never overwrites the full results in results/; one failing does not stop the others (its error is
recorded in the summary). The summary holds each benchmark's headline numbers and goal status.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

BENCHES = ["bench_topk", "bench_overhead", "bench_export_speed", "bench_quality", "bench_search_cost",
           "bench_structure_search"]


def headline(name: str, d: dict) -> dict:
    """The numbers that go into the summary."""
    if name == "bench_topk":
        return d["goal"]
    if name == "bench_overhead":
        return {k: {"ratio": r["ratio"], "plain_step_s": r["plain_step_s"], "dms_step_s": r["dms_step_s"],
                    "met": r["met"]} for k, r in d["results"].items()}
    if name == "bench_export_speed":
        return {"goal": d["goal"], "settings": [
            {k: e[k] for k in ("model", "batch", "divisor", "exported_flops_frac", "speedup", "efficiency", "met")}
            for e in d["results"]]}
    if name == "bench_quality":
        return {ds: [{k: a[k] for k in ("method", "budget", "flops_frac_mean", "acc_mean", "acc_std", "n")}
                     for a in r["aggregate"]] for ds, r in d["datasets"].items()}
    if name == "bench_search_cost":
        return {"cnn": [{k: r[k] for k in ("target", "total_steps", "steps_to_target", "time_to_target_s",
                                           "time_per_step_s", "export_acc_no_finetune")} for r in d["cnn"]],
                "smollm2": d.get("smollm2")}
    if name == "bench_structure_search":
        return {ds: {t: {m: {k: e[k] for k in ("acc_noft_mean", "acc_ft_mean", "flops_frac_mean", "n")}
                         for m, e in st["methods"].items()} for t, st in r["summary"].items()}
                for ds, r in d["datasets"].items() if r.get("runs")}
    return {}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--full", action="store_true", help="run the full versions instead of --quick")
    ap.add_argument("--only", default="", help="comma list of benchmark names")
    args = ap.parse_args()
    names = [n for n in BENCHES if not args.only or n in args.only.split(",")]
    summary = {"quick": not args.full, "machine": common.machine_info(), "benchmarks": {}}
    t_all = time.perf_counter()
    out_dir = os.path.join(common.HERE, "results", "full" if args.full else "quick")
    env = dict(os.environ, DMSCALE_BENCH_RESULTS=out_dir)
    summary["results_dir"] = os.path.relpath(out_dir, common.ROOT)
    for name in names:
        cmd = [sys.executable, os.path.join(common.HERE, f"{name}.py")] + ([] if args.full else ["--quick"])
        print(f"=== {' '.join(cmd[1:])}", flush=True)
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=common.ROOT, env=env)
        dt = time.perf_counter() - t0
        entry: dict = {"command": "python " + " ".join(os.path.relpath(c, common.ROOT) if c.endswith(".py") else c
                                                       for c in cmd[1:]),
                       "wall_s": dt, "returncode": proc.returncode}
        path = os.path.join(out_dir, f"{name}.json")
        if proc.returncode == 0 and os.path.exists(path):
            with open(path) as f:
                try:
                    entry["headline"] = headline(name, json.load(f))
                except Exception as e:  # noqa: BLE001 - summary must still be written
                    entry["error"] = f"could not summarize: {e!r}"
        else:
            entry["error"] = f"exit code {proc.returncode}"
        summary["benchmarks"][name] = entry
        print(f"=== {name}: {dt:.0f}s, rc {proc.returncode}", flush=True)
    summary["total_wall_s"] = time.perf_counter() - t_all
    common.save_result("summary", summary)  # results/summary.json
    print(f"\nall done in {summary['total_wall_s'] / 60:.1f} min -> {os.path.join(common.RESULTS, 'summary.json')} "
          f"(per-benchmark files in {summary['results_dir']})")
    for name, e in summary["benchmarks"].items():
        print(f"  {name:20s} {e['wall_s']:6.0f}s  {'ok' if e['returncode'] == 0 else 'FAILED'}")


if __name__ == "__main__":
    main()
