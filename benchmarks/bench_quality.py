"""Quality at equal budget: test accuracy vs FLOPs for DMS pipelines and baselines (the headline plot).

Every method gets the same total number of training steps B (batch 64, SGD + Nesterov, cosine LR),
and a final model of (about) the same FLOPs, given as a fraction of the base model's FLOPs:

* ``DMS``       enlarged supernet (width x1.5, depth x1.5, random init): search 0.25 B, retrain the export 0.75 B
* ``DMS_p``     pretrain the base model 0.4 B, search weights + structure 0.2 B, retrain 0.4 B
* ``DMS_fast``  pretrain 0.4 B, structure-only search 0.1 B (weights frozen, BN in train mode), fine-tune 0.5 B
* ``uniform``   one kept ratio for every width group (the first channels), landed on the budget by the
                projection's fine steps (``common.oneshot_landed(..., "uniform")``), trained from scratch B
* ``L1`` / ``Taylor``  pretrain 0.4 B, one-shot channel pruning (one kept ratio for all layers), fine-tune 0.6 B
* ``random``    random per-layer widths of the same FLOPs, trained from scratch B
* ``base``      the unpruned base model trained B (reference line)

Every model lands within 1% below its FLOPs budget (``dmscale.budget.project``; random architectures by
bisection), and every model that inherits weights (the DMS exports, the one-shot
L1 / Taylor models) has its BatchNorm statistics re-estimated on 20 training batches
(``dmscale.recalibrate_bn``) before it is evaluated or trained further.

The pretraining run (0.4 B) is shared by DMS_p / DMS_fast / L1 / Taylor of a seed. Datasets:
scikit-learn digits (8x8) and Fashion-MNIST (10k training images subsampled, 2k test images; installed
by Debian's ``dataset-fashion-mnist``; falls back to MNIST-5k if unavailable). Mean ± std over seeds.

    python benchmarks/bench_quality.py --quick     # digits, 1 seed, 2 budgets (~3 min)
    python benchmarks/bench_quality.py             # digits + fashion-mnist, 3 seeds, 3 budgets
    # BENCHMARKS.md section 4: Fashion-MNIST (all 60k training images, 10k test), short and 4x budget
    python benchmarks/bench_quality.py --datasets fashion-mnist --limit-train 0 --limit-test 0 --steps 300 \
        --name bench_quality_short
    python benchmarks/bench_quality.py --datasets fashion-mnist --limit-train 0 --limit-test 0 --steps 1200 \
        --name bench_quality_long
    python benchmarks/bench_quality.py --markdown benchmarks/results/bench_quality_short.json \
        benchmarks/results/bench_quality_long.json --plot docs/images/quality_vs_flops.png
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

import dmscale  # noqa: E402
from dmscale.app import zoo  # noqa: E402
from dmscale.app.datasets import load_dataset  # noqa: E402

NAME = "bench_quality"
BN_BATCHES = 20
PRETRAINED = {"DMS_p", "DMS_fast", "L1", "Taylor"}  # the methods that start from the shared 0.4 B pretraining
METHODS = ["DMS", "DMS_p", "DMS_fast", "uniform", "L1", "Taylor", "random"]

CONFIGS = {
    # base model, input resolution handled by stem stride; steps B per method
    "digits": {"widths": (8, 16, 32), "depths": (1, 1, 1), "stem_stride": 1, "steps": 400, "limit_train": None,
               "limit_test": None},
    "fashion-mnist": {"widths": (8, 16, 32), "depths": (1, 1, 1), "stem_stride": 2, "steps": 300,
                      "limit_train": 10000, "limit_test": 2000},
    "mnist5k": {"widths": (8, 16, 32), "depths": (1, 1, 1), "stem_stride": 2, "steps": 300, "limit_train": None,
                "limit_test": None},
}


def flops_of(model: torch.nn.Module, example: torch.Tensor) -> float:
    return dmscale.count(model, (example[:1],))["flops"]


def run_dataset(name: str, seeds: list[int], budgets: list[float], steps: int | None, log,
                limits: tuple[int | None, int | None] = (None, None), methods: list[str] = METHODS) -> dict:
    cfg = dict(CONFIGS[name])
    for key, v in zip(("limit_train", "limit_test"), limits):
        if v is not None:
            cfg[key] = v or None  # 0: every image
    B = steps or cfg["steps"]
    data = load_dataset(name, limit_train=cfg["limit_train"], limit_test=cfg["limit_test"], seed=0)
    xtr, ytr = data.train.tensors
    xte, yte = data.test.tensors
    ex = xtr[:2]
    in_ch = xtr.shape[1]

    def base(seed: int, wm: float = 1.0, dm: float = 1.0) -> torch.nn.Module:
        torch.manual_seed(seed)
        return zoo.build(cfg["widths"], cfg["depths"], in_ch=in_ch, width_mult=wm, depth_mult=dm,
                         stem_stride=cfg["stem_stride"])

    base_flops = flops_of(base(0), ex)
    runs = []
    for seed in seeds:
        def stream(tag: int) -> common.Stream:
            return common.Stream(xtr, ytr, 64, seed * 100 + tag)

        calib = common.recalibrator(stream(12), BN_BATCHES)  # BatchNorm statistics of inherited weights

        t0 = time.perf_counter()
        ref = common.train(base(seed), stream(0), B)
        runs.append({"method": "base", "seed": seed, "budget": 1.0, "flops_frac": 1.0,
                     "acc": common.accuracy(ref, xte, yte), "time_s": time.perf_counter() - t0})
        t0 = time.perf_counter()
        pre = common.train(base(seed), stream(1), int(0.4 * B)) if PRETRAINED & set(methods) else None
        t_pre = time.perf_counter() - t0
        for b in budgets:
            for method in methods:
                t0 = time.perf_counter()
                info: dict = {}
                if method == "DMS":
                    sup = base(seed, 1.5, 1.5)
                    tgt = b * base_flops / flops_of(sup, ex)
                    small, info = common.dms_search(sup, stream(2), int(0.25 * B), tgt, seed=seed,
                                                    recalibrate=calib)
                    common.train(small, stream(3), B - int(0.25 * B))
                elif method == "DMS_p":
                    small, info = common.dms_search(copy.deepcopy(pre), stream(4), int(0.2 * B), b, seed=seed,
                                                    recalibrate=calib)
                    common.train(small, stream(5), B - int(0.4 * B) - int(0.2 * B))
                elif method == "DMS_fast":
                    small, info = common.dms_search(copy.deepcopy(pre), stream(6), int(0.1 * B), b,
                                                    freeze_weights=True, seed=seed, recalibrate=calib)
                    info["acc_before_finetune"] = common.accuracy(small, xte, yte)
                    common.train(small, stream(7), B - int(0.4 * B) - int(0.1 * B))
                elif method == "uniform":  # one width multiplier, landed (a bisected multiplier alone fell to
                    # 0.44 for 0.5: these widths are small integers)
                    shape, _ = common.oneshot_landed(base(seed), ex, b, "uniform")
                    small = common.train(zoo.reinitialize(shape, seed), stream(8), B)
                elif method in ("L1", "Taylor"):
                    small, _ = common.oneshot_landed(pre, ex, b, method.lower(), stream(9))
                    calib(small)
                    info["acc_before_finetune"] = common.accuracy(small, xte, yte)
                    common.train(small, stream(10), B - int(0.4 * B))
                else:  # random
                    small = zoo.reinitialize(common.random_arch(base(seed), ex, b, seed)[0], seed)
                    common.train(small, stream(11), B)
                dt = time.perf_counter() - t0 + (t_pre if method in PRETRAINED else 0)
                acc = common.accuracy(small, xte, yte)
                ff = flops_of(small, ex) / base_flops
                info = {k: v for k, v in info.items() if k != "kept"}
                runs.append({"method": method, "seed": seed, "budget": b, "flops_frac": ff, "acc": acc,
                             "time_s": dt, **info})
                log(f"{name} seed {seed} budget {b:.2f} {method:8s} acc {acc:.4f} flops {ff:.3f} ({dt:.0f}s)")
    agg = aggregate(runs)
    return {"dataset": name, "source": data.source, "train_size": len(xtr), "test_size": len(xte),
            "bn_recalibration_batches": BN_BATCHES,
            "base_model": {k: cfg[k] for k in ("widths", "depths", "stem_stride")}, "base_flops": base_flops,
            "steps_B": B, "batch": 64, "seeds": seeds, "budgets": budgets, "runs": runs, "aggregate": agg}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="digits only, 1 seed, 2 budgets")
    ap.add_argument("--datasets", default=None, help="comma list: digits, fashion-mnist")
    ap.add_argument("--seeds", type=int, default=None)
    ap.add_argument("--steps", type=int, default=None, help="override the per-method step budget B")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    ap.add_argument("--name", default=NAME, help="result file stem (to run datasets in parallel processes)")
    ap.add_argument("--limit-train", type=int, default=None, help="training images (0: all; default per dataset)")
    ap.add_argument("--limit-test", type=int, default=None, help="test images (0: all; default per dataset)")
    ap.add_argument("--budgets", default=None, help="comma list of FLOPs fractions (default 0.25,0.5,0.75)")
    ap.add_argument("--plot", default=None, metavar="PNG", help="with --markdown: one accuracy-vs-FLOPs panel per file")
    ap.add_argument("--methods", default=None, help=f"comma list of methods (default: all of {METHODS})")
    ap.add_argument("--patch", nargs=2, default=None, metavar=("BASE", "EXTRA"),
                    help="rewrite result file BASE with EXTRA's runs of the methods EXTRA ran (a re-run of some "
                         "methods with the same settings), then exit")
    ap.add_argument("--markdown", nargs="+", default=None, metavar="JSON",
                    help="print BENCHMARKS.md tables of these result files (one column pair per file) and exit")
    args = ap.parse_args()
    if args.markdown:
        print(markdown(args.markdown))
        if args.plot:
            plot_regimes(args.markdown, args.plot)
        return
    if args.patch:
        print(patch(*args.patch))
        return
    methods = args.methods.split(",") if args.methods else METHODS
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        ap.error(f"--methods: unknown {unknown}; choose from {METHODS}")
    torch.set_num_threads(args.threads)
    datasets = (args.datasets or ("digits" if args.quick else "digits,fashion-mnist")).split(",")
    seeds = list(range(args.seeds or (1 if args.quick else 3)))
    budgets = [0.25, 0.5] if args.quick else [0.25, 0.5, 0.75]
    if args.budgets:
        budgets = [float(b) for b in args.budgets.split(",")]
    steps = args.steps or (300 if args.quick else None)
    t_all = time.perf_counter()
    out = {"name": NAME, "quick": args.quick, "threads": args.threads, "methods": methods, "datasets": {}}
    for ds in datasets:
        if ds in ("fashion-mnist", "fashion"):
            ds = "fashion-mnist" if common.ensure_fashion() else "mnist5k"  # says clearly when it falls back
        out["datasets"][ds] = run_dataset(ds, seeds, budgets, steps, lambda s: print(s, flush=True),
                                          (args.limit_train, args.limit_test), methods)
        out["wall_s"] = time.perf_counter() - t_all
        common.save_result(args.name, out)  # partial results survive an interrupted run
    out["wall_s"] = time.perf_counter() - t_all
    common.save_result(args.name, out)

    for ds, r in out["datasets"].items():
        print(f"\n{ds}: B = {r['steps_B']} steps/method, seeds {r['seeds']}, test {r['test_size']} images")
        rows = [[a["method"], a["budget"], a["flops_frac_mean"], f"{100 * a['acc_mean']:.2f} ± {100 * a['acc_std']:.2f}",
                 a["time_s_mean"]] for a in r["aggregate"]]
        print(common.table(rows, ["method", "budget", "FLOPs frac", "test acc %", "time s"]))
    plot(out, args.name)


STYLE = {"DMS": ("C3", "o", "-"), "DMS_p": ("C1", "s", "-"), "DMS_fast": ("C5", "^", "-"),
         "uniform": ("C0", "D", "--"), "L1": ("C2", "v", "--"), "Taylor": ("C4", "P", "--"),
         "random": ("C7", "x", ":")}


def plot(out: dict, name: str = NAME) -> None:
    draw([(r, f"{ds}: equal training budget ({r['steps_B']} steps), {len(r['seeds'])} seed(s)")
          for ds, r in out["datasets"].items()], common.plot_path(name))


def draw(panels: list[tuple[dict, str]], path: str) -> None:
    """Accuracy vs FLOPs (mean ± std per method), one panel per (dataset result, title)."""
    p = common.plt()
    fig, axs = p.subplots(1, len(panels), figsize=(6 * len(panels), 4.5), squeeze=False)
    for ax, (r, title) in zip(axs[0], panels):
        for method in METHODS:
            a = sorted((x for x in r["aggregate"] if x["method"] == method), key=lambda x: x["budget"])
            if not a:
                continue
            c, mk, ls = STYLE[method]
            ax.errorbar([x["flops_frac_mean"] for x in a], [100 * x["acc_mean"] for x in a],
                        yerr=[100 * x["acc_std"] for x in a], color=c, marker=mk, ls=ls, capsize=3, label=method)
        b = [x for x in r["aggregate"] if x["method"] == "base"]
        if b:
            ax.axhline(100 * b[0]["acc_mean"], color="k", lw=0.8, ls=":", label="base model (1.0)")
        ax.set(xlabel="FLOPs / base model FLOPs", ylabel="test accuracy (%)", title=title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def aggregate(runs: list[dict]) -> list[dict]:
    """Mean ± std of accuracy, FLOPs fraction and time per (method, budget)."""
    agg = []
    for method in ["base"] + METHODS:
        for b in sorted({r["budget"] for r in runs if r["method"] == method}):
            rs = [r for r in runs if r["method"] == method and r["budget"] == b]
            accs = [r["acc"] for r in rs]
            agg.append({"method": method, "budget": b, "n": len(rs),
                        "acc_mean": statistics.mean(accs), "acc_std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
                        "flops_frac_mean": statistics.mean(r["flops_frac"] for r in rs),
                        "time_s_mean": statistics.mean(r["time_s"] for r in rs)})
    return agg


def patch(base_path: str, extra_path: str) -> str:
    """Replace in ``base_path`` the runs of the methods ``extra_path`` ran (not its ``base`` reference runs); the
    settings (steps, seeds, budgets, data sizes) must match. Records the patch; returns a one-line summary."""
    import json

    base, extra = (json.loads(open(p).read()) for p in (base_path, extra_path))
    methods = [m for m in extra["methods"] if m != "base"]
    for ds, e in extra["datasets"].items():
        if ds not in base["datasets"]:
            raise SystemExit(f"--patch: {extra_path} has dataset {ds!r}, {base_path} does not")
        b = base["datasets"][ds]
        for key in ("steps_B", "seeds", "budgets", "train_size", "test_size"):
            if b[key] != e[key]:
                raise SystemExit(f"--patch: {key} differs ({base_path}: {b[key]}, {extra_path}: {e[key]})")
        b["runs"] = [r for r in b["runs"] if r["method"] not in methods] + \
            [r for r in e["runs"] if r["method"] in methods]
        b["aggregate"] = aggregate(b["runs"])
    base.setdefault("patches", []).append({"methods": methods, "from": os.path.basename(extra_path),
                                           "wall_s": extra.get("wall_s")})
    with open(base_path, "w") as f:
        json.dump(base, f, indent=2)
    return f"{base_path}: runs of {methods} replaced from {extra_path}"


def markdown(paths: list[str]) -> str:
    """One table per dataset: rows method x budget; per result file, test accuracy mean ± std (n seeds), the
    exports' FLOPs fraction, and accuracy before fine-tuning where the method has one (weights inherited)."""
    import json

    runs = [json.loads(open(p).read()) for p in paths]
    out = []
    for ds in sorted({d for r in runs for d in r["datasets"]}):
        parts = [r["datasets"][ds] for r in runs if ds in r["datasets"]]
        head = ["budget", "method"]
        for r in parts:
            head += [f"B = {r['steps_B']}: test acc %", "FLOPs", "before fine-tune %"]
        out.append(f"**{ds}** ({parts[0]['train_size']} training / {parts[0]['test_size']} test images; "
                   + "; ".join(f"B = {r['steps_B']}: seeds {r['seeds']}" for r in parts) + ")\n")
        out.append("| " + " | ".join(head) + " |")
        out.append("|" + "---|" * 2 + "---:|" * (len(head) - 2))
        budgets = sorted({a["budget"] for r in parts for a in r["aggregate"]}, reverse=True)
        for b in budgets:
            for method in ["base"] + METHODS:
                cells = []
                best = {}
                for r in parts:  # bold: the best mean at this budget and step budget
                    accs = [a["acc_mean"] for a in r["aggregate"] if a["budget"] == b and a["method"] != "base"]
                    best[id(r)] = max(accs) if accs else None
                row_has = False
                for r in parts:
                    rs = [x for x in r["runs"] if x["method"] == method and x["budget"] == b]
                    if not rs:
                        cells += ["", "", ""]
                        continue
                    row_has = True
                    m, sd = common.mean_std([100 * x["acc"] for x in rs])
                    acc = f"{m:.2f} ± {sd:.2f}"
                    if method != "base" and abs(m / 100 - best[id(r)]) < 1e-12:
                        acc = f"**{acc}**"
                    ff = common.mean_std([x["flops_frac"] for x in rs])[0]
                    bf = [100 * x["acc_before_finetune"] for x in rs if "acc_before_finetune" in x]
                    cells += [acc, f"{ff:.3f}", f"{common.mean_std(bf)[0]:.1f} ± {common.mean_std(bf)[1]:.1f}"
                              if bf else "—"]
                if row_has:
                    out.append(f"| {b:.2f} | {method} | " + " | ".join(cells) + " |")
        out.append("")
        for r in parts:
            for b in budgets:
                line = paired_line(r, b)
                if line:
                    out.append(f"- B = {r['steps_B']}, FLOPs {b:.2f}: {line}")
        out.append("")
    return "\n".join(out)


def paired_line(r: dict, budget: float) -> str | None:
    """DMS minus the best other method at ``budget`` (by mean), paired by seed: mean ± std of the differences,
    wins, paired t-test and exact sign-flip permutation p (``common.paired_test``)."""
    by: dict[str, dict[int, float]] = {}
    for x in r["runs"]:
        if x["budget"] == budget and x["method"] != "base":
            by.setdefault(x["method"], {})[x["seed"]] = 100 * x["acc"]
    if "DMS" not in by or len(by) < 2:
        return None
    means = {m: statistics.mean(v.values()) for m, v in by.items() if m != "DMS"}
    best = max(means, key=means.__getitem__)
    seeds = sorted(set(by["DMS"]) & set(by[best]))
    if len(seeds) < 2:
        return None
    t = common.paired_test([by["DMS"][s] for s in seeds], [by[best][s] for s in seeds])
    p = f", paired t p = {t['p_ttest']:.2g}" if t.get("p_ttest") is not None else ""
    return (f"DMS − {best} (best other) = {t['mean_diff']:+.2f} ± {t['std_diff']:.2f} points, wins "
            f"{t['wins']}/{t['n']}{p}, sign-flip p = {t['p_permutation']:.2g}")


def plot_regimes(paths: list[str], out: str) -> None:
    """Accuracy vs FLOPs, one panel per result file (e.g. the short and the long training budget)."""
    import json

    runs = [json.loads(open(x).read()) for x in paths]
    draw([(r["datasets"][ds], f"{ds}: {r['datasets'][ds]['steps_B']} steps per method, "
                              f"{len(r['datasets'][ds]['seeds'])} seeds") for r in runs for ds in r["datasets"]], out)


def merge(names: list[str], into: str = NAME) -> dict:
    """Merge per-dataset result files (parallel runs) into one JSON + plot."""
    out = common.merge_parts(names)
    common.save_result(into, out)
    plot(out, into)
    return out


if __name__ == "__main__":
    main()
