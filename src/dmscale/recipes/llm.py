"""LLM pipelines: DMS_fast (structure only), DMS_p (structure + weights, optional distillation), one-shot
magnitude/Taylor baselines with uniform per-layer ratios, fine-tuning, and a uniform Hugging Face export.

Memory (what scales with the model): DMS itself adds one kept-ratio scalar and one importance
vector per searched dimension (heads, FFN width per layer; depth; optionally hidden): a few
hundred KB even for 7B. The soft masks multiply activations, so a masked forward keeps about
one extra activation tensor per masked layer for backward. DMS_fast freezes the weights: no
weight gradients or optimizer state, only activations (use ``gradient_checkpointing=True`` for
long sequences / 7B). DMS_p trains the weights: gradients + optimizer state (AdamW: 2 fp32
copies) and, with distillation, a frozen teacher copy of the model (or pass ``teacher=``).
"""

from __future__ import annotations

import contextlib
import copy
import re
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from dmscale.export import ExportError
from dmscale.schedule import Target
from dmscale.search import DMS

__all__ = ["tokenize", "sample_windows", "lm_loss", "distill_loss", "embedding_module_names",
           "embedding_params", "params_target", "build_llm_dms", "run_search", "enforce_target",
           "dms_fast", "dms_p", "finetune", "oneshot_prune", "magnitude_importance", "uniform_ratios", "export_uniform",
           "ONESHOT_METHODS"]

ONESHOT_METHODS = ("magnitude", "taylor", "random")


# ------------------------------------------------------------------ data and losses
def tokenize(text: str, tokenizer: Any = None) -> torch.Tensor:
    """1-D LongTensor of token ids for a corpus (dmscale ByteTokenizer when tokenizer is None)."""
    from dmscale.app.datasets import ByteTokenizer
    from dmscale.eval.perplexity import encode

    tok = tokenizer if tokenizer is not None else ByteTokenizer()
    if hasattr(tok, "encode_tensor"):
        return tok.encode_tensor(text)
    return torch.tensor(encode(tok, text), dtype=torch.long)


def sample_windows(ids: torch.Tensor, seq_len: int, batch_size: int, generator: torch.Generator) -> torch.Tensor:
    """A (batch_size, seq_len) batch of random contiguous windows of the token stream."""
    n = ids.numel()
    if n < seq_len + 1:
        raise ValueError(f"token stream of {n} tokens is shorter than seq_len+1={seq_len + 1}")
    starts = torch.randint(0, n - seq_len, (batch_size,), generator=generator)
    return torch.stack([ids[s:s + seq_len] for s in starts.tolist()])


def _logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    from dmscale.eval.perplexity import logits_of

    return logits_of(model, x)


def lm_loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy of logits (B, T, V) on ids (B, T)."""
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1))


def distill_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """KL(teacher || student) on softened logits, times T^2 (per token, mean)."""
    t = float(temperature)
    s = F.log_softmax(student.float() / t, dim=-1).reshape(-1, student.shape[-1])
    p = F.log_softmax(teacher.float() / t, dim=-1).reshape(-1, teacher.shape[-1])
    return F.kl_div(s, p, log_target=True, reduction="batchmean") * t * t


# ------------------------------------------------------------------ targets and DMS construction
def embedding_module_names(model: nn.Module) -> list[str]:
    """Names of the input-embedding and LM-head modules (excluded when the hidden size is not searched)."""
    mods = {id(m): n for n, m in model.named_modules()}
    out = []
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        fn = getattr(model, getter, None)
        m = fn() if callable(fn) else None
        if isinstance(m, nn.Module) and id(m) in mods:
            out.append(mods[id(m)])
    return out


def _unique_params(model: nn.Module) -> dict[int, nn.Parameter]:
    return {id(p): p for p in model.parameters()}


def embedding_params(model: nn.Module) -> int:
    """Parameters of the input embedding and LM head (counted once when tied)."""
    seen: dict[int, int] = {}
    for name in embedding_module_names(model):
        for p in model.get_submodule(name).parameters():
            seen[id(p)] = p.numel()
    return sum(seen.values())


def params_target(model: nn.Module, fraction: float, count_embeddings: bool = False) -> Target:
    """Params target keeping ``fraction`` of the (non-embedding, by default) parameters, as a supernet fraction.

    Embeddings and the LM head are most of a small LLM (28 M of SmolLM2-135M's 135 M) and are
    not pruned unless the hidden size is searched, so "prune 20 %" means 20 % of the rest.
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    total = sum(p.numel() for p in _unique_params(model).values())
    if count_embeddings:
        return Target(params=float(fraction))
    emb = embedding_params(model)
    return Target(params=(emb + fraction * (total - emb)) / total)


def _first_layer_prefix(name: str) -> tuple[str, int, str] | None:
    m = re.match(r"^(.*?)\.(\d+)\.(.+)$", name)
    return (m.group(1), int(m.group(2)), m.group(3)) if m else None


def build_llm_dms(model: nn.Module, example_ids: torch.Tensor, target: Target, total_steps: int, *,
                  prune_hidden: bool = False, prune_heads: bool = True, prune_depth: bool = False,
                  importance: str = "taylor", exclude: Sequence[str] = (), **dms_kwargs: Any) -> DMS:
    """A ``DMS`` over heads (GQA-aware), FFN width, optionally depth and hidden size of a causal LM.

    Works with SDPA and eager attention alike: the tracer ties each KV head to its query heads
    through SDPA's grouped heads or eager attention's ``repeat_kv`` broadcast.
    """
    if example_ids.dim() != 2:
        raise ValueError(f"example_ids must be (batch, seq), got shape {tuple(example_ids.shape)}")
    cfg = getattr(model, "config", None)
    excl = list(exclude)
    if not prune_hidden:
        excl += embedding_module_names(model)
    kw: dict[str, Any] = {"example_kwargs": {"use_cache": False}} if cfg is not None else {}
    kw.update(dms_kwargs)
    warn = bool(kw.pop("warn", True))
    dms = DMS(model, (example_ids,), target, total_steps, importance=importance, exclude=excl,
              prune_heads=prune_heads, prune_depth=prune_depth, warn=False, **kw)
    # HF builds its attention mask with torch.diff on position ids in the top-level model (no channel dim)
    other = {op: mods for op, mods in dms.trace.unsupported.items()
             if not (op == "diff" and all("." not in m for m in mods))}
    if warn and other:
        warnings.warn("dmscale: these ops have no channel rule, the dimensions they touch are left unpruned:" +
                      "".join(f"\n  {op} (in {', '.join(m or 'model' for m in mods[:3])})"
                              for op, mods in other.items()), stacklevel=2)
    return dms


# ------------------------------------------------------------------ search loop
def _params_of(dms: DMS, kind: str) -> float:
    with torch.no_grad():
        return float(dms.resource(soft=False)[f"{kind}_frac"])


@torch.no_grad()
def enforce_target(dms: DMS, iters: int = 40) -> float:
    """Shrink all width/head ratios by one common factor until the hard resource meets the target.

    A search that has not quite reached its budget (too few steps, too low a structure lr) would
    otherwise export a larger model than the baselines it is compared with. Returns the factor.
    """
    kind, goal = dms.target.kind, dms.target.fraction
    if _params_of(dms, kind) <= goal + 1e-9:
        return 1.0
    groups = [g for g in dms.groups if g.kind != "depth"]
    base = {g.key: dms.space.ratio(g).detach().clone() for g in groups}

    def apply(s: float) -> float:
        for g in groups:
            dms.space.ratio(g).copy_(torch.clamp(base[g.key] * s, min=g.min_ratio()))
        return _params_of(dms, kind)

    lo, hi = 0.0, 1.0
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        if apply(mid) <= goal + 1e-9:
            lo = mid
        else:
            hi = mid
    apply(lo)
    return lo


def run_search(dms: DMS, train_ids: torch.Tensor, steps: int, *, seq_len: int = 256, batch_size: int = 1,
               lr_structure: float = 0.01, weight_optimizer: torch.optim.Optimizer | None = None,
               teacher: nn.Module | None = None, distill: float = 0.0, temperature: float = 1.0,
               seed: int = 0, progress: bool = True, desc: str = "DMS search",
               callback: Callable[[int, dict[str, float]], None] | None = None) -> list[dict[str, float]]:
    """Run ``steps`` DMS steps on random windows of train_ids; returns the per-step history."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    model = dms.model
    dev = next(model.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    s_opt = torch.optim.Adam(dms.structure_parameters(), lr=lr_structure, betas=(0.9, 0.999))
    history: list[dict[str, float]] = []
    it: Any = range(steps)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        it = bar = tqdm(it, desc=desc, leave=False)
    for step in it:
        t0 = time.perf_counter()
        x = sample_windows(train_ids, seq_len, batch_size, gen).to(dev)
        logits = _logits(model, x)
        task = lm_loss(logits, x)
        kl = None
        if teacher is not None and distill > 0:
            with torch.no_grad():
                t_logits = _logits(teacher, x)
            kl = distill_loss(logits[:, :-1], t_logits[:, :-1], temperature)
            task = task + distill * kl
        loss = dms.loss(task)
        s_opt.zero_grad(set_to_none=True)
        if weight_optimizer is not None:
            weight_optimizer.zero_grad(set_to_none=True)
        loss.backward()
        s_opt.step()
        if weight_optimizer is not None:
            weight_optimizer.step()
        dms.step()
        rec = {"step": step + 1, "loss": float(dms.last.get("task_loss", float(task.detach()))),
               "resource": dms.last.get("resource", float("nan")), "target": dms.last.get("target", float("nan")),
               "seconds": time.perf_counter() - t0}
        if kl is not None:
            rec["kl"] = float(kl.detach())
        history.append(rec)
        if bar is not None:
            bar.set_postfix(loss=f"{rec['loss']:.3f}", res=f"{rec['resource']:.3f}", tgt=f"{rec['target']:.3f}")
        if callback is not None:
            callback(step + 1, rec)
    return history


@contextlib.contextmanager
def _frozen(model: nn.Module) -> Iterator[None]:
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, f in flags:
            p.requires_grad_(f)


EXPORT_ATOL = 5e-3  # export check: a 30-layer fp32 LLM sums in a different order once sliced (logits ~ +-30)


def _finish(dms: DMS, uniform: bool, remove: bool, check: bool,
            atol: float = EXPORT_ATOL) -> tuple[nn.Module, dict[str, Any]]:
    info: dict[str, Any] = {"enforce_scale": enforce_target(dms)}
    ctx = uniform_ratios(dms) if uniform else contextlib.nullcontext()
    with ctx:
        with torch.no_grad():
            r = dms.resource(soft=False)
        info.update({"kept": dms.kept(), "summary": dms.summary(), "params_frac": float(r["params_frac"]),
                     "flops_frac": float(r["flops_frac"])})
        exported = dms.export(check=check, atol=atol, rtol=1e-3)
    if remove:
        dms.remove()
    return exported, info


def dms_fast(model: nn.Module, train_ids: torch.Tensor, target: Target, *, steps: int = 200, seq_len: int = 256,
             batch_size: int = 1, lr_structure: float = 0.01, prune_hidden: bool = False, prune_heads: bool = True,
             prune_depth: bool = False, uniform: bool = False, gradient_checkpointing: bool = False,
             seed: int = 0, progress: bool = True, check: bool = True, remove: bool = True,
             dms_kwargs: dict[str, Any] | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """DMS_fast: learn only the structure (weights frozen) on text, export; returns (model, log).

    ``remove`` takes the masks out of ``model`` afterwards (it is left as it was); pass False to keep
    the search state in ``log['dms']`` (e.g. for :func:`export_uniform`).
    """
    t0 = time.perf_counter()
    gen = torch.Generator().manual_seed(seed)
    example = sample_windows(train_ids, min(seq_len, 64), 1, gen)
    was = model.training
    model.eval()
    if gradient_checkpointing and hasattr(model, "gradient_checkpointing_enable"):
        model.train()  # HF checkpointing is active in training mode only (dropout is 0 in these LLMs)
        model.gradient_checkpointing_enable()
    try:
        with _frozen(model):
            dms = build_llm_dms(model, example, target, steps, prune_hidden=prune_hidden, prune_heads=prune_heads,
                                prune_depth=prune_depth, **(dms_kwargs or {}))
            history = run_search(dms, train_ids, steps, seq_len=seq_len, batch_size=batch_size,
                                 lr_structure=lr_structure, seed=seed + 1, progress=progress, desc="DMS_fast")
            exported, info = _finish(dms, uniform, remove, check)
    finally:
        if gradient_checkpointing and hasattr(model, "gradient_checkpointing_disable"):
            model.gradient_checkpointing_disable()
        model.train(was)
    exported.eval()
    for p in exported.parameters():  # copied while the weights were frozen
        p.requires_grad_(True)
    log = {"pipeline": "DMS_fast", "target": {"kind": target.kind, "fraction": target.fraction}, "steps": steps,
           "history": history, "seconds": time.perf_counter() - t0, **info}
    if not remove:
        log["dms"] = dms
    return exported, log


def finetune(model: nn.Module, train_ids: torch.Tensor, steps: int, *, lr: float = 2e-5, seq_len: int = 256,
             batch_size: int = 1, teacher: nn.Module | None = None, distill: float = 0.0,
             temperature: float = 1.0, weight_decay: float = 0.0, seed: int = 0, progress: bool = True,
             desc: str = "fine-tune") -> list[dict[str, float]]:
    """AdamW fine-tuning of all weights on random windows (+ optional KL distillation); returns history."""
    if steps <= 0:
        return []
    dev = next(model.parameters()).device
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("finetune: every parameter has requires_grad=False")
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    gen = torch.Generator().manual_seed(seed)
    was = model.training
    model.train()
    history = []
    it: Any = range(steps)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        it = bar = tqdm(it, desc=desc, leave=False)
    try:
        for step in it:
            x = sample_windows(train_ids, seq_len, batch_size, gen).to(dev)
            logits = _logits(model, x)
            loss = ce = lm_loss(logits, x)
            rec = {"step": step + 1}
            if teacher is not None and distill > 0:
                with torch.no_grad():
                    t_logits = _logits(teacher, x)
                kl = distill_loss(logits[:, :-1], t_logits[:, :-1], temperature)
                loss = ce + distill * kl
                rec["kl"] = float(kl.detach())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            rec["loss"] = float(ce.detach())
            history.append(rec)
            if bar is not None:
                bar.set_postfix(loss=f"{rec['loss']:.3f}")
    finally:
        model.train(was)
    return history


def dms_p(model: nn.Module, train_ids: torch.Tensor, target: Target, *, steps: int = 200,
          finetune_steps: int = 0, seq_len: int = 256, batch_size: int = 1, lr: float = 2e-5,
          lr_structure: float = 0.01, distill: float = 0.0, temperature: float = 1.0,
          teacher: nn.Module | None = None, prune_hidden: bool = False, prune_heads: bool = True,
          prune_depth: bool = False, uniform: bool = False, gradient_checkpointing: bool = False, seed: int = 0,
          progress: bool = True, check: bool = True, remove: bool = True,
          dms_kwargs: dict[str, Any] | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """DMS_p: learn structure and weights together from the pretrained model, export, fine-tune; (model, log).

    With ``distill > 0`` the loss adds ``distill * KL(teacher || student)`` on the logits; the teacher
    is a frozen copy of the unpruned model taken before the search (or ``teacher=``). The weights
    of ``model`` are trained in place.
    """
    t0 = time.perf_counter()
    if distill > 0 and teacher is None:
        teacher = copy.deepcopy(model).eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
    gen = torch.Generator().manual_seed(seed)
    example = sample_windows(train_ids, min(seq_len, 64), 1, gen)
    was = model.training
    model.train()
    if gradient_checkpointing and hasattr(model, "gradient_checkpointing_enable"):
        model.gradient_checkpointing_enable()
    try:
        dms = build_llm_dms(model, example, target, steps, prune_hidden=prune_hidden, prune_heads=prune_heads,
                            prune_depth=prune_depth, **(dms_kwargs or {}))
        w_opt = torch.optim.AdamW(dms.weight_parameters(), lr=lr, weight_decay=0.0)
        history = run_search(dms, train_ids, steps, seq_len=seq_len, batch_size=batch_size,
                             lr_structure=lr_structure, weight_optimizer=w_opt, teacher=teacher, distill=distill,
                             temperature=temperature, seed=seed + 1, progress=progress, desc="DMS_p search")
        del w_opt
        model.eval()
        exported, info = _finish(dms, uniform, remove, check)
    finally:
        if gradient_checkpointing and hasattr(model, "gradient_checkpointing_disable"):
            model.gradient_checkpointing_disable()
        model.train(was)
    ft = finetune(exported, train_ids, finetune_steps, lr=lr, seq_len=seq_len, batch_size=batch_size,
                  teacher=teacher, distill=distill, temperature=temperature, seed=seed + 2, progress=progress,
                  desc="DMS_p fine-tune")
    exported.eval()
    log = {"pipeline": "DMS_p", "target": {"kind": target.kind, "fraction": target.fraction}, "steps": steps,
           "finetune_steps": finetune_steps, "distill": distill, "history": history, "finetune": ft,
           "seconds": time.perf_counter() - t0, **info}
    if not remove:
        log["dms"] = dms
    return exported, log


# ------------------------------------------------------------------ one-shot baselines
def _leaf_index(space: Any, leaf: Any) -> torch.Tensor:
    """For each position of a (possibly composite) space, the index of the leaf's element there, else -1."""
    r = space.find()
    if r.kind == "atomic":
        return torch.arange(r.size) if r is leaf.find() else torch.full((r.size,), -1, dtype=torch.long)
    parts = [_leaf_index(c, leaf) for c in r.children]
    if r.kind == "concat":
        return torch.cat(parts)
    out = parts[0]
    for p in parts[1:]:  # product: row-major, as the masker builds composite masks
        a = out[:, None].expand(-1, p.numel())
        b = p[None, :].expand(out.numel(), -1)
        out = torch.where(a >= 0, a, b).reshape(-1)
    return out


@torch.no_grad()
def magnitude_importance(dms: DMS) -> None:
    """L1 norm of all weights each element owns (heads included: through the heads x head_dim products)."""
    mods = dict(dms.model.named_modules())
    for g in dms.groups:
        if g.space is None:
            continue
        imp = torch.zeros(g.size, dtype=torch.float64)
        for rec in dms.trace.params.values():
            if rec.is_buffer:
                continue
            p = getattr(mods[rec.module], rec.attr, None)
            if not isinstance(p, torch.Tensor):
                continue
            for d, sp in enumerate(rec.dims):
                if not any(lf is g.space.find() for lf in sp.leaves()):
                    continue
                idx = _leaf_index(sp, g.space)
                per = p.detach().abs().double().movedim(d, 0).reshape(p.shape[d], -1).sum(1).cpu()
                keep = idx >= 0
                imp.index_add_(0, idx[keep], per[keep])
        dms.space.importance(g).copy_(imp.to(dms.space.importance(g)))


@torch.no_grad()
def _set_all_ratios(dms: DMS, groups: list, r: float) -> None:
    for g in groups:
        dms.space.ratio(g).fill_(max(float(r), g.min_ratio()))


def oneshot_prune(model: nn.Module, method: str, target: Target, *, calib_ids: torch.Tensor | None = None,
                  calib_batches: int = 4, seq_len: int = 256, batch_size: int = 1, prune_heads: bool = True,
                  prune_hidden: bool = False, seed: int = 0, check: bool = True,
                  progress: bool = False) -> tuple[nn.Module, dict[str, Any]]:
    """LLM-Pruner-style one-shot pruning: rank elements by magnitude/Taylor, one kept ratio for every layer.

    ``magnitude``: L1 norm of each element's weights. ``taylor``: (m * dL/dm)^2 of each element's mask,
    moving average over ``calib_batches`` backward passes with the weights frozen. ``random``: random
    ranks. The common ratio is bisected to the largest one meeting the target (hard counts); the
    masks are made sharp so no soft mask value is folded into the kept weights.
    """
    if method not in ONESHOT_METHODS:
        raise ValueError(f"method must be one of {ONESHOT_METHODS}, got {method!r}")
    if method == "taylor" and calib_ids is None:
        raise ValueError("oneshot_prune(method='taylor') needs calib_ids (token ids for the backward passes)")
    t0 = time.perf_counter()
    gen = torch.Generator().manual_seed(seed)
    if calib_ids is not None:
        example = sample_windows(calib_ids, min(seq_len, 64), 1, gen)
    else:
        vocab = int(getattr(getattr(model, "config", None), "vocab_size", 2))
        example = torch.randint(0, vocab, (1, min(seq_len, 64)), generator=gen)
    was = model.training
    model.eval()
    try:
        with _frozen(model):
            dms = build_llm_dms(model, example, target, 1, prune_hidden=prune_hidden, prune_heads=prune_heads,
                                prune_depth=False, importance="taylor", warn=False)
            groups = [g for g in dms.groups if g.kind != "depth"]
            with torch.no_grad():
                for g in groups:  # masks ~1 everywhere while gradients are collected
                    dms.space.ratio(g).fill_(2.0)
            if method == "taylor":
                for g in groups:
                    dms.space.importance(g).zero_()
                it: Any = range(calib_batches)
                if progress:
                    from tqdm.auto import tqdm

                    it = tqdm(it, desc="Taylor importance", leave=False)
                for _ in it:
                    x = sample_windows(calib_ids, seq_len, batch_size, gen).to(next(model.parameters()).device)
                    lm_loss(_logits(model, x), x).backward()
                for p in dms.structure_parameters():
                    p.grad = None
            elif method == "magnitude":
                magnitude_importance(dms)
            elif method == "random":
                for g in groups:
                    dms.space.importance(g).copy_(torch.rand(g.size, generator=gen))
            for g in groups:
                g.lam = 1e4 * g.size  # sharp masks: kept elements are multiplied by exactly 1
            kind, goal = target.kind, target.fraction
            lo, hi = 0.0, 1.0
            for _ in range(40):
                mid = 0.5 * (lo + hi)
                _set_all_ratios(dms, groups, mid)
                if _params_of(dms, kind) <= goal + 1e-9:
                    lo = mid
                else:
                    hi = mid
            _set_all_ratios(dms, groups, lo)
            with torch.no_grad():
                r = dms.resource(soft=False)
            info = {"pipeline": f"oneshot-{method}", "ratio": lo, "kept": dms.kept(), "summary": dms.summary(),
                    "params_frac": float(r["params_frac"]), "flops_frac": float(r["flops_frac"])}
            exported = dms.export(check=check, atol=EXPORT_ATOL, rtol=1e-3)
            dms.remove()
    finally:
        model.train(was)
    exported.eval()
    for p in exported.parameters():  # copied while the weights were frozen
        p.requires_grad_(True)
    info["seconds"] = time.perf_counter() - t0
    return exported, info


# ------------------------------------------------------------------ uniform export
def _layer_classes(dms: DMS) -> dict[str, list]:
    """Per-layer groups by role ('model.layers.*.mlp.gate_proj'): the ones a uniform export equalises."""
    classes: dict[str, list] = {}
    for g in dms.groups:
        if g.kind == "depth":
            continue
        parts = _first_layer_prefix(g.name)
        if parts is None:
            continue
        classes.setdefault(f"{parts[0]}.*.{parts[2]}", []).append(g)
    return {k: v for k, v in classes.items() if len(v) > 1}


def _dropped_layers(dms: DMS) -> set[str]:
    out: set[str] = set()
    with torch.no_grad():
        for g in dms.groups:
            if g.kind == "depth":
                keep = dms.space.keep(g)
                out |= {b.name for b, k in zip(g.blocks, keep.tolist()) if not k}
    return out


@contextlib.contextmanager
def uniform_ratios(dms: DMS) -> Iterator[dict[str, int]]:
    """Temporarily give every layer the same kept count per role (mean over kept layers, each layer's
    most important elements) so the export is expressible by a Hugging Face config; yields the counts."""
    saved = {g.key: dms.space.ratio(g).detach().clone() for g in dms.groups}
    dropped = _dropped_layers(dms)
    counts: dict[str, int] = {}
    try:
        with torch.no_grad():
            for cls, groups in _layer_classes(dms).items():
                sizes = {g.size for g in groups}
                if len(sizes) != 1:
                    raise ValueError(f"uniform export: layers differ in full size for {cls}: {sorted(sizes)}")
                n = sizes.pop()
                live = [g for g in groups if f"{_first_layer_prefix(g.name)[0]}.{_first_layer_prefix(g.name)[1]}"
                        not in dropped] or groups
                k = int(round(sum(int(dms.space.keep(g).sum()) for g in live) / len(live)))
                k = max(k, max(g.min_count() for g in groups))
                for g in groups:
                    for r in ((k + 0.45) / n, k / n, (k + 0.25) / n, (k - 0.25) / n):
                        dms.space.ratio(g).fill_(r)
                        if g.hard_count(dms.space.soft_mask(g)) == k:
                            break
                    else:
                        raise RuntimeError(f"uniform export: cannot make {g.name} keep exactly {k} of {n}")
                counts[cls] = k
        yield counts
    finally:
        with torch.no_grad():
            for g in dms.groups:
                dms.space.ratio(g).copy_(saved[g.key])


def export_uniform(dms: DMS, out_dir: str | Path, *, tokenizer: Any = None, check: bool = True,
                   atol: float = EXPORT_ATOL) -> nn.Module:
    """Export with equal sizes in every layer and write a plain Hugging Face checkpoint to out_dir.

    ``AutoModelForCausalLM.from_pretrained(out_dir)`` rebuilds it from the edited config; with
    ``check`` that reload is run and its logits compared with the hard-masked (uniform) supernet.
    """
    from dmscale.families import config_describes_model, uniform_sizes

    with uniform_ratios(dms) as counts:
        exported = dms.export(check=check, atol=atol, rtol=1e-3)  # == the hard-masked (uniform) supernet
    if uniform_sizes(exported) is None:
        raise ExportError(f"uniform export: layer sizes still differ after equalising {counts}")
    if not config_describes_model(exported):
        raise ExportError(f"uniform export: the edited {type(exported.config).__name__} cannot describe the export "
                          f"({exported.config.dmscale_inexact}); search with prune_heads=False (and/or "
                          "prune_hidden=False) for this architecture, or save with dmscale.save")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    exported.save_pretrained(str(out))
    if tokenizer is not None:
        tok = getattr(tokenizer, "tok", tokenizer)  # unwrap dmscale.eval's wrapper
        if hasattr(tok, "save_pretrained"):
            tok.save_pretrained(str(out))
    if check:
        from transformers import AutoModelForCausalLM

        dtype = next(exported.parameters()).dtype
        reloaded = AutoModelForCausalLM.from_pretrained(str(out), dtype=dtype).eval()
        was = exported.training
        exported.eval()
        x = dms.example_inputs[0]
        with torch.no_grad():
            ref = _logits(exported, x.to(next(exported.parameters()).device))
            got = _logits(reloaded, x.to(next(reloaded.parameters()).device))
        exported.train(was)
        err = float((got.float().cpu() - ref.float().cpu()).abs().max())
        if not err <= 1e-5 * (1 + float(ref.abs().max())):  # same modules, same weights: equal up to rounding
            raise ExportError(f"uniform export: from_pretrained({out}) logits differ from the exported model "
                              f"by {err:.3g} (the edited config does not describe it)")
    return exported
