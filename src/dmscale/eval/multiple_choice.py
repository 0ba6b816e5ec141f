"""Zero-shot multiple choice: score each choice by its log-likelihood given the context (lm-eval style)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from dmscale.eval.perplexity import _device_of, encode, load_causal_lm, load_tokenizer, logits_of

__all__ = ["multiple_choice", "choice_loglikelihoods", "load_items", "normalize_item", "eval_mc_main"]

_CONTEXT_KEYS = ("context", "query", "question", "prompt", "ctx")
_CHOICE_KEYS = ("choices", "endings", "options")
_LABEL_KEYS = ("label", "gold", "answer")


def normalize_item(item: dict[str, Any], where: str = "item") -> dict[str, Any]:
    """{'context': str, 'choices': [str, ...], 'label': int} from common field names (clear error otherwise)."""
    if not isinstance(item, dict):
        raise TypeError(f"{where}: expected a dict, got {type(item).__name__}")
    ctx = next((item[k] for k in _CONTEXT_KEYS if k in item), None)
    choices = next((item[k] for k in _CHOICE_KEYS if k in item), None)
    label = next((item[k] for k in _LABEL_KEYS if k in item), None)
    if not isinstance(ctx, str):
        raise ValueError(f"{where}: needs a text field 'context' (or {', '.join(_CONTEXT_KEYS[1:])})")
    if not isinstance(choices, (list, tuple)) or len(choices) < 2 or not all(isinstance(c, str) for c in choices):
        raise ValueError(f"{where}: needs 'choices' (or 'endings'/'options'): a list of >= 2 strings")
    if isinstance(label, str) and label in choices:
        label = list(choices).index(label)
    if isinstance(label, str) and len(label) == 1 and label.isalpha():
        label = ord(label.upper()) - ord("A")
    if isinstance(label, str) and label.strip().lstrip("-").isdigit():
        label = int(label)
    if not isinstance(label, int) or isinstance(label, bool) or not 0 <= label < len(choices):
        raise ValueError(f"{where}: 'label' must be the index of the right choice in [0, {len(choices)}), "
                         f"got {label!r}")
    return {"context": ctx, "choices": list(choices), "label": label}


def load_items(path: str | Path) -> list[dict[str, Any]]:
    """Read a JSONL file of items (one JSON object per line; blank lines skipped)."""
    p = Path(path)
    items = []
    with open(p, encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{p}:{n}: not valid JSON: {exc}") from exc
            items.append(normalize_item(obj, f"{p}:{n}"))
    if not items:
        raise ValueError(f"{p}: no items")
    return items


@torch.no_grad()
def choice_loglikelihoods(model: nn.Module, context_ids: list[int], choice_ids: list[list[int]],
                          max_length: int | None = None) -> list[float]:
    """Sum of log p(choice tokens | context) for each choice (context truncated on the left to fit)."""
    if not context_ids:
        raise ValueError("empty context: give the tokenizer a BOS token or a non-empty context")
    dev = _device_of(model)
    out = []
    for ch in choice_ids:
        if not ch:
            raise ValueError("a choice encodes to zero tokens")
        ids = list(context_ids) + list(ch)
        if max_length is not None and len(ids) > max_length:
            ids = ids[len(ids) - max_length:]
            if len(ids) <= len(ch):
                raise ValueError(f"choice of {len(ch)} tokens does not fit max_length={max_length}")
        x = torch.tensor(ids, dtype=torch.long, device=dev)[None]
        logp = F.log_softmax(logits_of(model, x)[0, -len(ch) - 1:-1].float(), dim=-1)
        tgt = torch.tensor(ch, dtype=torch.long, device=dev)
        out.append(float(logp.gather(1, tgt[:, None]).sum()))
    return out


def multiple_choice(model: nn.Module, tokenizer: Any, items: Iterable[dict[str, Any]],
                    max_length: int | None = None, add_bos: bool = True, progress: bool = False) -> dict[str, Any]:
    """Accuracy by total log-likelihood ('acc') and by log-likelihood per character of the choice ('acc_norm')."""
    items = [normalize_item(it, f"item {i}") for i, it in enumerate(items)]
    if not items:
        raise ValueError("multiple_choice: no items")
    bos = getattr(tokenizer, "bos_token_id", None) if add_bos else None
    was = model.training
    model.eval()
    preds, preds_norm, lls = [], [], []
    it: Any = items
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(items, desc="multiple choice", leave=False)
    try:
        for item in it:
            ctx = encode(tokenizer, item["context"])
            if bos is not None:
                ctx = [int(bos)] + ctx
            chs = [encode(tokenizer, c) for c in item["choices"]]
            ll = choice_loglikelihoods(model, ctx, chs, max_length)
            norm = [v / max(1, len(c.encode("utf-8"))) for v, c in zip(ll, item["choices"])]
            lls.append(ll)
            preds.append(max(range(len(ll)), key=ll.__getitem__))
            preds_norm.append(max(range(len(norm)), key=norm.__getitem__))
    finally:
        model.train(was)
    labels = [x["label"] for x in items]
    n = len(items)
    return {"acc": sum(p == y for p, y in zip(preds, labels)) / n,
            "acc_norm": sum(p == y for p, y in zip(preds_norm, labels)) / n,
            "n": n, "predictions": preds, "predictions_norm": preds_norm, "loglikelihoods": lls}


def eval_mc_main(argv: Sequence[str] | None = None) -> int:
    """CLI: ``dmscale eval-mc MODEL_DIR --items FILE.jsonl [--tokenizer T --gguf-file F]``; prints accuracies."""
    ap = argparse.ArgumentParser(prog="dmscale eval-mc", description="Zero-shot multiple-choice accuracy.")
    ap.add_argument("model_dir", help="dmscale.save directory or Hugging Face checkpoint directory")
    ap.add_argument("--items", required=True, help="JSONL: {context, choices, label} per line")
    ap.add_argument("--tokenizer", default=None, help="'bytes' or a tokenizer path (default: the model's)")
    ap.add_argument("--gguf-file", default=None)
    ap.add_argument("--max-length", type=int, default=None)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(list(argv) if argv is not None else None)
    try:
        items = load_items(args.items)
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    model = load_causal_lm(args.model_dir, args.gguf_file, args.device)
    tok = load_tokenizer(args.tokenizer, args.model_dir, args.gguf_file)
    res = multiple_choice(model, tok, items, max_length=args.max_length, progress=True)
    summary = {"model": str(args.model_dir), "items": str(args.items), "n": res["n"], "acc": res["acc"],
               "acc_norm": res["acc_norm"]}
    print(json.dumps(summary) if args.json else
          f"acc {res['acc']:.4f}  acc_norm {res['acc_norm']:.4f}  ({res['n']} items)")
    return 0
