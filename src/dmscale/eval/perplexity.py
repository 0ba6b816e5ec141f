"""Sliding-window perplexity of a causal LM on held-out token ids (the standard Hugging Face recipe)."""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["perplexity", "sliding_window_nll", "logits_of", "load_causal_lm", "load_tokenizer", "encode",
           "eval_ppl_main"]


def logits_of(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Logits (batch, seq, vocab) of a causal LM called on ids: HF outputs, tuples and plain tensors."""
    try:
        out = model(ids, use_cache=False)
    except TypeError:  # plain nn.Module without HF kwargs
        out = model(ids)
    if isinstance(out, torch.Tensor):
        return out
    logits = getattr(out, "logits", None)
    if logits is None and isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        logits = out[0]
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"model output {type(out).__name__} has no logits")
    return logits


def _device_of(model: nn.Module) -> torch.device:
    p = next(iter(model.parameters()), None)
    return p.device if p is not None else torch.device("cpu")


@torch.no_grad()
def sliding_window_nll(model: nn.Module, token_ids: torch.Tensor | Sequence[int], max_length: int = 512,
                       stride: int | None = None, progress: bool = False) -> tuple[float, int]:
    """(total NLL in nats, scored tokens): each window of max_length scores only the tokens no earlier window scored."""
    ids = torch.as_tensor(token_ids, dtype=torch.long).reshape(-1)
    n = ids.numel()
    if n < 2:
        raise ValueError(f"perplexity needs at least 2 tokens, got {n}")
    if max_length < 2:
        raise ValueError(f"max_length must be >= 2, got {max_length}")
    stride = max_length if stride is None else int(stride)
    if not 1 <= stride <= max_length:
        raise ValueError(f"stride must be in [1, max_length={max_length}], got {stride}")
    dev = _device_of(model)
    was = model.training
    model.eval()
    total, count, prev_end = 0.0, 0, 0
    starts = list(range(0, n, stride))
    it: Any = starts
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(starts, desc="perplexity", leave=False)
    try:
        for begin in it:
            end = min(begin + max_length, n)
            new = end - max(prev_end, begin + 1)  # tokens of this window no earlier window scored
            if new > 0:
                window = ids[begin:end].to(dev)[None]
                logits = logits_of(model, window)[0, -new - 1:-1].float()
                targets = window[0, -new:]
                total += float(F.cross_entropy(logits, targets, reduction="sum"))
                count += new
            prev_end = end
            if end == n:
                break
    finally:
        model.train(was)
    return total, count


def perplexity(model: nn.Module, token_ids: torch.Tensor | Sequence[int], max_length: int = 512,
               stride: int | None = None, progress: bool = False) -> float:
    """exp(mean NLL) over every token but the first, windows of max_length moved by stride (context overlap)."""
    total, count = sliding_window_nll(model, token_ids, max_length, stride, progress)
    return math.exp(total / count)


# ------------------------------------------------------------------ loading (shared with the CLI)
def load_causal_lm(path: str | Path, gguf_file: str | None = None, device: str = "cpu",
                   dtype: torch.dtype = torch.float32) -> nn.Module:
    """A dmscale-format directory (``dmscale.save``) or a Hugging Face checkpoint / GGUF, in eval mode."""
    p = Path(path)
    if (p / "structure.json").is_file():
        from dmscale.serialization.format import load

        model = load(p, device=device)
    else:
        from transformers import AutoModelForCausalLM

        kw: dict[str, Any] = {"dtype": dtype}
        if gguf_file:
            kw["gguf_file"] = gguf_file
        model = AutoModelForCausalLM.from_pretrained(str(p), **kw).to(device)
    return model.eval()


class _HFTok:
    """Thin wrapper giving a Hugging Face tokenizer the ``encode(text) -> list[int]`` interface (no specials)."""

    def __init__(self, tok: Any) -> None:
        self.tok = tok
        self.vocab_size = len(tok)
        self.bos_token_id = getattr(tok, "bos_token_id", None)

    def encode(self, text: str) -> list[int]:
        """Text -> ids, without added special tokens."""
        return list(self.tok(text, add_special_tokens=False)["input_ids"])

    def decode(self, ids: Any) -> str:
        """Ids -> text."""
        return self.tok.decode(ids)


def load_tokenizer(spec: str | None, model_dir: str | Path | None = None, gguf_file: str | None = None) -> Any:
    """'bytes' -> ByteTokenizer; a path/name -> AutoTokenizer; None -> try model_dir (and its GGUF), else bytes."""
    from dmscale.eval.tokenizers import ByteTokenizer

    if spec == "bytes":
        return ByteTokenizer()
    src = spec if spec is not None else (str(model_dir) if model_dir is not None else None)
    if src is None:
        return ByteTokenizer()
    try:
        from transformers import AutoTokenizer

        kw = {"gguf_file": gguf_file} if gguf_file else {}
        return _HFTok(AutoTokenizer.from_pretrained(src, **kw))
    except Exception as exc:
        if spec is not None:
            raise ValueError(f"could not load tokenizer {spec!r}: {exc}") from exc
        return ByteTokenizer()


def encode(tokenizer: Any, text: str) -> list[int]:
    """Token ids of text without special tokens, for dmscale's ByteTokenizer or any HF tokenizer."""
    if isinstance(tokenizer, _HFTok):
        return tokenizer.encode(text)
    if hasattr(tokenizer, "encode"):
        try:
            return list(tokenizer.encode(text, add_special_tokens=False))
        except TypeError:  # dmscale.app.datasets.ByteTokenizer and other plain encoders
            return list(tokenizer.encode(text))
    if callable(tokenizer):
        return list(tokenizer(text)["input_ids"])
    raise TypeError(f"tokenizer {type(tokenizer).__name__} has no encode()")


def _build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="dmscale eval-ppl",
                                 description="Sliding-window perplexity of a causal LM on a text file.")
    ap.add_argument("model_dir", help="dmscale.save directory or Hugging Face checkpoint directory")
    ap.add_argument("--text", required=True, help="UTF-8 text file to score")
    ap.add_argument("--max-length", type=int, default=512, help="window length in tokens (default 512)")
    ap.add_argument("--stride", type=int, default=None, help="window step in tokens (default: max-length/2)")
    ap.add_argument("--tokenizer", default=None,
                    help="'bytes', or a tokenizer path/name (default: the model directory's, else bytes)")
    ap.add_argument("--gguf-file", default=None, help="GGUF file name inside model_dir (model and tokenizer)")
    ap.add_argument("--max-tokens", type=int, default=None, help="score only the first N tokens")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    return ap


def eval_ppl_main(argv: Sequence[str] | None = None) -> int:
    """CLI: ``dmscale eval-ppl MODEL_DIR --text FILE [--max-length N --stride N --tokenizer T ...]``; prints ppl."""
    args = _build_parser().parse_args(list(argv) if argv is not None else None)
    text_path = Path(args.text)
    if not text_path.is_file():
        print(f"error: --text {text_path} is not a file", file=sys.stderr)
        return 2
    model = load_causal_lm(args.model_dir, args.gguf_file, args.device)
    tok = load_tokenizer(args.tokenizer, args.model_dir, args.gguf_file)
    ids = encode(tok, text_path.read_text(encoding="utf-8"))
    if args.max_tokens is not None:
        ids = ids[: args.max_tokens]
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if vocab is not None and ids and max(ids) >= vocab:
        print(f"error: tokenizer produced id {max(ids)} >= model vocab {vocab}; pass --tokenizer", file=sys.stderr)
        return 2
    stride = args.stride if args.stride is not None else max(1, args.max_length // 2)
    total, count = sliding_window_nll(model, ids, args.max_length, stride, progress=True)
    ppl = math.exp(total / count)
    res = {"model": str(args.model_dir), "text": str(text_path), "tokens": count + 1, "scored": count,
           "max_length": args.max_length, "stride": stride, "nll": total / count, "ppl": ppl}
    print(json.dumps(res) if args.json else f"perplexity {ppl:.4f} ({count} tokens scored, window "
          f"{args.max_length}, stride {stride})")
    return 0
