"""``dmscale prune-llm``: prune a causal language model to a budget in one command.

    dmscale prune-llm MODEL --target params=0.8 --text calib.txt --pipeline fast|p
                      [--distill 1.0] [--finetune-steps N] [--uniform] [--eval FILE]
                      [--gguf-file F] [--latency-cache DIR] --out DIR

MODEL is a Hugging Face checkpoint directory (or ``hf:PATH``), a ``.gguf`` file or a directory
with ``--gguf-file``, or a ``dmscale.save`` directory. The calibration text is tokenized with the
model's tokenizer (``--tokenizer`` to choose; ``bytes`` for byte-level models). Its last
``--heldout`` fraction (default 10%) is held out: the perplexity before and after pruning is
measured there, or on ``--eval FILE`` (then all of ``--text`` calibrates).

``--pipeline fast`` is DMS_fast (weights frozen, only the structure learns); ``p`` is DMS_p
(structure and weights together, ``--distill`` adds a KL term to the unpruned model). ``--finetune-steps``
fine-tunes the pruned model afterwards (both pipelines). The output DIR (new or empty) receives the
model in the dmscale format (per-layer sizes: ``dmscale.load(DIR)``), or with ``--uniform`` a plain
Hugging Face checkpoint with the same sizes in every layer (``AutoModelForCausalLM.from_pretrained(DIR)``,
checked on reload), the tokenizer, and ``report.md`` / ``report.json``.

``--target latency=SECONDS`` (or ``latency=50ms``) is one forward of ``--batch-size`` x ``--seq-len``
tokens on ``--device``, measured here (``Target(latency=..., device=..., batch_size=...)``); the report
then has the target, the export's predicted and measured latency and the unpruned model's.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
import torch.nn as nn

__all__ = ["prune_llm", "prune_llm_main", "parse_target", "build_parser", "PruneLLMError"]


class PruneLLMError(ValueError):
    """Bad input to prune-llm (the message names the option, file or value)."""


def parse_target(text: str) -> tuple[str, float]:
    """``params=0.8`` / ``flops=0.5`` / ``0.8`` (params) -> (kind, fraction in (0, 1]); ``latency=0.05`` or
    ``latency=50ms`` -> ("latency", seconds > 0)."""
    kind, _, val = text.partition("=") if "=" in text else ("params", "", text)
    kind = kind.strip().lower()
    if kind not in ("params", "flops", "latency"):
        raise PruneLLMError(f"--target {text!r}: the resource must be params, flops or latency, e.g. params=0.8 "
                            "or latency=50ms")
    num, scale = val.strip(), 1.0
    if kind == "latency":
        for suffix, s in (("ms", 1e-3), ("s", 1.0)):
            if num.lower().endswith(suffix):
                num, scale = num[: -len(suffix)].strip(), s
                break
    try:
        value = float(num) * scale
    except ValueError as e:
        raise PruneLLMError(f"--target {text!r}: {val!r} is not a number" +
                            (" of seconds (latency=0.05 or latency=50ms)" if kind == "latency" else "")) from e
    if kind == "latency" and not (math.isfinite(value) and value > 0.0):
        raise PruneLLMError(f"--target {text!r}: the latency must be a positive, finite number of seconds "
                            "(latency=0.05 or latency=50ms)")
    if kind != "latency" and not (math.isfinite(value) and 0.0 < value <= 1.0):
        raise PruneLLMError(f"--target {text!r}: the fraction must be in (0, 1]")
    return kind, value


def _model_source(model: str, gguf_file: str | None) -> tuple[str, str | None]:
    """(spec for load_model, gguf file name) for MODEL / --gguf-file."""
    if model.startswith("hf:"):
        return model, gguf_file
    p = Path(model).expanduser()
    if p.is_file() and p.suffix.lower() == ".gguf":
        if gguf_file:
            raise PruneLLMError(f"MODEL {model} is a .gguf file; do not also pass --gguf-file")
        return f"hf:{p.parent}", p.name
    if not p.exists():
        raise PruneLLMError(f"MODEL {model}: no such file or directory (give a Hugging Face checkpoint directory, "
                            "a .gguf file, hf:PATH or a dmscale.save directory)")
    if p.is_dir() and ((p / "config.json").is_file() or gguf_file):
        return f"hf:{p}", gguf_file
    return str(p), gguf_file


def _plain_weights(model: nn.Module, source: str) -> None:
    """Detach a GGUF checkpoint's quantizer once its weights were de-quantized to floats, so the pruned
    model saves as a plain checkpoint (``save_pretrained`` refuses a model flagged as GGUF-quantized)."""
    q = getattr(model, "hf_quantizer", None)
    if q is None:
        return
    bad = [n for n, p in model.named_parameters() if not p.is_floating_point()]
    bad += [n for n, m in model.named_modules() if "gguf" in type(m).__name__.lower()]
    dequantized = not getattr(q, "supported", False) or getattr(getattr(q, "quantization_config", None),
                                                               "dequantize", False)
    if bad or not dequantized:
        raise PruneLLMError(f"MODEL {source}: its weights stay quantized ({bad[:3] or 'GGUF blocks'}); prune-llm "
                            "needs floating-point weights (uninstall `kernels` to make transformers de-quantize)")
    model.hf_quantizer = None
    cfg = getattr(model, "config", None)
    if cfg is not None and hasattr(cfg, "quantization_config"):
        delattr(cfg, "quantization_config")


def _count(model: nn.Module) -> tuple[int, int]:
    """(all unique parameters, non-embedding parameters)."""
    from dmscale.recipes.llm import embedding_params

    total = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    return total, total - embedding_params(model)


def _ppl(model: nn.Module, ids: torch.Tensor, length: int, progress: bool) -> float:
    from dmscale.eval.perplexity import perplexity

    return perplexity(model, ids, max_length=length, stride=max(1, length // 2), progress=progress)


def _prepare_out(out: Path) -> Path:
    """Refuse an output that exists and is not an empty directory; return a fresh temp dir beside it."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"--out {out} exists and is not an empty directory; prune-llm never overwrites, "
                              "choose a new directory")
    out.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))  # always a new directory


def _save_tokenizer(tokenizer: Any, d: Path) -> bool:
    tok = getattr(tokenizer, "tok", tokenizer)  # unwrap dmscale.eval's wrapper
    if hasattr(tok, "save_pretrained"):
        tok.save_pretrained(str(d))
        return True
    return False


def save_uniform_checkpoint(model: nn.Module, d: Path, example: torch.Tensor) -> None:
    """``save_pretrained`` a uniform export and check that ``from_pretrained`` rebuilds it (equal logits)."""
    from transformers import AutoModelForCausalLM

    from dmscale.families import uniform_sizes
    from dmscale.eval.perplexity import logits_of
    from dmscale.export import ExportError

    if uniform_sizes(model) is None:
        raise ExportError("--uniform: the pruned layers differ in size; this is a bug in the uniform export")
    model.save_pretrained(str(d))
    dtype = next(model.parameters()).dtype
    try:
        again = AutoModelForCausalLM.from_pretrained(str(d), dtype=dtype).eval()
    except Exception as e:
        raise ExportError(f"--uniform: from_pretrained({d}) cannot rebuild the pruned model ({type(e).__name__}: "
                          f"{e}); its config cannot express these sizes: search with --no-prune-heads, or "
                          "drop --uniform to save in the dmscale format") from e
    was = model.training
    model.eval()
    with torch.no_grad():
        ref = logits_of(model, example).float()
        got = logits_of(again.to(example.device), example).float()
    model.train(was)
    err = float((got - ref).abs().max())
    if not err <= 1e-5 * (1 + float(ref.abs().max())):
        raise ExportError(f"--uniform: from_pretrained({d}) logits differ from the pruned model by {err:.3g}; "
                          "drop --uniform to save in the dmscale format")


def _target_md(r: dict[str, Any]) -> str:
    t = r["target"]
    if t["kind"] == "latency":
        lat = r["latency"]
        return (f"- target: latency {lat['target_s'] * 1e3:.3f} ms per forward of {lat['batch_size']} x "
                f"{lat['seq_len']} tokens on {lat['device']} (= {t['supernet_fraction']:.4f} of the unpruned "
                "model's predicted latency)")
    return (f"- target: {t['kind']} {t['given']} "
            + ("of all parameters" if t["kind"] == "flops" or t["count_embeddings"]
               else "of the non-embedding parameters") + f" (= {t['supernet_fraction']:.4f} of the model)")


def _latency_md(lat: dict[str, Any], uniform: bool) -> list[str]:
    """The latency section: target, the export's predicted and measured latency, the unpruned model's."""
    def ms(key: str) -> str:
        return f"{lat[key] * 1e3:.3f} ms" if key in lat else "not measured"
    return [
        "## Latency", "",
        f"One forward of {lat['batch_size']} x {lat['seq_len']} tokens on {lat['device']}.", "",
        "| | latency |", "|---|---|",
        f"| target | {ms('target_s')} |",
        f"| export, predicted (latency model) | {ms('predicted_s')} |",
        f"| export, measured | {ms('measured_s')} |",
        f"| unpruned model, predicted | {ms('supernet_s')} |", "",
        (f"The search was landed on its measured latency ({lat['checks']} timed exports)"
         + ("; the uniform export (equal sizes in every layer) was timed once more: that is the measured value."
            if uniform else ".")) if lat.get("checks") else "The export was not timed (latency model only).",
        *([f"Measurement table: `{lat['cache']}`."] if lat.get("cache") else []), "",
    ]


def _report_md(r: dict[str, Any]) -> str:
    ppl = r["perplexity"]
    lines = [
        "# dmscale prune-llm report", "",
        f"- model: `{r['model']}` ({r['model_class']})",
        f"- pipeline: {r['pipeline']} ({r['steps']} search steps, {r['finetune_steps']} fine-tuning steps"
        + (f", distillation weight {r['distill']}" if r["distill"] else "") + ")",
        _target_md(r),
        f"- calibration text: `{r['text']['source']}` ({r['text']['train_tokens']} tokens, tokenizer {r['text']['tokenizer']})",
        f"- output: `{r['out']}` ({r['format']})", "",
        "| | parameters | non-embedding | perplexity |", "|---|---|---|---|",
        f"| before | {r['params_before']['total']:,} | {r['params_before']['non_embedding']:,} | {ppl['before']:.4f} |",
        f"| after | {r['params_after']['total']:,} | {r['params_after']['non_embedding']:,} | {ppl['after']:.4f} |",
        "",
        f"Perplexity on {ppl['source']} ({ppl['tokens']} tokens, window {ppl['window']}, stride {ppl['stride']}).",
        f"Hard resource of the export: params {r['params_frac']:.4f}, FLOPs {r['flops_frac']:.4f} of the original "
        f"(target {r['target']['supernet_fraction']:.4f}). Wall time {r['seconds']:.1f} s.", "",
        *(_latency_md(r["latency"], r["uniform"]) if "latency" in r else []),
        "## Structure", "", "```", r["summary"], "```", "",
    ]
    return "\n".join(lines)


@contextlib.contextmanager
def _target_errors(target: str) -> Iterator[None]:
    """A target the model cannot meet (DMS refuses it when it is built) as a PruneLLMError naming --target."""
    try:
        yield
    except ValueError as e:
        if str(e).lower().startswith(("target(latency=", "target latency=", "target flops=", "target params=")):
            raise PruneLLMError(f"--target {target!r}: {e}") from e
        raise


def _search(pipeline: str, net: nn.Module, ids: torch.Tensor, tgt: Any, common: dict[str, Any],
            finetune_steps: int, lr: float, distill: float) -> tuple[nn.Module, dict[str, Any]]:
    """DMS_fast (structure only) or DMS_p (with its fine-tuning) on the calibration ids: (pruned, log)."""
    from dmscale.recipes.llm import dms_fast, dms_p

    if pipeline == "fast":
        return dms_fast(net, ids, tgt, **common)
    return dms_p(net, ids, tgt, finetune_steps=finetune_steps, lr=lr, distill=distill, **common)


def prune_llm(model: str, *, text: str, out: str, target: str = "params=0.8", pipeline: str = "fast",
              steps: int = 200, finetune_steps: int = 0, distill: float = 0.0, uniform: bool = False,
              eval_file: str | None = None, gguf_file: str | None = None, tokenizer: str | None = None,
              heldout: float = 0.1, seq_len: int = 256, batch_size: int = 1, lr: float = 2e-5,
              lr_structure: float = 0.01, prune_heads: bool = True, prune_depth: bool = False,
              count_embeddings: bool = False, eval_length: int | None = None, max_eval_tokens: int = 16384,
              seed: int = 0, device: str = "cpu", latency_cache: str | None = None, progress: bool = True,
              echo: Any = print) -> dict[str, Any]:
    """Run the prune-llm command (see the module docstring); returns the report dict (also in DIR/report.json)."""
    from dmscale.app.datasets import load_text
    from dmscale.app.models import load_model
    from dmscale.eval.perplexity import load_tokenizer
    from dmscale.recipes.llm import finetune, params_target
    from dmscale.schedule import Target
    from dmscale.serialization.format import save

    t0 = time.perf_counter()
    if pipeline not in ("fast", "p"):
        raise PruneLLMError(f"--pipeline {pipeline!r}: choose fast (DMS_fast) or p (DMS_p)")
    kind, frac = parse_target(target)
    if latency_cache is not None and kind != "latency":
        raise PruneLLMError(f"--latency-cache {latency_cache}: applies to --target latency=SECONDS only")
    if latency_cache is not None and Path(latency_cache).exists() and not Path(latency_cache).is_dir():
        raise PruneLLMError(f"--latency-cache {latency_cache}: not a directory")
    for name, val, lo in (("--steps", steps, 1), ("--finetune-steps", finetune_steps, 0), ("--seq-len", seq_len, 2),
                          ("--batch-size", batch_size, 1), ("--max-eval-tokens", max_eval_tokens, 2)):
        if int(val) != val or val < lo:
            raise PruneLLMError(f"{name} {val}: must be an integer >= {lo}")
    for name, val in (("--distill", distill), ("--lr", lr), ("--lr-structure", lr_structure)):
        if not math.isfinite(val) or val < 0:
            raise PruneLLMError(f"{name} {val}: must be a finite number >= 0")
    if distill and pipeline == "fast" and not finetune_steps:
        raise PruneLLMError("--distill applies to --pipeline p and to --finetune-steps; DMS_fast alone trains no weights")
    spec, gguf = _model_source(model, gguf_file)
    text_path = Path(text)
    if eval_file is not None and not Path(eval_file).is_file():
        raise PruneLLMError(f"--eval {eval_file}: no such file")
    out_dir = Path(out)
    tmp = _prepare_out(out_dir)
    try:
        echo(f"dmscale prune-llm: loading {spec}" + (f" (GGUF {gguf})" if gguf else ""))
        kw: dict[str, Any] = {"dtype": torch.float32} if spec.startswith("hf:") else {}
        if gguf:
            kw["gguf_file"] = gguf
        net = load_model(spec, kw, task="causal-lm" if spec.startswith("hf:") else None, device=device).eval()
        _plain_weights(net, model)
        model_dir = spec[3:] if spec.startswith("hf:") else spec
        tok = load_tokenizer(tokenizer, model_dir, gguf)
        data = load_text(text_path, tok, heldout_fraction=0.0 if eval_file else heldout)
        if eval_file:
            held = load_text(eval_file, tok, heldout_fraction=0.0).train
            held_src = f"{eval_file} (--eval)"
        else:
            held = data.heldout
            held_src = f"the last {heldout:.0%} of {text_path} (held out from calibration)"
        vocab = getattr(getattr(net, "config", None), "vocab_size", None)
        top = max(int(data.train.max()), int(held.max()) if held.numel() else 0)
        if vocab is not None and top >= vocab:
            raise PruneLLMError(f"the tokenizer produced id {top} >= the model's vocabulary {vocab}; pass --tokenizer "
                                "(the model's own tokenizer directory)")
        if held.numel() < 2:
            raise PruneLLMError(f"{held_src} has {held.numel()} tokens; perplexity needs at least 2 "
                                "(raise --heldout or pass --eval FILE)")
        if data.train.numel() < seq_len + 1:
            raise PruneLLMError(f"{text_path}: {data.train.numel()} calibration tokens are fewer than --seq-len+1 = "
                                f"{seq_len + 1}; give more text or a smaller --seq-len")
        held = held[:max_eval_tokens]
        max_pos = getattr(getattr(net, "config", None), "max_position_embeddings", None)
        length = int(eval_length or min(512, max_pos or 512, held.numel()))
        before_total, before_ne = _count(net)
        ppl_before = _ppl(net, held, length, progress)
        echo(f"perplexity before: {ppl_before:.4f} on {held_src} ({held.numel()} tokens)")
        if kind == "latency":  # seconds per forward of one window: batch_size x seq_len tokens on device
            tgt = Target(latency=frac, device=device, batch_size=batch_size)
        else:
            tgt = params_target(net, frac, count_embeddings) if kind == "params" else Target(flops=frac)
        common = dict(steps=steps, seq_len=seq_len, batch_size=batch_size, lr_structure=lr_structure,
                      prune_heads=prune_heads, prune_depth=prune_depth, uniform=uniform, seed=seed, progress=progress,
                      dms_kwargs={"latency_cache": latency_cache} if latency_cache else None)
        teacher = None
        with _target_errors(target):
            pruned, log = _search(pipeline, net, data.train, tgt, common, finetune_steps, lr, distill)
        if pipeline == "fast":
            if finetune_steps:
                if distill:
                    teacher = net  # DMS_fast left the original model unchanged
                    for p in teacher.parameters():
                        p.requires_grad_(False)
                log["finetune"] = finetune(pruned, data.train, finetune_steps, lr=lr, seq_len=seq_len,
                                           batch_size=batch_size, teacher=teacher, distill=distill, seed=seed + 2,
                                           progress=progress)
                pruned.eval()
        ppl_after = _ppl(pruned, held, length, progress)
        echo(f"perplexity after:  {ppl_after:.4f} ({log['pipeline']}, target {target})")
        if uniform:
            save_uniform_checkpoint(pruned, tmp, held[: min(64, held.numel())][None].to(device))
            fmt = "Hugging Face checkpoint: AutoModelForCausalLM.from_pretrained(DIR)"
        else:
            save(pruned, tmp, meta={"kind": "prune-llm", "source": model, "pipeline": log["pipeline"]})
            fmt = "dmscale format: dmscale.load(DIR)"
        has_tok = _save_tokenizer(tok, tmp)
        after_total, after_ne = _count(pruned)
        report = {
            "model": model, "gguf_file": gguf, "model_class": type(pruned).__name__, "pipeline": log["pipeline"],
            "steps": steps, "finetune_steps": finetune_steps, "distill": distill, "uniform": uniform,
            "target": {"kind": kind, "given": frac, "count_embeddings": count_embeddings,
                       "supernet_fraction": float(log["target"]["fraction"])},
            "text": {"source": data.source, "train_tokens": int(data.train.numel()),
                     "tokenizer": type(getattr(tok, "tok", tok)).__name__, "tokenizer_saved": has_tok},
            "perplexity": {"before": ppl_before, "after": ppl_after, "source": held_src, "tokens": int(held.numel()),
                           "window": length, "stride": max(1, length // 2)},
            "params_before": {"total": before_total, "non_embedding": before_ne},
            "params_after": {"total": after_total, "non_embedding": after_ne},
            "params_frac": float(log["params_frac"]), "flops_frac": float(log["flops_frac"]),
            "kept": {k: list(v) for k, v in log["kept"].items()}, "summary": log["summary"],
            "history": log["history"], "finetune": log.get("finetune", []), "format": fmt,
            "out": str(out_dir), "seconds": time.perf_counter() - t0,
        }
        if kind == "latency":
            report["latency"] = {**log["latency"], "seq_len": seq_len, "cache": latency_cache}
        (tmp / "report.json").write_text(json.dumps(report, indent=1, default=float) + "\n", encoding="utf-8")
        (tmp / "report.md").write_text(_report_md(report), encoding="utf-8")
        if out_dir.exists():
            out_dir.rmdir()  # empty (checked above)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    echo(f"wrote {out_dir} ({fmt}); report: {out_dir / 'report.md'}")
    echo(f"parameters {before_total:,} -> {after_total:,} (non-embedding {before_ne:,} -> {after_ne:,}); "
         f"perplexity {ppl_before:.4f} -> {ppl_after:.4f}")
    return report


def build_parser() -> argparse.ArgumentParser:
    """Arguments of ``dmscale prune-llm``."""
    ap = argparse.ArgumentParser(prog="dmscale prune-llm", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", help="Hugging Face checkpoint directory (or hf:PATH), a .gguf file, or a dmscale.save "
                    "directory")
    ap.add_argument("--text", required=True, help="UTF-8 calibration text (its last --heldout fraction is held out)")
    ap.add_argument("--out", required=True, help="output directory (new or empty)")
    ap.add_argument("--target", default="params=0.8",
                    help="params=F (fraction of the non-embedding parameters, default 0.8), flops=F, or "
                    "latency=SECONDS (or latency=50ms): one forward of --batch-size x --seq-len tokens on --device, "
                    "measured on this machine")
    ap.add_argument("--pipeline", choices=("fast", "p"), default="fast",
                    help="fast: DMS_fast (structure only); p: DMS_p (structure and weights)")
    ap.add_argument("--steps", type=int, default=200, help="search steps (default 200)")
    ap.add_argument("--finetune-steps", type=int, default=0, help="fine-tuning steps after the export (default 0)")
    ap.add_argument("--distill", type=float, default=0.0,
                    help="weight of KL(unpruned || pruned) in DMS_p and fine-tuning (default 0: off)")
    ap.add_argument("--uniform", action="store_true",
                    help="same sizes in every layer; write a plain Hugging Face checkpoint")
    ap.add_argument("--eval", dest="eval_file", help="text file for the perplexity (default: the held-out slice)")
    ap.add_argument("--gguf-file", help="GGUF file name inside the MODEL directory (model and tokenizer)")
    ap.add_argument("--tokenizer", help="'bytes', or a tokenizer directory (default: the model's)")
    ap.add_argument("--heldout", type=float, default=0.1, help="held-out fraction of --text (default 0.1)")
    ap.add_argument("--seq-len", type=int, default=256, help="tokens per training window (default 256)")
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--lr", type=float, default=2e-5, help="weight learning rate (DMS_p, fine-tuning)")
    ap.add_argument("--lr-structure", type=float, default=0.01, help="structure learning rate")
    ap.add_argument("--no-prune-heads", dest="prune_heads", action="store_false", help="keep every attention head")
    ap.add_argument("--prune-depth", action="store_true", help="also search the number of layers")
    ap.add_argument("--count-embeddings", action="store_true",
                    help="params=F is a fraction of all parameters, embeddings included")
    ap.add_argument("--eval-length", type=int, help="perplexity window (default min(512, context))")
    ap.add_argument("--max-eval-tokens", type=int, default=16384, help="score at most this many tokens")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--latency-cache", help="directory for the latency measurement table (dmscale-latency.json), "
                    "reused by later runs on this machine (--target latency=... only)")
    ap.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    return ap


def prune_llm_main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``dmscale prune-llm`` (exit 0 ok, 2 bad input, 1 failed export, 130 interrupted)."""
    from dmscale.app.models import ModelSpecError
    from dmscale.export import ExportError

    a = build_parser().parse_args(list(argv) if argv is not None else None)
    try:
        prune_llm(a.model, text=a.text, out=a.out, target=a.target, pipeline=a.pipeline, steps=a.steps,
                  finetune_steps=a.finetune_steps, distill=a.distill, uniform=a.uniform, eval_file=a.eval_file,
                  gguf_file=a.gguf_file, tokenizer=a.tokenizer, heldout=a.heldout, seq_len=a.seq_len,
                  batch_size=a.batch_size, lr=a.lr, lr_structure=a.lr_structure, prune_heads=a.prune_heads,
                  prune_depth=a.prune_depth, count_embeddings=a.count_embeddings, eval_length=a.eval_length,
                  max_eval_tokens=a.max_eval_tokens, seed=a.seed, device=a.device, latency_cache=a.latency_cache,
                  progress=not a.quiet)
    except ExportError as e:
        print(f"dmscale prune-llm: export failed: {e}", file=sys.stderr)
        return 1
    except (PruneLLMError, ModelSpecError, FileNotFoundError, FileExistsError, ValueError) as e:
        print(f"dmscale prune-llm: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ndmscale prune-llm: interrupted; nothing was written", file=sys.stderr)
        return 130
    return 0
