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
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.nn as nn

from dmscale.budget import project, within_budget
from dmscale.export import ExportError
from dmscale.recipes import oneshot as _oneshot
from dmscale.recipes import pipelines as _recipes
from dmscale.recipes.tasks import CausalLM, distill_loss, lm_loss, sample_windows, window_batches
from dmscale.schedule import Target
from dmscale.search import DMS

__all__ = ["tokenize", "sample_windows", "lm_loss", "distill_loss", "embedding_module_names",
           "embedding_params", "params_target", "build_llm_dms", "run_search", "enforce_target",
           "dms_fast", "dms_p", "finetune", "oneshot_prune", "magnitude_importance", "uniform_ratios", "export_uniform",
           "ONESHOT_METHODS"]

ONESHOT_METHODS = ("magnitude", "taylor", "random")
EXPORT_ATOL = 5e-3  # export check: a 30-layer fp32 LLM sums in a different order once sliced (logits ~ +-30)


# ------------------------------------------------------------------ data
def tokenize(text: str, tokenizer: Any = None) -> torch.Tensor:
    """1-D LongTensor of token ids for a corpus (dmscale ByteTokenizer when tokenizer is None)."""
    from dmscale.eval.perplexity import encode
    from dmscale.eval.tokenizers import ByteTokenizer

    tok = tokenizer if tokenizer is not None else ByteTokenizer()
    if hasattr(tok, "encode_tensor"):
        return tok.encode_tensor(text)
    return torch.tensor(encode(tok, text), dtype=torch.long)


def _logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    from dmscale.eval.perplexity import logits_of

    return logits_of(model, x)


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


# ------------------------------------------------------------------ search, DMS_fast, DMS_p, fine-tuning
def enforce_target(dms: DMS, iters: int = 40) -> Any:
    """Deprecated (goes away in 0.3): use :func:`dmscale.budget.project`, which the recipes now call.

    Projects the kept ratios onto the target when the search ended above it; returns the
    ``Projection`` (or None when the target was already met)."""
    warnings.warn("dmscale.recipes.llm.enforce_target is deprecated; use dmscale.budget.project",
                  DeprecationWarning, stacklevel=2)
    with torch.no_grad():
        over = not within_budget(dms.resource(soft=False)[f"{dms.target.kind}_frac"], dms.target.fraction)
    return project(dms, iters=iters, warn=False) if over else None


def run_search(dms: DMS, train_ids: torch.Tensor, steps: int, *, seq_len: int = 256, batch_size: int = 1,
               lr_structure: float = 0.01, weight_optimizer: torch.optim.Optimizer | None = None,
               teacher: nn.Module | None = None, distill: float = 0.0, temperature: float = 1.0,
               seed: int = 0, progress: bool = True, desc: str = "DMS search",
               callback: Callable[[int, dict[str, float]], None] | None = None) -> list[dict[str, float]]:
    """Run ``steps`` DMS steps on random windows of train_ids; returns the per-step history.

    The weights train only with a ``weight_optimizer`` (else they are frozen during the search).
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    search = _recipes.Search(dms, train_weights=weight_optimizer is not None, weight_optimizer=weight_optimizer,
                             structure_lr=lr_structure)
    search.steps = int(steps)
    task = CausalLM(teacher=teacher, distill=distill, temperature=temperature)
    on_step = (lambda rec: callback(rec["step"], rec)) if callback is not None else None
    return search.run(task, window_batches(train_ids, seq_len, batch_size, seed), train_mode=dms.model.training,
                      progress=progress, desc=desc, on_step=on_step)


# Rate of the resource weight's multiplier update (DMSConfig.adaptive_weight; library default 1.0) in the LLM
# recipes. At 1.0 the weight grows too slowly against a language model's task loss for searches of a few hundred
# steps: SmolLM2-135M's 24-step DMS_fast stalled at 0.98 of the parameters and the projection did the pruning
# (0.98 -> 0.84). At these rates the search reached the budget by itself in the reduced and the full benchmark
# runs (BENCHMARKS.md, LLM: projections <= 2.7% and <= 0.85% of the target). DMS_p needs more: its CE + KL loss
# resists pruning more (at 5.0 it stalled at 0.887 for 0.842 on 64-token windows). ``dms_kwargs`` overrides.
ADAPTIVE_WEIGHT_FAST = 5.0
ADAPTIVE_WEIGHT_P = 20.0


def _builder(prune_hidden: bool, prune_heads: bool, prune_depth: bool,
             dms_kwargs: dict[str, Any] | None) -> Callable[[nn.Module, tuple, Target, int], DMS]:
    def build(model: nn.Module, example: tuple, target: Target, steps: int) -> DMS:
        return build_llm_dms(model, example[0], target, steps, prune_hidden=prune_hidden, prune_heads=prune_heads,
                             prune_depth=prune_depth, **(dms_kwargs or {}))
    return build


@contextlib.contextmanager
def _checkpointing(model: nn.Module, on: bool) -> Iterator[None]:
    """HF gradient checkpointing for the search (active in training mode only; dropout is 0 in these LLMs)."""
    on = on and hasattr(model, "gradient_checkpointing_enable")
    if on:
        model.gradient_checkpointing_enable()
    try:
        yield
    finally:
        if on:
            model.gradient_checkpointing_disable()


def _log(name: str, info: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """The log of an LLM recipe: the recipe's info (``target``: kind and fraction of the supernet, from
    :func:`dmscale.recipes.pipelines.finish`; ``latency`` under a latency target) plus the pipeline name."""
    log = {"pipeline": name, **info, **extra}
    if "finetune" in log:
        log["finetune"] = _lm_history(log["finetune"])
    return log


def _lm_history(hist: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Fine-tuning records as before: step, loss (= next-token CE, without the KL term), kl."""
    return [{"step": h["step"], "loss": h["ce"], **({"kl": h["kl"]} if "kl" in h else {})} for h in hist]


def _example(ids: torch.Tensor, seq_len: int, seed: int, target: Target) -> tuple:
    """The traced example: one window of 64 tokens at most; a latency target is timed on this example (at the
    target's batch size), so it gets the full ``seq_len`` window: seconds per forward of seq_len tokens."""
    length = seq_len if target.kind == "latency" else min(seq_len, 64)
    return (sample_windows(ids, length, 1, torch.Generator().manual_seed(seed)),)


def dms_fast(model: nn.Module, train_ids: torch.Tensor, target: Target, *, steps: int = 200, seq_len: int = 256,
             batch_size: int = 1, lr_structure: float = 0.01, prune_hidden: bool = False, prune_heads: bool = True,
             prune_depth: bool = False, uniform: bool = False, gradient_checkpointing: bool = False,
             seed: int = 0, progress: bool = True, check: bool = True, remove: bool = True,
             dms_kwargs: dict[str, Any] | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """DMS_fast on text (:func:`dmscale.recipes.pipelines.dms_fast` with a causal-LM task); (model, log).

    The resource weight grows at ``ADAPTIVE_WEIGHT_FAST`` (``dms_kwargs={"adaptive_weight": ...}`` overrides).

    The weights are frozen and ``model`` is left as it was (``remove`` takes the masks out); pass
    ``remove=False`` to keep the search state in ``log['dms']`` (e.g. for :func:`export_uniform`).
    """
    with _checkpointing(model, gradient_checkpointing):
        exported, info = _recipes.dms_fast(
            model, CausalLM(), window_batches(train_ids, seq_len, batch_size, seed + 1), target, steps,
            train_mode=gradient_checkpointing, structure_lr=lr_structure, progress=progress, check=check,
            atol=EXPORT_ATOL, rtol=1e-3, example=_example(train_ids, seq_len, seed, target),
            builder=_builder(prune_hidden, prune_heads, prune_depth,
                             {"adaptive_weight": ADAPTIVE_WEIGHT_FAST, **(dms_kwargs or {})}),
            ratios=uniform_ratios if uniform else None, remove=remove)
    return exported, _log("DMS_fast", info)


def finetune(model: nn.Module, train_ids: torch.Tensor, steps: int, *, lr: float = 2e-5, seq_len: int = 256,
             batch_size: int = 1, teacher: nn.Module | None = None, distill: float = 0.0,
             temperature: float = 1.0, weight_decay: float = 0.0, seed: int = 0, progress: bool = True,
             desc: str = "fine-tune") -> list[dict[str, float]]:
    """AdamW fine-tuning of all weights on random windows (+ optional KL distillation); returns history."""
    task = CausalLM(teacher=teacher, distill=distill, temperature=temperature)
    return _lm_history(_recipes.finetune(model, task, window_batches(train_ids, seq_len, batch_size, seed), steps,
                                         lr=lr, optimizer="adamw", weight_decay=weight_decay, progress=progress,
                                         desc=desc))


def dms_p(model: nn.Module, train_ids: torch.Tensor, target: Target, *, steps: int = 200,
          finetune_steps: int = 0, seq_len: int = 256, batch_size: int = 1, lr: float = 2e-5,
          lr_structure: float = 0.01, distill: float = 0.0, temperature: float = 1.0,
          teacher: nn.Module | None = None, prune_hidden: bool = False, prune_heads: bool = True,
          prune_depth: bool = False, uniform: bool = False, gradient_checkpointing: bool = False, seed: int = 0,
          progress: bool = True, check: bool = True, remove: bool = True,
          dms_kwargs: dict[str, Any] | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """DMS_p on text (:func:`dmscale.recipes.pipelines.dms_p` with a causal-LM task); (model, log).

    The resource weight grows at ``ADAPTIVE_WEIGHT_P`` (``dms_kwargs={"adaptive_weight": ...}`` overrides).

    With ``distill > 0`` the loss adds ``distill * KL(teacher || student)`` on the logits; the teacher
    is a frozen copy of the unpruned model taken before the search (or ``teacher=``). The weights
    of ``model`` are trained in place.
    """
    if distill > 0 and teacher is None:
        teacher = copy.deepcopy(model).eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
    task = CausalLM(teacher=teacher, distill=distill, temperature=temperature)
    with _checkpointing(model, gradient_checkpointing):
        exported, info = _recipes.dms_p(
            model, task, window_batches(train_ids, seq_len, batch_size, seed + 1), target, steps,
            finetune_steps=finetune_steps, finetune_batches=window_batches(train_ids, seq_len, batch_size, seed + 2),
            lr=lr, optimizer="adamw", structure_lr=lr_structure, progress=progress, check=check, atol=EXPORT_ATOL,
            rtol=1e-3, example=_example(train_ids, seq_len, seed, target),
            builder=_builder(prune_hidden, prune_heads, prune_depth,
                             {"adaptive_weight": ADAPTIVE_WEIGHT_P, **(dms_kwargs or {})}),
            ratios=uniform_ratios if uniform else None, remove=remove)
    return exported, _log("DMS_p", info, distill=distill)


# ------------------------------------------------------------------ one-shot baselines
def magnitude_importance(dms: DMS) -> None:
    """L1 norm of all weights each element owns (heads included: through the heads x head_dim products)."""
    _oneshot.l1_importance(dms, [g for g in dms.groups if g.space is not None])


def oneshot_prune(model: nn.Module, method: str, target: Target, *, calib_ids: torch.Tensor | None = None,
                  calib_batches: int = 4, seq_len: int = 256, batch_size: int = 1, prune_heads: bool = True,
                  prune_hidden: bool = False, seed: int = 0, check: bool = True,
                  progress: bool = False) -> tuple[nn.Module, dict[str, Any]]:
    """LLM-Pruner-style one-shot pruning (:func:`dmscale.recipes.oneshot.oneshot`): one kept ratio for every layer.

    ``magnitude``: L1 norm of each element's weights. ``taylor``: (m * dL/dm)^2 of each element's mask,
    moving average over ``calib_batches`` backward passes with the weights frozen. ``random``: random
    ranks. The common ratio is the largest one meeting the target (hard counts).
    """
    if method not in ONESHOT_METHODS:
        raise ValueError(f"method must be one of {ONESHOT_METHODS}, got {method!r}")
    if method == "taylor" and calib_ids is None:
        raise ValueError("oneshot_prune(method='taylor') needs calib_ids (token ids for the backward passes)")
    gen = torch.Generator().manual_seed(seed)
    if calib_ids is not None:
        example = sample_windows(calib_ids, min(seq_len, 64), 1, gen)
    else:
        vocab = int(getattr(getattr(model, "config", None), "vocab_size", 2))
        example = torch.randint(0, vocab, (1, min(seq_len, 64)), generator=gen)
    dms = build_llm_dms(model, example, target, 1, prune_hidden=prune_hidden, prune_heads=prune_heads,
                        prune_depth=False, importance="taylor", warn=False)
    batches = (lambda i: sample_windows(calib_ids, seq_len, batch_size, gen)) if calib_ids is not None else None
    exported, info = _oneshot.oneshot(dms, method, task=CausalLM(), batches=batches, n_batches=calib_batches,
                                      seed=seed, check=check, atol=EXPORT_ATOL, rtol=1e-3, progress=progress)
    info["pipeline"] = f"oneshot-{method}"
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


def _set_uniform_count(dms: DMS, groups: list, k: int, n: int) -> None:
    for g in groups:
        for r in ((k + 0.45) / n, k / n, (k + 0.25) / n, (k - 0.25) / n):
            dms.space.ratio(g).fill_(r)
            if g.hard_count(dms.space.soft_mask(g)) == k:
                break
        else:
            raise RuntimeError(f"uniform export: cannot make {g.name} keep exactly {k} of {n}")


@contextlib.contextmanager
def uniform_ratios(dms: DMS) -> Iterator[dict[str, int]]:
    """Temporarily give every layer the same kept count per role (mean over kept layers, each layer's
    most important elements) so the export is expressible by a Hugging Face config; yields the counts.

    The mean is rounded to the nearest count; a role whose rounding up would take the model over the
    budget the ratios met keeps the mean rounded down instead (kept counts only shrink, so the
    resource does too)."""
    saved = {g.key: dms.space.ratio(g).detach().clone() for g in dms.groups}
    dropped = _dropped_layers(dms)
    counts: dict[str, int] = {}
    try:
        with torch.no_grad():
            kind, goal = dms.target.kind, dms.target_fraction  # a latency target: of the predicted latency

            def frac() -> float:
                return float(dms.resource(soft=False)[f"{kind}_frac"])
            within = within_budget(frac(), goal)
            plan: dict[str, tuple[list, int, int]] = {}
            for cls, groups in _layer_classes(dms).items():
                sizes = {g.size for g in groups}
                if len(sizes) != 1:
                    raise ValueError(f"uniform export: layers differ in full size for {cls}: {sorted(sizes)}")
                n = sizes.pop()
                live = [g for g in groups if f"{_first_layer_prefix(g.name)[0]}.{_first_layer_prefix(g.name)[1]}"
                        not in dropped] or groups
                total = sum(int(dms.space.keep(g).sum()) for g in live)
                least = max(g.min_count() for g in groups)
                k = max(int(round(total / len(live))), least)
                plan[cls] = (groups, n, max(total // len(live), least))
                _set_uniform_count(dms, groups, k, n)
                counts[cls] = k
            for cls, (groups, n, floor) in plan.items():
                if not within or within_budget(frac(), goal):
                    break
                if floor < counts[cls]:
                    _set_uniform_count(dms, groups, floor, n)
                    counts[cls] = floor
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
