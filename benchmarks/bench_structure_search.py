"""Table-2-style comparison: which search finds the best structure of a pretrained network (no weight training)?

The setting of the DMS paper's Table 2, at CPU scale: a well-pretrained ResNet, a structure-only
search (weights frozen, BN in train mode) to FLOPs 0.3 and 0.5 of the network, the same number of
search steps for every search method, exports at matched FLOPs, BatchNorm re-estimated for every
export, accuracy with no fine-tune and after a short fine-tune. Methods:

* search (same groups, resource loss, schedule, steps; see ``structure_methods.py``):
  ``DMS`` (differentiable top-k), ``GET`` (gradient-estimate top-k of the official code),
  ``SNS`` (single number selection), ``MES`` (multiple element selection);
  ``DMS-recipe`` = ``dmscale.recipes.dms_fast`` with the library's defaults (projection at the
  refine phase, recovery, structure lr 2/steps, export with its soft mask values folded in);
* one-shot (width only, one kept ratio for every layer): ``L1``, ``Taylor``, ``random``;
* ``uniform``: one kept ratio for every layer, the first channels by index (no selection).

Matched FLOPs: every export is landed by ``dmscale.budget.project`` within 1% below the target
(the one-shot common ratio lands 1-2% below on this model; the projection's fine steps fill it);
each export's FLOPs are counted with ``dmscale.count`` and must be within +-1% of the target (recorded
per run; the script exits 1 if one is not). Exports keep the pretrained weights of the kept elements
unscaled (sharp masks), so a row differs from another only by *which* elements it keeps. The
search methods' structure learning rate is chosen per (dataset, target, method) from a grid on a
separate pretrained model (pilot seed) by validation accuracy (never the test set).

    python benchmarks/bench_structure_search.py --quick                  # MNIST-5k, 2 seeds, FLOPs 0.3
    python benchmarks/bench_structure_search.py                          # both datasets, 5 seeds (hours)
    python benchmarks/bench_structure_search.py --datasets mnist5k --name bss_mnist5k &      # in parallel
    python benchmarks/bench_structure_search.py --datasets fashion-mnist --name bss_fashion &
    python benchmarks/bench_structure_search.py --merge bss_mnist5k,bss_fashion
    # a dataset's seeds over two processes: the second takes the first's pilot lrs
    python benchmarks/bench_structure_search.py --datasets fashion-mnist --first-seed 4 --seeds 1 \
        --lr-from bss_fashion --name bss_fashion_s4
    python benchmarks/bench_structure_search.py --markdown benchmarks/results/bench_structure_search.json
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from typing import Any, Callable

import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
from structure_methods import STRATEGIES, make_strategy  # noqa: E402

import dmscale  # noqa: E402
from dmscale import DMS, Target  # noqa: E402
from dmscale.app import zoo  # noqa: E402
from dmscale.app.datasets import load_dataset  # noqa: E402
from dmscale.recipes import pipelines as recipes  # noqa: E402
from dmscale.recipes.pipelines import Search  # noqa: E402
from dmscale.recipes.tasks import ImageClassification  # noqa: E402

NAME = "bench_structure_search"
SEARCH = ["DMS", "GET", "SNS", "MES"]
ONESHOT = ["L1", "Taylor", "random", "uniform"]
METHODS = SEARCH + ["DMS-recipe"] + ONESHOT
OTHERS = [m for m in METHODS if not m.startswith("DMS")]  # "the other methods" of the paired tests

MODEL = {"widths": (16, 32, 64), "depths": (2, 2, 2), "stem_stride": 2}
DATASETS = {
    # pretrain steps (batch 64, SGD Nesterov, cosine, lr 0.05); validation split for the lr pilot
    "fashion-mnist": {"pretrain": 1500, "val_fraction": 1 / 12},
    "mnist5k": {"pretrain": 800, "val_fraction": 0.125},
}
FULL = {"seeds": 5, "targets": [0.3, 0.5], "search_steps": 150, "finetune_steps": 100, "finetune_lr": 0.02,
        "recal_batches": 20, "taylor_batches": 20, "lr_grid": [0.015, 0.05, 0.15], "pilot_seed": 100}
QUICK = {"seeds": 2, "targets": [0.3], "search_steps": 30, "finetune_steps": 20, "finetune_lr": 0.02,
         "recal_batches": 10, "taylor_batches": 10, "lr_grid": None, "pilot_seed": 100, "pretrain": 200}
# structure lr without a pilot (--quick, --no-pilot): the ratio methods at about 2 / steps, logits faster (MES's
# gates start at logit 3 and must cross 0 within the search)
DEFAULT_LR = {"DMS": 0.015, "GET": 0.015, "SNS": 0.05, "MES": 0.15}
BATCH = 64
TOL = 0.01
# The library's multiplier update of the resource weight (DMS._adapt_weight) has no upper bound: a search whose
# structure does not move (e.g. SNS / MES at a small lr) grows it by e per step until weight * loss overflows
# float32 (~130 steps) and the run dies with NaN. The search methods here use Adam, whose steps do not scale with
# the loss, so a weight far above the task loss's scale changes nothing but the overflow; cap it, for every
# search strategy alike (reported per run as weight_capped_steps).
WEIGHT_CAP = 1e4
REACHED = 0.05  # a search "reached" the budget if its own hard FLOPs ended within 5% above the target


# --------------------------------------------------------------------------- data and models

class Data:
    def __init__(self, name: str, val_fraction: float) -> None:
        d = load_dataset(name, val_fraction=val_fraction, seed=0)
        self.name, self.source = name, d.source
        self.xtr, self.ytr = d.train.tensors
        self.xval, self.yval = d.val.tensors
        self.xte, self.yte = d.test.tensors
        self.example = self.xtr[:2]

    def stream(self, seed: int) -> common.Stream:
        return common.Stream(self.xtr, self.ytr, BATCH, seed)

    def fixed_batches(self, seed: int, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        s = self.stream(seed)
        return [s() for _ in range(n)]


def base_model(seed: int, in_ch: int) -> nn.Module:
    torch.manual_seed(seed)
    return zoo.build(MODEL["widths"], MODEL["depths"], in_ch=in_ch, stem_stride=MODEL["stem_stride"])


def flops(model: nn.Module, example: torch.Tensor) -> float:
    return dmscale.count(model, (example[:1],))["flops"]


# --------------------------------------------------------------------------- the methods

def search_export(pre: nn.Module, data: Data, method: str, target: float, steps: int, lr: float,
                  stream_seed: int) -> tuple[nn.Module, dict[str, Any]]:
    """A structure-only search of a copy of ``pre`` with strategy ``method``; the landed export and info."""
    model = copy.deepcopy(pre)
    dms = DMS(model, (data.example,), Target(flops=target), steps, project_refine=False, recover_below=0.0,
              warn=False)
    try:
        strat = make_strategy(method, dms)
        strat.install()
        opt = torch.optim.Adam(strat.parameters(), lr=lr)
        depth_params = strat.depth_parameters()

        capped = [0]

        def after_step(record: dict) -> None:
            if dms.refining:  # the refine phase fixes depth for every strategy
                for p in depth_params:
                    p.requires_grad_(False)
                    p.grad = None
            if dms.weight > WEIGHT_CAP:  # see WEIGHT_CAP
                dms.weight = WEIGHT_CAP
                capped[0] += 1

        hist = Search(dms, train_weights=False, structure_optimizer=opt).run(
            ImageClassification(), data.stream(stream_seed), train_mode=True, after_step=after_step)
        model.eval()
        fin = strat.finalize()
        exported, info = common.land_export(dms)
        info.update({"structure_lr": lr, "final_weight": dms.weight, "weight_capped_steps": capped[0],
                     "reached_target_step": next((r["step"] for r in hist
                                                  if r.get("resource", 1.0) <= target * (1 + TOL)), None)})
        if "argmax_counts" in fin:
            info["sns_argmax_counts"] = fin["argmax_counts"]
    finally:
        dms.remove()
    return exported, info


def recipe_export(pre: nn.Module, data: Data, target: float, steps: int, stream_seed: int) -> tuple[nn.Module, dict]:
    """``dmscale.recipes.dms_fast`` with the library's defaults (what a user runs)."""
    small, info = recipes.dms_fast(copy.deepcopy(pre), ImageClassification(), data.stream(stream_seed),
                                   Target(flops=target), steps)
    p = info.get("projection") or {}
    return small, {"search_frac": p.get("before"), "projected_frac": p.get("after"),
                   "projection_moved": (p["after"] / p["before"] - 1.0) if p.get("before") else None,
                   "structure_lr": recipes.auto_structure_lr(steps),
                   "kept": [v[1] for v in info["kept"].values()], "groups": list(info["kept"])}


def run_method(method: str, pre: nn.Module, data: Data, target: float, cfg: dict, seed: int,
               lrs: dict[str, float]) -> tuple[nn.Module, dict[str, Any]]:
    s_seed = 1000 * seed + 1  # the same search / calibration batches for every method of a seed
    if method in SEARCH:
        return search_export(pre, data, method, target, cfg["search_steps"], lrs[method], s_seed)
    if method == "DMS-recipe":
        return recipe_export(pre, data, target, cfg["search_steps"], s_seed)
    return common.oneshot_landed(pre, data.example, target, method, data.stream(s_seed), seed, cfg["taylor_batches"])


def evaluate(small: nn.Module, data: Data, cfg: dict, seed: int, base_flops: float, target: float,
             finetune: bool, on_val: bool = False) -> dict[str, Any]:
    """Recalibrate BN, count FLOPs, accuracy with no fine-tune (and after the short fine-tune)."""
    dmscale.recalibrate_bn(small, data.fixed_batches(1000 * seed + 2, cfg["recal_batches"]))
    frac = flops(small, data.example) / base_flops
    x, y = (data.xval, data.yval) if on_val else (data.xte, data.yte)
    out = {"flops_frac": frac, "within_1pct": abs(frac / target - 1.0) <= TOL + 1e-9,
           "acc_noft": common.accuracy(small, x, y)}
    if finetune:
        for p in small.parameters():
            p.requires_grad_(True)
        common.train(small, data.stream(1000 * seed + 3), cfg["finetune_steps"], lr=cfg["finetune_lr"])
        out["acc_ft"] = common.accuracy(small, x, y)
    return out


# --------------------------------------------------------------------------- the run

def pretrain(data: Data, seed: int, steps: int) -> tuple[nn.Module, float]:
    m = base_model(seed, data.xtr.shape[1])
    common.train(m, data.stream(1000 * seed), steps, lr=0.05)
    return m.eval(), common.accuracy(m, data.xte, data.yte)


def pilot(data: Data, cfg: dict, targets: list[float], base_flops: float, log: Callable[[str], None]) -> dict:
    """Structure lr per (target, search method): best validation accuracy (no fine-tune) on the pilot seed."""
    seed = cfg["pilot_seed"]
    pre, acc = pretrain(data, seed, cfg["pretrain"])
    log(f"{data.name} pilot seed {seed}: pretrained test acc {acc:.4f}")
    rows, chosen = [], {}
    for t in targets:
        chosen[str(t)] = {}
        for method in SEARCH:
            best = None
            for lr in cfg["lr_grid"]:
                t0 = time.perf_counter()
                small, info = search_export(pre, data, method, t, cfg["search_steps"], lr, 1000 * seed + 1)
                ev = evaluate(small, data, cfg, seed, base_flops, t, finetune=False, on_val=True)
                rows.append({"target": t, "method": method, "lr": lr, "val_acc": ev["acc_noft"],
                             "search_frac": info["search_frac"], "flops_frac": ev["flops_frac"],
                             "time_s": time.perf_counter() - t0})
                log(f"  pilot {t} {method} lr {lr}: val {ev['acc_noft']:.4f} search ended {info['search_frac']:.3f}")
                # an lr whose search itself reached the budget beats one that left the pruning to the projection
                key = (info["search_frac"] <= t * (1 + REACHED), ev["acc_noft"])
                if best is None or key > best[1]:
                    best = (lr, key)
            chosen[str(t)][method] = best[0]
    return {"seed": seed, "pretrained_test_acc": acc, "runs": rows, "chosen_lr": chosen,
            "rule": f"best validation accuracy (no fine-tune) among the lrs whose search ended within "
                    f"{REACHED:.0%} of the target (all lrs if none did)"}


def run_dataset(name: str, cfg: dict, log: Callable[[str], None], use_pilot: bool,
                on_seed: Callable[[dict], None] | None = None, lrs: dict | None = None) -> dict:
    """Pretrain, (pilot), then every method at every target for every seed; ``on_seed(partial)`` after each seed.

    ``lrs`` ({target: {method: lr}}): the structure lrs another run's pilot chose (no pilot here); seeds
    ``cfg["first_seed"]`` ... ``+ cfg["seeds"] - 1``."""
    dcfg = dict(DATASETS[name])
    if "pretrain" in cfg:
        dcfg["pretrain"] = cfg["pretrain"]
    cfg = {**cfg, **dcfg}
    data = Data(name, dcfg["val_fraction"])
    base_flops = flops(base_model(0, data.xtr.shape[1]), data.example)
    out: dict[str, Any] = {"dataset": name, "source": data.source, "train": len(data.xtr), "val": len(data.xval),
                           "test": len(data.xte), "model": MODEL, "base_flops": base_flops,
                           "pretrain_steps": cfg["pretrain"], "group_names": {}, "runs": [], "pretrained": []}
    t_all = time.perf_counter()
    if lrs is not None:
        lrs_for = {str(t): lrs[str(t)] for t in cfg["targets"]}
    elif use_pilot and cfg["lr_grid"]:
        out["pilot"] = pilot(data, cfg, cfg["targets"], base_flops, log)
        lrs_for = {str(t): out["pilot"]["chosen_lr"][str(t)] for t in cfg["targets"]}
    else:
        lrs_for = {str(t): dict(DEFAULT_LR) for t in cfg["targets"]}
    out["structure_lr"] = lrs_for
    first = cfg.get("first_seed", 0)
    for seed in range(first, first + cfg["seeds"]):
        t0 = time.perf_counter()
        pre, acc = pretrain(data, seed, cfg["pretrain"])
        out["pretrained"].append({"seed": seed, "test_acc": acc, "time_s": time.perf_counter() - t0})
        log(f"{name} seed {seed}: pretrained test acc {acc:.4f} ({time.perf_counter() - t0:.0f}s) load {common.loadavg()}")
        for t in cfg["targets"]:
            for method in METHODS:
                t0 = time.perf_counter()
                small, info = run_method(method, pre, data, t, cfg, seed, lrs_for[str(t)])
                t_method = time.perf_counter() - t0
                ev = evaluate(small, data, cfg, seed, base_flops, t, finetune=True)
                groups = info.pop("groups")
                out["group_names"].setdefault("oneshot" if method in ONESHOT else "search", groups)
                rec = {"dataset": name, "seed": seed, "target": t, "method": method, **ev, **info,
                       "method_time_s": t_method, "total_time_s": time.perf_counter() - t0,
                       "loadavg": common.loadavg()}
                out["runs"].append(rec)
                log(f"{name} s{seed} {t} {method:10s} noFT {ev['acc_noft']:.4f} FT {ev['acc_ft']:.4f} "
                    f"flops {ev['flops_frac']:.4f} (search ended {info.get('search_frac') or float('nan'):.3f}) "
                    f"{t_method:.0f}s")
        if on_seed is not None:
            on_seed({**out, "wall_s": time.perf_counter() - t_all, "partial": True})
    out["wall_s"] = time.perf_counter() - t_all
    out["summary"] = summarize(out)
    return out


# --------------------------------------------------------------------------- summary, tests, plot

def summarize(ds: dict) -> dict:
    """Mean ± std per (target, method, metric) and the paired tests of DMS vs the best other method."""
    runs = ds["runs"]
    targets = sorted({r["target"] for r in runs})
    out: dict[str, Any] = {}
    for t in targets:
        st: dict[str, Any] = {"methods": {}, "tests": {}}
        for m in METHODS:
            rs = sorted((r for r in runs if r["target"] == t and r["method"] == m), key=lambda r: r["seed"])
            if not rs:
                continue
            e: dict[str, Any] = {"n": len(rs), "seeds": [r["seed"] for r in rs]}
            for k in ("acc_noft", "acc_ft", "flops_frac", "method_time_s"):
                e[k + "_mean"], e[k + "_std"] = common.mean_std([r[k] for r in rs])
            sf = [r["search_frac"] for r in rs if r.get("search_frac") is not None]
            if sf:
                e["search_frac_mean"] = sum(sf) / len(sf)
            e["all_within_1pct"] = all(r["within_1pct"] for r in rs)
            st["methods"][m] = e
        for metric in ("acc_noft", "acc_ft"):
            others = [m for m in OTHERS if m in st["methods"]]
            if "DMS" not in st["methods"] or not others:
                continue
            best = max(others, key=lambda m: st["methods"][m][metric + "_mean"])
            tests = {}
            for other in dict.fromkeys([best, "GET"]):
                if other not in st["methods"]:
                    continue
                a = [r[metric] for r in sorted((r for r in runs if r["target"] == t and r["method"] == "DMS"),
                                               key=lambda r: r["seed"])]
                b = [r[metric] for r in sorted((r for r in runs if r["target"] == t and r["method"] == other),
                                               key=lambda r: r["seed"])]
                tests[other] = common.paired_test(a, b)
            st["tests"][metric] = {"best_other": best, "vs": tests}
        out[str(t)] = st
    return out


def pooled_tests(datasets: dict) -> dict:
    """DMS vs GET and vs each other method, pairs pooled over every (dataset, target, seed)."""
    out: dict[str, Any] = {}
    for metric in ("acc_noft", "acc_ft"):
        out[metric] = {}
        for other in OTHERS:
            a, b = [], []
            for ds in datasets.values():
                idx = {(r["target"], r["seed"]): r for r in ds["runs"] if r["method"] == other}
                for r in ds["runs"]:
                    if r["method"] == "DMS" and (r["target"], r["seed"]) in idx:
                        a.append(r[metric])
                        b.append(idx[(r["target"], r["seed"])][metric])
            if a:
                out[metric][other] = common.paired_test(a, b)
    return out


COLORS = {"DMS": "C3", "DMS-recipe": "C1", "GET": "C0", "SNS": "C2", "MES": "C4", "L1": "C5", "Taylor": "C6",
          "random": "C7", "uniform": "C8"}


def plot(out: dict, path: str) -> None:
    p = common.plt()
    dss = [d for d in out["datasets"] if out["datasets"][d].get("runs")]
    targets = sorted({r["target"] for d in dss for r in out["datasets"][d]["runs"]})
    fig, axs = p.subplots(len(dss), len(targets), figsize=(5.2 * len(targets), 3.8 * len(dss)), squeeze=False)
    for i, d in enumerate(dss):
        ds = out["datasets"][d]
        for j, t in enumerate(targets):
            ax = axs[i][j]
            s = ds["summary"][str(t)]["methods"]
            ms = [m for m in METHODS if m in s]
            for k, m in enumerate(ms):
                e = s[m]
                ax.errorbar(k - 0.12, 100 * e["acc_noft_mean"], yerr=100 * e["acc_noft_std"], fmt="o",
                            color=COLORS[m], capsize=3)
                ax.errorbar(k + 0.12, 100 * e["acc_ft_mean"], yerr=100 * e["acc_ft_std"], fmt="s",
                            mfc="white", color=COLORS[m], capsize=3)
            pre = [x["test_acc"] for x in ds["pretrained"]]
            ax.axhline(100 * sum(pre) / len(pre), color="k", lw=0.8, ls=":")
            ax.set_xticks(range(len(ms)), ms, rotation=45, fontsize=8)
            n = len(ds["pretrained"])
            ax.set_title(f"{d}, FLOPs {t}: {n} seeds", fontsize=10)
            ax.set_ylabel("test accuracy (%)")
            lo = min(100 * (s[m]["acc_noft_mean"] - s[m]["acc_noft_std"]) for m in ms)
            ax.set_ylim(max(0.0, lo - 3), 100.5 if d != "fashion-mnist" else 95)
            ax.grid(alpha=0.3, axis="y")
    fig.suptitle("structure-only search of a pretrained ResNet, matched FLOPs, BN recalibrated: "
                 "filled = no fine-tune, open = after fine-tune, dotted = unpruned", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def report(out: dict) -> None:
    for d, ds in out["datasets"].items():
        if not ds.get("runs"):
            print(f"\n{d}: {ds.get('missing', 'no runs')}")
            continue
        pre = [x["test_acc"] for x in ds["pretrained"]]
        print(f"\n{d}: pretrained {100 * sum(pre) / len(pre):.2f}%, seeds {len(pre)}")
        for t, st in ds["summary"].items():
            rows = [[m, f"{100 * e['acc_noft_mean']:.2f} ± {100 * e['acc_noft_std']:.2f}",
                     f"{100 * e['acc_ft_mean']:.2f} ± {100 * e['acc_ft_std']:.2f}", e["flops_frac_mean"],
                     e.get("search_frac_mean", float("nan")), e["method_time_s_mean"]]
                    for m, e in st["methods"].items()]
            print(f"FLOPs {t}")
            print(common.table(rows, ["method", "no fine-tune %", "fine-tuned %", "FLOPs", "search ended", "s"]))
            for metric, tt in st["tests"].items():
                for other, r in tt["vs"].items():
                    print(f"  {metric}: DMS - {other} = {100 * r['mean_diff']:+.2f} ± {100 * r['std_diff']:.2f} "
                          f"(wins {r['wins']}/{r['n']}, p_t {r.get('p_ttest', float('nan')):.3g}, "
                          f"p_wilcoxon {r.get('p_wilcoxon', float('nan')):.3g}, p_perm {r['p_permutation']:.3g})")


def markdown(out: dict) -> str:
    """The BENCHMARKS.md tables of a result: accuracy no fine-tune / fine-tuned per method and target, the paired
    tests of DMS against the best other method and against GET."""
    lines: list[str] = []
    for d, ds in out["datasets"].items():
        if not ds.get("runs"):
            continue
        summ = ds.get("summary") or summarize(ds)
        pre = [x["test_acc"] for x in ds["pretrained"]]
        ts = list(summ)
        lines.append(f"**{d}** (pretrained {100 * sum(pre) / len(pre):.2f}%, {len(pre)} seeds; test accuracy %, "
                     "mean ± std; FLOPs: of the export / before the projection, i.e. where the search itself "
                     "ended, or the one-shot common ratio)\n")
        lines.append("| method | " + " | ".join(f"FLOPs {t}: no fine-tune | FLOPs {t}: fine-tuned | FLOPs {t}: "
                                                 "export / before projection" for t in ts) + " |")
        lines.append("|---|" + "---:|---:|---:|" * len(ts))
        for m in METHODS:
            cells = []
            for t in ts:
                e = summ[t]["methods"].get(m)
                if e is None:
                    cells += ["–"] * 3
                    continue
                best = {k: max(summ[t]["methods"].values(), key=lambda x: x[k + "_mean"]) is e
                        for k in ("acc_noft", "acc_ft")}
                sf = e.get("search_frac_mean")
                cells += [("**{}**" if best[k] else "{}").format(f"{100 * e[k + '_mean']:.2f} ± {100 * e[k + '_std']:.2f}")
                          for k in ("acc_noft", "acc_ft")]
                cells.append(f"{e['flops_frac_mean']:.3f} / " + (f"{sf:.3f}" if sf is not None else "–"))
            lines.append(f"| {m} | " + " | ".join(cells) + " |")
        lines.append("")
        for t in ts:
            for metric, tt in summ[t]["tests"].items():
                for other, r in tt["vs"].items():
                    lines.append(f"- FLOPs {t}, {'no fine-tune' if metric == 'acc_noft' else 'fine-tuned'}: DMS − "
                                 f"{other}{' (best other)' if other == tt['best_other'] else ''} = "
                                 f"{100 * r['mean_diff']:+.2f} ± {100 * r['std_diff']:.2f} points, wins "
                                 f"{r['wins']}/{r['n']}, paired t p = {r.get('p_ttest', float('nan')):.3g}, "
                                 f"sign-flip p = {r['p_permutation']:.3g}")
        lines.append("")
    return "\n".join(lines)


def merge(names: list[str], into: str = NAME) -> dict:
    """Merge per-dataset result files (parallel processes) into one JSON and plot."""
    parts = []
    for n in names:
        with open(os.path.join(common.RESULTS, f"{n}.json")) as f:
            parts.append(json.load(f)["datasets"])
    out = common.merge_parts(names)
    for d in out["datasets"]:  # a dataset split over parts by seeds (--first-seed): concatenate the seeds
        split = [p[d] for p in parts if d in p and p[d].get("runs")]
        if len(split) < 2:
            if out["datasets"][d].get("runs"):  # a part saved after a seed (interrupted) has no summary yet
                out["datasets"][d]["summary"] = summarize(out["datasets"][d])
            continue
        ds = dict(next((x for x in split if "pilot" in x), split[0]))
        seeds = [x["seed"] for part in split for x in part["pretrained"]]
        if len(set(seeds)) != len(seeds):
            raise ValueError(f"merge: {d} has seed(s) in more than one part: {sorted(seeds)}")
        if any(part["structure_lr"] != ds["structure_lr"] for part in split):
            raise ValueError(f"merge: the parts of {d} used different structure lrs")
        ds["runs"] = [r for part in split for r in part["runs"]]
        ds["pretrained"] = sorted((x for part in split for x in part["pretrained"]), key=lambda x: x["seed"])
        ds["wall_s"] = max(part.get("wall_s", 0) for part in split)
        ds.pop("partial", None)
        ds["summary"] = summarize(ds)
        out["datasets"][d] = ds
    out["pooled_tests"] = pooled_tests(out["datasets"])
    finish(out, into)
    return out


def finish(out: dict, name: str) -> int:
    """Save, plot, print; the number of exports outside +-1% of their target."""
    bad = [r for ds in out["datasets"].values() for r in ds.get("runs", []) if not r["within_1pct"]]
    out["exports_outside_1pct"] = len(bad)
    path = common.save_result(name, out, indent=None)  # committed: no indentation
    if any(ds.get("runs") for ds in out["datasets"].values()):
        plot(out, common.plot_path(name))
    report(out)
    print(f"\nresults: {path}")
    for r in bad:
        print(f"*** export outside +-1%: {r['dataset']} seed {r['seed']} target {r['target']} {r['method']}: "
              f"{r['flops_frac']:.4f}")
    return len(bad)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="MNIST-5k, 2 seeds, FLOPs 0.3, short search (~3 min)")
    ap.add_argument("--datasets", default=None, help="comma list: fashion-mnist, mnist5k")
    ap.add_argument("--seeds", type=int, default=None)
    ap.add_argument("--first-seed", type=int, default=0, help="seeds first .. first + seeds - 1 (split a run)")
    ap.add_argument("--lr-from", default=None, metavar="NAME",
                    help="take the structure lrs from results/NAME.json (the pilot of another part) instead of a pilot")
    ap.add_argument("--targets", default=None, help="comma list of FLOPs fractions")
    ap.add_argument("--search-steps", type=int, default=None)
    ap.add_argument("--no-pilot", action="store_true", help="skip the lr pilot, use DEFAULT_LR")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--name", default=NAME)
    ap.add_argument("--merge", default=None, help="comma list of result names to merge into --name")
    ap.add_argument("--markdown", default=None, metavar="JSON", help="print the BENCHMARKS.md tables of a result file")
    args = ap.parse_args()
    if args.markdown:
        with open(args.markdown) as f:
            print(markdown(json.load(f)))
        return
    if args.merge:
        sys.exit(1 if merge(args.merge.split(","), args.name)["exports_outside_1pct"] else 0)
    torch.set_num_threads(args.threads)
    cfg = dict(QUICK if args.quick else FULL)
    if args.seeds:
        cfg["seeds"] = args.seeds
    cfg["first_seed"] = args.first_seed
    lr_from: dict = {}
    if args.lr_from:
        with open(os.path.join(common.RESULTS, f"{args.lr_from}.json")) as f:
            lr_from = {d: v["structure_lr"] for d, v in json.load(f)["datasets"].items() if "structure_lr" in v}
    if args.targets:
        cfg["targets"] = [float(x) for x in args.targets.split(",")]
    if args.search_steps:
        cfg["search_steps"] = args.search_steps
    names = (args.datasets or ("mnist5k" if args.quick else "fashion-mnist,mnist5k")).split(",")
    out: dict[str, Any] = {"name": NAME, "quick": args.quick, "threads": args.threads, "config": cfg,
                           "methods": METHODS, "strategies": sorted(STRATEGIES), "datasets": {},
                           "command": "python benchmarks/bench_structure_search.py " + " ".join(sys.argv[1:])}
    t_all = time.perf_counter()
    for name in names:
        if name not in DATASETS:
            sys.exit(f"unknown dataset {name!r}; choose from {sorted(DATASETS)}")
        if name == "fashion-mnist" and not common.ensure_fashion():
            out["datasets"][name] = {"missing": "Fashion-MNIST is not installed (see the message above)"}
            continue
        def partial(ds: dict, name: str = name) -> None:  # an interrupted run keeps its finished seeds
            common.save_result(args.name, {**out, "datasets": {**out["datasets"], name: ds},
                                           "wall_s": time.perf_counter() - t_all})

        if args.lr_from and name not in lr_from:
            sys.exit(f"--lr-from {args.lr_from}: that result has no structure lrs for {name!r}")
        out["datasets"][name] = run_dataset(name, cfg, lambda s: print(s, flush=True),
                                            use_pilot=not (args.quick or args.no_pilot), on_seed=partial,
                                            lrs=lr_from.get(name))
        if args.lr_from:
            out["datasets"][name]["structure_lr_from"] = args.lr_from
        out["wall_s"] = time.perf_counter() - t_all
        common.save_result(args.name, out)  # partial results survive an interrupted run
    out["wall_s"] = time.perf_counter() - t_all
    out["pooled_tests"] = pooled_tests({k: v for k, v in out["datasets"].items() if v.get("runs")})
    sys.exit(1 if finish(out, args.name) else 0)


if __name__ == "__main__":
    main()
