"""Search overhead: one DMS training step vs one plain training step of the same supernet (CPU).

DMS step  = forward (masks via hooks) + ``dms.loss`` (resource loss) + backward + SGD step + ``dms.step()``.
plain step = forward + backward + SGD step of an identical, unwrapped copy of the model.

Models: the ResNet-style CNN of ``dmscale.app.zoo`` (32x32 input, batch 64) and a small GPT-2
(HF ``GPT2LMHeadModel`` from a config: 4 layers, n_embd 256, 4 heads, seq 128, batch 8; vocab 8192
so that the transformer blocks, not the LM head, dominate). The two steps are timed in alternating
rounds (same noise), median over all repeats. The DMS step is then broken down (same run):
mask computation (``begin_forward``), the resource loss forward+backward, ``dms.step()``, and a
cProfile of whole DMS steps (top functions by own time) to show where the overhead sits.

    python benchmarks/bench_overhead.py [--quick] [--device cuda]

``--device cuda`` runs both steps on the GPU (each timed call ends with a device synchronize);
GPT-2 needs ``transformers`` and is skipped (and recorded as such) without it.
"""

from __future__ import annotations

import argparse
import cProfile
import importlib.util
import io
import os
import pstats
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

import dmscale  # noqa: E402
from dmscale.app.zoo import ResNet  # noqa: E402

NAME = "bench_overhead"


def make_cnn(seed: int) -> tuple[nn.Module, tuple, torch.Tensor, callable]:
    torch.manual_seed(seed)
    m = ResNet(widths=(16, 32, 64), depths=(2, 2, 2), n_classes=10, in_ch=3)
    x = torch.randn(64, 3, 32, 32)
    y = torch.randint(0, 10, (64,))
    return m, (x,), y, lambda out, y: F.cross_entropy(out, y)


def make_gpt(seed: int) -> tuple[nn.Module, tuple, torch.Tensor, callable]:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(n_layer=4, n_embd=256, n_head=4, n_positions=128, vocab_size=8192,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    m = GPT2LMHeadModel(cfg)
    m.config.use_cache = False
    x = torch.randint(0, 8192, (8, 128))

    def loss_fn(out, y):
        logits = out.logits if hasattr(out, "logits") else out[0]
        return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), y[:, 1:].reshape(-1))
    return m, (x,), x, loss_fn


MODELS = {"cnn": make_cnn, "gpt2": make_gpt}


def run_model(key: str, quick: bool, device: str = "cpu") -> dict:
    make = MODELS[key]
    plain, inputs, y, loss_fn = make(0)
    sup, _, _, _ = make(0)
    plain.to(device)
    sup.to(device)
    inputs = tuple(t.to(device) for t in inputs)
    y = y.to(device)
    plain.train()
    sup.train()
    opt_p = torch.optim.SGD(plain.parameters(), lr=0.01, momentum=0.9)
    total = 10_000
    dms = dmscale.DMS(sup, inputs, dmscale.Target(flops=0.5), total_steps=total, warn=False)
    opt_d = common.two_group_opt(dms, lr_w=0.01, lr_s=5e-3)

    def plain_step():
        out = plain(*inputs)
        loss = loss_fn(out, y)
        opt_p.zero_grad(set_to_none=True)
        loss.backward()
        opt_p.step()

    def dms_step():
        out = sup(*inputs)
        loss = dms.loss(loss_fn(out, y))
        opt_d.zero_grad(set_to_none=True)
        loss.backward()
        opt_d.step()
        dms.step()

    # move ratios off 1.0 first so that masks are genuinely partial (as mid-search)
    for _ in range(3):
        dms_step()
    with torch.no_grad():
        for g in dms.groups:
            if g.kind != "depth":
                dms.space.ratio(g).fill_(0.7)
    rounds, reps = (2, 2) if quick else (5, 4)
    if device == "cuda":  # GPU steps are fast: more repeats for stable medians
        rounds, reps = (3, 10) if quick else (5, 20)
    plain_step, dms_step = common.synced(plain_step, device), common.synced(dms_step, device)
    t = common.interleaved({"plain": plain_step, "dms": dms_step}, rounds=rounds, repeats=reps, warmup=2)
    ratio = t["dms"]["median"] / t["plain"]["median"]

    # breakdown of the DMS-only work, same run
    def masks():
        dms.masker.begin_forward()
        dms.masker.current.clear()

    def res_loss():
        r = dms.resource_loss()
        if r.requires_grad:
            r.backward()
        for p in dms.structure_parameters():
            p.grad = None

    def fb_plain():
        loss_fn(plain(*inputs), y).backward()

    def fb_soft():
        loss_fn(sup(*inputs), y).backward()

    def fb_off():
        with dms.unmasked():  # hooks still fire but return at once: the cost of the hook machinery
            loss_fn(sup(*inputs), y).backward()

    parts = common.interleaved({k: common.synced(f, device) for k, f in {
                                "begin_forward (all masks)": masks, "resource loss fwd+bwd": res_loss,
                                "dms.step()": dms.step,
                                "fwd+bwd plain": fb_plain,
                                "fwd+bwd DMS soft masks": fb_soft,
                                "fwd+bwd DMS masks off (hooks only)": fb_off}.items()},
                               rounds=rounds, repeats=reps, warmup=1)
    n_mask_hooks = sum(1 for r in dms.trace.layers.values()
                       if any(dms.masker.prunable(s) for s in r.out_dims.values()))
    n_block_gates = len(dms.masker.block_gate)
    # cProfile of whole DMS steps: where does the Python time go?
    pr = cProfile.Profile()
    n_prof = 2 if quick else 5
    pr.enable()
    for _ in range(n_prof):
        dms_step()
    pr.disable()
    s = io.StringIO()
    st = pstats.Stats(pr, stream=s)
    st.sort_stats("tottime").print_stats(18)
    prof_lines = [ln for ln in s.getvalue().splitlines() if ln.strip()][:40]
    # per-file totals (own time) for dmscale and torch hooks
    by_file: dict[str, float] = {}
    for (fname, _, _), (_, _, tt, _, _) in st.stats.items():
        tag = ("dmscale/" + os.path.basename(fname)) if "dmscale" in fname else (
            "torch.nn.modules.module" if fname.endswith("torch/nn/modules/module.py") else
            "torch (other python)" if "/torch/" in fname else
            "builtins/C" if fname == "~" else "other")
        by_file[tag] = by_file.get(tag, 0.0) + tt / n_prof
    return {
        "model": key,
        "device": device,
        "groups": len(dms.groups),
        "layers_with_output_mask": n_mask_hooks, "layers_total": len(dms.trace.layers),
        "block_gates": n_block_gates,
        "group_kinds": sorted({g.kind for g in dms.groups}),
        "plain_step_s": t["plain"]["median"], "dms_step_s": t["dms"]["median"],
        "plain_iqr_s": t["plain"]["iqr"], "dms_iqr_s": t["dms"]["iqr"],
        "ratio": ratio, "goal": 1.3, "met": ratio <= 1.3,
        "breakdown_s": {k: v["median"] for k, v in parts.items()},
        "profile_own_time_per_step_s": dict(sorted(by_file.items(), key=lambda kv: -kv[1])),
        "profile_top": prof_lines,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--models", default="cnn,gpt2")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (default 1: reproducible ratios on a shared machine)")
    ap.add_argument("--name", default=NAME, help="result file stem")
    common.device_arg(ap)
    args = ap.parse_args()
    dev = common.check_device(args.device)
    torch.set_num_threads(args.threads)
    res, skipped = {}, {}
    for key in args.models.split(","):
        print(f"--- {key}", flush=True)
        if key == "gpt2" and importlib.util.find_spec("transformers") is None:
            skipped[key] = "transformers is not installed"
            print("   skipped: transformers is not installed", flush=True)
            continue
        res[key] = run_model(key, args.quick, dev)
        r = res[key]
        print(f"plain {r['plain_step_s'] * 1e3:.1f} ms  dms {r['dms_step_s'] * 1e3:.1f} ms  ratio {r['ratio']:.2f}x  "
              f"({r['layers_with_output_mask']}/{r['layers_total']} layers multiply a mask into their output, "
              f"{r['block_gates']} block gates)")
        for k, v in r["breakdown_s"].items():
            print(f"   {k:30s} {v * 1e3:8.2f} ms")
        print("   cProfile own time per DMS step by file:")
        for k, v in list(r["profile_own_time_per_step_s"].items())[:8]:
            print(f"      {k:30s} {v * 1e3:8.2f} ms")
    common.save_result(args.name, {"name": args.name, "quick": args.quick, "device": dev, "results": res,
                                   "skipped": skipped,
                                   "timing": "interleaved rounds, median step time; ratio = dms / plain, same run"
                                             + ("; each call ends with torch.cuda.synchronize()" if dev == "cuda" else "")})
    rows = [[k, r["plain_step_s"] * 1e3, r["dms_step_s"] * 1e3, r["ratio"], "yes" if r["met"] else "NO"]
            for k, r in res.items()]
    print()
    print(common.table(rows, ["model", "plain ms", "DMS ms", "ratio", "<= 1.3x"]))

    p = common.plt()
    fig, ax = p.subplots(figsize=(6, 4))
    keys = list(res)
    xs = range(len(keys))
    ax.bar([i - 0.2 for i in xs], [res[k]["plain_step_s"] * 1e3 for k in keys], 0.4, label="plain step")
    ax.bar([i + 0.2 for i in xs], [res[k]["dms_step_s"] * 1e3 for k in keys], 0.4, label="DMS step")
    for i, k in enumerate(keys):
        ax.text(i + 0.2, res[k]["dms_step_s"] * 1e3, f"{res[k]['ratio']:.2f}x", ha="center", va="bottom")
    ax.set_xticks(list(xs), keys)
    ax.set_ylabel("step time (ms, median)")
    ax.set_title(f"DMS search step vs plain training step ({dev.upper()})")
    ax.legend()
    fig.tight_layout()
    fig.savefig(common.plot_path(args.name), dpi=120)


if __name__ == "__main__":
    main()
