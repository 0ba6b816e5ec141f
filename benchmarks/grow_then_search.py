"""Grow then search: μpscale a trained small CNN into a supernet, then DMS-search it under a budget.

Compared at equal training compute (FLOPs of all steps) with DMS from a random-init supernet
of the same architecture. Both exports are retrained for the same number of steps.

    python benchmarks/grow_then_search.py            # MNIST-5k (or digits), 3 seeds
    python benchmarks/grow_then_search.py --quick    # digits, 1 seed, ~1 minute

Writes benchmarks/results/grow_then_search.json and .png.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
import torch.nn as nn

import dmscale
from dmscale.app.datasets import load_dataset
from dmscale.app.zoo import ResNet
from dmscale.recipes.loop import train_loop
from dmscale.recipes.tasks import ImageClassification

RESULTS = Path(__file__).resolve().parent / "results"


def batches(ds, batch_size: int, seed: int):
    """Endless deterministic mini-batches of a TensorDataset."""
    x, y = ds.tensors
    g = torch.Generator().manual_seed(seed)
    while True:
        perm = torch.randperm(len(x), generator=g)
        for i in range(0, len(x) - batch_size + 1, batch_size):
            idx = perm[i:i + batch_size]
            yield x[idx], y[idx]


@torch.no_grad()
def accuracy(model: nn.Module, ds) -> float:
    """Top-1 accuracy on a TensorDataset (eval mode)."""
    was = model.training
    model.eval()
    x, y = ds.tensors
    correct = sum(int((model(x[i:i + 512]).argmax(1) == y[i:i + 512]).sum()) for i in range(0, len(x), 512))
    model.train(was)
    return correct / len(x)


def train(model: nn.Module, it, steps: int, lr: float, dms: dmscale.DMS | None = None) -> None:
    """Plain SGD training, or a DMS search when ``dms`` is given (one optimizer, OneCycle LR; the recipes' loop)."""
    if dms is None:
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    else:
        opt = torch.optim.SGD([{"params": dms.weight_parameters(), "lr": lr, "momentum": 0.9, "weight_decay": 5e-4},
                               {"params": dms.structure_parameters(), "lr": 5e-2, "momentum": 0.0,
                                "weight_decay": 0.0}])
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=[g["lr"] for g in opt.param_groups], total_steps=steps,
                                                pct_start=0.2)
    model.train()
    train_loop(model, lambda step: next(it), ImageClassification(), steps, weight_optimizer=opt, dms=dms, lr=sched,
               desc="grow_then_search")


def run(seed: int, ds, small_w, steps_small: int, steps_search: int, steps_retrain: int, target: float,
        width: int) -> dict:
    """One seed of both arms; returns their accuracies, FLOPs and compute."""
    c, h, w = ds.input_shape
    x0 = ds.train.tensors[0][:2]
    out: dict = {}
    # arm A: train small, grow, search, retrain
    torch.manual_seed(seed)
    small = ResNet(small_w, (2, 2), in_ch=c, n_classes=ds.num_classes)
    f_small = dmscale.count(small, (x0[:1],))["flops"]
    train(small, batches(ds.train, 64, seed), steps_small, 0.05)
    acc_small = accuracy(small, ds.test)
    big = dmscale.upscale(small, width=width, noise=1e-3, example_inputs=(x0,), seed=seed)
    f_big = dmscale.count(big, (x0[:1],))["flops"]
    dms = dmscale.DMS(big, (x0,), dmscale.Target(flops=target), total_steps=steps_search, warn=False)
    train(big, batches(ds.train, 64, seed + 1), steps_search, 0.02, dms)
    exp_a = dms.export()
    acc_a_search = accuracy(exp_a, ds.test)
    train(exp_a, batches(ds.train, 64, seed + 2), steps_retrain, 0.02)
    out["grow"] = {"acc": accuracy(exp_a, ds.test), "acc_after_search": acc_a_search, "small_acc": acc_small,
                   "flops": dmscale.count(exp_a, (x0[:1],))["flops"]}
    compute_a = steps_small * f_small + steps_search * f_big
    # arm B: random-init supernet, search with the same compute, retrain
    steps_b = int(round(compute_a / f_big))
    torch.manual_seed(seed)
    big_b = ResNet(tuple(v * width for v in small_w), (2, 2), in_ch=c, n_classes=ds.num_classes)
    dms_b = dmscale.DMS(big_b, (x0,), dmscale.Target(flops=target), total_steps=steps_b, warn=False)
    train(big_b, batches(ds.train, 64, seed + 1), steps_b, 0.05, dms_b)
    exp_b = dms_b.export()
    acc_b_search = accuracy(exp_b, ds.test)
    train(exp_b, batches(ds.train, 64, seed + 2), steps_retrain, 0.02)
    out["random"] = {"acc": accuracy(exp_b, ds.test), "acc_after_search": acc_b_search,
                     "flops": dmscale.count(exp_b, (x0[:1],))["flops"], "search_steps": steps_b}
    out["compute_flops_per_sample"] = compute_a
    out["supernet_flops"] = f_big
    return out


def main(argv: list[str] | None = None) -> dict:
    """Run the comparison and write JSON + PNG."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--dataset", default=None)
    ap.add_argument("--seeds", type=int, default=None)
    args = ap.parse_args(argv)
    name = args.dataset or ("digits" if args.quick else "mnist5k")
    try:
        ds = load_dataset(name)
    except (FileNotFoundError, ImportError):
        ds = load_dataset("digits")
    seeds = args.seeds or (1 if args.quick else 3)
    cfg = dict(small_w=(8, 16), steps_small=150 if args.quick else 400, steps_search=80 if args.quick else 200,
               steps_retrain=100 if args.quick else 300, target=0.3, width=2)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    t0 = time.time()
    runs = [run(s, ds, **cfg) for s in range(seeds)]
    res = {"dataset": ds.name, "source": ds.source, "config": {k: list(v) if isinstance(v, tuple) else v
                                                               for k, v in cfg.items()},
           "seeds": seeds, "runs": runs, "seconds": time.time() - t0,
           "machine": {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                       "torch": torch.__version__}}
    for arm in ("grow", "random"):
        accs = torch.tensor([r[arm]["acc"] for r in runs])
        res[f"{arm}_acc_mean"] = float(accs.mean())
        res[f"{arm}_acc_std"] = float(accs.std()) if len(accs) > 1 else 0.0
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "grow_then_search.json").write_text(json.dumps(res, indent=2))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for i, arm in enumerate(("grow", "random")):
        vals = [r[arm]["acc"] for r in runs]
        ax.scatter([i] * len(vals), vals, label=arm)
        ax.errorbar([i + 0.1], [res[f"{arm}_acc_mean"]], yerr=[res[f"{arm}_acc_std"]], fmt="o", color="k")
    ax.set_xticks([0, 1], ["grow then search", "random-init supernet"])
    ax.set_ylabel("test accuracy after retraining")
    ax.set_title(f"{ds.name}: equal compute, target {cfg['target']} of supernet FLOPs")
    fig.tight_layout()
    fig.savefig(RESULTS / "grow_then_search.png", dpi=120)
    print(f"{ds.name}: grow {res['grow_acc_mean']:.4f}±{res['grow_acc_std']:.4f}  "
          f"random {res['random_acc_mean']:.4f}±{res['random_acc_std']:.4f}  ({res['seconds']:.0f}s)")
    return res


if __name__ == "__main__":
    main()
