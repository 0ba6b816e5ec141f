"""What a run trains on: the data's batches, the model (the built-in ResNet family or the user's ``--model``),
its supernet, the task (loss) and the metric a run reports.

The pieces depend on the kind of data:

========  =====================================  ================================  ==================
data      batches                                loss (without ``--loss``)          metric
========  =====================================  ================================  ==================
images    ``(x, y)`` (an image folder, ``.npz``,  cross-entropy                     test accuracy
          a built-in set)                        (:class:`ImageClassification`)
text      ``(B, seq_len)`` token windows          next-token loss (:class:`CausalLM`) held-out perplexity
========  =====================================  ================================  ==================

``--loss pkg.module:function`` replaces the loss (``fn(model, batch) -> loss`` or ``(loss, metrics)``) and the
metric becomes the mean of that loss on the test split. ``--distill W`` adds ``W * KL(teacher || student)``
with the unpruned (pretrained) model as the teacher.

The supernet of ``dmscale search`` on a user model (:func:`user_supernet`): the factory with
``model.supernet_kwargs`` (its own width/depth arguments), else the model widened by
:func:`dmscale.upscale` by the integer ``model.supernet_width_mult``, else the model itself (no
enlargement); in every case randomly initialised (:func:`random_init`), as DMS searches from scratch.
"""

from __future__ import annotations

import json
import math
from typing import Any, Callable

import torch
import torch.nn as nn

from dmscale.app.config import ConfigError, RunConfig, supernet_mults
from dmscale.recipes.tasks import CausalLM, ImageClassification, LossFunction, Task, output_logits

__all__ = ["METRICS", "text_windows", "hf_task", "build_user_model", "random_init", "user_supernet",
           "trusted_packages", "make_task", "UserLoss", "evaluate_accuracy", "evaluate_perplexity",
           "evaluate_loss", "describe_enlargement"]

#: metric key -> (column label, higher is better)
METRICS: dict[str, tuple[str, bool]] = {"acc": ("test acc", True), "ppl": ("test ppl", False),
                                        "loss": ("test loss", False)}


# ----------------------------------------------------------------------------------------- data
def text_windows(ids: torch.Tensor, seq_len: int, what: str) -> torch.Tensor:
    """Non-overlapping windows ``(N, seq_len)`` of a token stream (the tail shorter than a window is dropped)."""
    n = ids.numel() // seq_len
    if n < 1:
        raise ConfigError(f"data.seq_len={seq_len}: {what} has only {ids.numel()} tokens, less than one window; "
                          "lower data.seq_len or give more text")
    return ids[:n * seq_len].reshape(n, seq_len).clone()


# ----------------------------------------------------------------------------------------- models
def hf_task(kind: str, loss: str) -> str | None:
    """The ``transformers`` Auto class for an ``hf:`` model: by the data (text: causal LM, images: image
    classification), or from the checkpoint's ``architectures`` with a user's ``--loss``."""
    if loss:
        return None
    return "causal-lm" if kind == "text" else "image-classification"


def build_user_model(cfg: RunConfig, kind: str, seed: int, kwargs: dict[str, Any] | None = None) -> nn.Module:
    """The user's ``--model`` (seeded, so a factory's random init is the same on every call and resume)."""
    from dmscale.app.models import ModelSpecError, load_model
    from dmscale.serialization.errors import LoadError

    m = cfg.model
    kw = dict(m.kwargs if kwargs is None else kwargs)
    if m.spec.startswith("hf:"):
        kw.setdefault("dtype", torch.float32)
    state = torch.get_rng_state()
    torch.manual_seed(seed)
    try:
        return load_model(m.spec, kw, m.trust, task=hf_task(kind, cfg.task.loss) if m.spec.startswith("hf:")
                          else None)
    except ModelSpecError as exc:
        raise ConfigError(f"model.spec: {exc}") from None
    except LoadError as exc:
        raise ConfigError(f"--model {m.spec}: {exc} (on the command line: --trust PACKAGE, model.trust in a "
                          "config)") from None
    finally:
        torch.set_rng_state(state)


@torch.no_grad()
def random_init(model: nn.Module, seed: int) -> nn.Module:
    """Re-initialise every weight in place, reproducibly from ``seed``: a Hugging Face model by its own
    ``_init_weights``, any other module by ``reset_parameters`` (BatchNorm statistics reset too).

    Parameters of modules without ``reset_parameters`` (outside Hugging Face models) keep their values.
    """
    from dmscale.app.zoo import reinitialize

    init = getattr(model, "_init_weights", None)
    if not (callable(init) and getattr(model, "config", None) is not None):
        return reinitialize(model, seed)
    state = torch.get_rng_state()
    torch.manual_seed(seed)
    try:
        for t in (*model.parameters(), *model.buffers(), *model.modules()):
            if getattr(t, "_is_hf_initialized", False):  # loaded weights are skipped by HF's init otherwise
                t._is_hf_initialized = False
        model.apply(init)
        tie = getattr(model, "tie_weights", None)
        if callable(tie):
            tie()
    finally:
        torch.set_rng_state(state)
    return model


def describe_enlargement(cfg: RunConfig) -> str:
    """What ``dmscale search`` makes of the model as its supernet, in words (printed and in the report)."""
    m = cfg.model
    w, d = supernet_mults(m)
    if not m.spec:
        return f"the built-in family, widths x{w:g} and depths x{d:g} (rounded half up), random init"
    if m.supernet_kwargs:
        return (f"{m.spec} built with model.supernet_kwargs {json.dumps(m.supernet_kwargs)} over model.kwargs, "
                "random init")
    if w > 1:
        return f"{m.spec} widened x{int(w)} by dmscale.upscale (model.supernet_width_mult), then randomly initialised"
    return (f"no enlargement: the supernet is {m.spec} itself, randomly initialised (set model.supernet_width_mult "
            "to an integer >= 2 to widen it with dmscale.upscale, or model.supernet_kwargs for a factory)")


def user_supernet(cfg: RunConfig, kind: str, base: nn.Module, example: tuple, seed: int) -> nn.Module:
    """The random-init supernet of ``dmscale search`` on a user model (see :func:`describe_enlargement`)."""
    from dmscale.mup.upscale import UpscaleError, upscale

    m = cfg.model
    w, _ = supernet_mults(m)
    if m.supernet_kwargs:
        net = build_user_model(cfg, kind, seed, {**m.kwargs, **m.supernet_kwargs})
    elif w > 1:
        try:
            net = upscale(base, width=int(w), noise=0.0, example_inputs=example)
        except (UpscaleError, ValueError, TypeError, RuntimeError) as exc:
            raise ConfigError(f"model.supernet_width_mult={m.supernet_width_mult:g}: dmscale.upscale cannot widen "
                              f"{m.spec}: {exc}; set it to 0 (no enlargement) or give model.supernet_kwargs") from None
    else:
        net = base
    return random_init(net, seed)


def trusted_packages(cfg: RunConfig, model: nn.Module | None) -> list[str]:
    """Packages a run may load its own saved models' classes from: ``model.trust`` and, for a factory, the
    top-level packages of the factory and of the model's classes (code the run has imported and run already)."""
    from dmscale.serialization.allowlist import DEFAULT_CLASS_PREFIXES, FORBIDDEN_TRUST, module_allowed

    out = set(cfg.model.trust)
    if model is not None:
        mods = {cfg.model.spec.split(":", 1)[0]} | {type(mod).__module__ for mod in model.modules()}
        for mod in mods:
            top = mod.split(".", 1)[0]
            if not module_allowed(mod, DEFAULT_CLASS_PREFIXES) and top not in FORBIDDEN_TRUST and top != "__main__":
                out.add(top)
    return sorted(out)


# ----------------------------------------------------------------------------------------- tasks
class UserLoss(LossFunction):
    """A ``--loss pkg.module:function``: its output is checked (a scalar tensor, or ``(loss, metrics)``); a wrong
    one stops the run with a :class:`ConfigError` naming the function."""

    def __init__(self, fn: Callable[[nn.Module, Any], Any], spec: str) -> None:
        super().__init__(fn)
        self.spec = spec

    def loss(self, model: nn.Module, batch: Any) -> tuple[torch.Tensor, dict[str, Any]]:
        out = self.fn(model, batch)
        try:
            return LossFunction(lambda _m, _b: out).loss(model, batch)
        except TypeError as exc:
            raise ConfigError(f"task.loss={self.spec!r} (--loss): {exc}") from None


def make_task(cfg: RunConfig, kind: str, *, label_smoothing: float = 0.0, teacher: nn.Module | None = None) -> Task:
    """The task of a phase: the user's ``--loss``, else by the data; ``teacher`` (with ``task.distill``) distils."""
    t = cfg.task
    if t.loss:
        from dmscale.app.models import ModelSpecError, load_function

        try:
            return UserLoss(load_function(t.loss, "--loss"), t.loss)
        except ModelSpecError as exc:
            raise ConfigError(f"task.loss: {exc}") from None
    distill = t.distill if teacher is not None else 0.0
    if kind == "text":
        return CausalLM(teacher=teacher, distill=distill, temperature=t.temperature, example_len=cfg.data.seq_len)
    return ImageClassification(label_smoothing, teacher=teacher, distill=distill, temperature=t.temperature)


# ----------------------------------------------------------------------------------------- metrics
@torch.no_grad()
def evaluate_accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int) -> float:
    """Top-1 accuracy (model in eval mode, restored after); Hugging Face outputs through their logits."""
    was = model.training
    model.eval()
    correct = 0
    try:
        for i in range(0, len(x), batch_size):
            correct += int((output_logits(model(x[i:i + batch_size])).argmax(-1) == y[i:i + batch_size]).sum())
    finally:
        model.train(was)
    return correct / max(1, len(x))


def evaluate_perplexity(model: nn.Module, ids: torch.Tensor, seq_len: int) -> float:
    """Perplexity on held-out token ids, in windows of ``seq_len`` (``dmscale.eval.perplexity``)."""
    from dmscale.eval.perplexity import perplexity

    return float(perplexity(model, ids, max_length=seq_len, stride=seq_len, progress=False))


@torch.no_grad()
def evaluate_loss(model: nn.Module, task: Task, batches: list[Any]) -> float:
    """Mean of a task's loss over the test batches (model in eval mode)."""
    was = model.training
    model.eval()
    try:
        vals = [float(task.loss(model, b)[0]) for b in batches]
    finally:
        model.train(was)
    v = sum(vals) / max(1, len(vals))
    return v if math.isfinite(v) else float("nan")
