"""Tasks: what a recipe needs to know about the problem it trains on.

A task is a callable ``task(model, batch) -> (loss, metrics)`` (the loss :func:`~dmscale.recipes.loop.train_loop`
optimises) with ``example(batch) -> tuple`` (the example inputs a ``DMS`` traces) and
``example_kwargs(model)`` (keyword arguments for that trace). Three are provided: image
classification (batches ``(x, y)``), causal language modelling (batches of token ids, optional
distillation from a teacher) and :class:`LossFunction`, which wraps a user's own loss.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["Task", "ImageClassification", "CausalLM", "LossFunction", "as_task", "lm_loss", "distill_loss",
           "sample_windows", "window_batches", "device_of"]


def device_of(model: nn.Module) -> torch.device:
    """Device of the model's first parameter (CPU for a model without parameters)."""
    p = next(iter(model.parameters()), None)
    return p.device if p is not None else torch.device("cpu")


def _to(x: Any, dev: torch.device) -> Any:
    if isinstance(x, torch.Tensor):
        return x.to(dev)
    if isinstance(x, (list, tuple)):
        return type(x)(_to(v, dev) for v in x)
    if isinstance(x, dict):
        return {k: _to(v, dev) for k, v in x.items()}
    return x


class Task:
    """Base class: ``loss(model, batch) -> (loss, metrics)``, ``example(batch)``, ``example_kwargs(model)``."""

    def loss(self, model: nn.Module, batch: Any) -> tuple[torch.Tensor, dict[str, Any]]:
        raise NotImplementedError

    def example(self, batch: Any) -> tuple:
        """Example inputs (a tuple of positional arguments) for tracing, taken from a batch."""
        raise NotImplementedError

    def example_kwargs(self, model: nn.Module) -> dict[str, Any]:
        """Keyword arguments for the traced call (none by default)."""
        return {}

    def __call__(self, model: nn.Module, batch: Any) -> tuple[torch.Tensor, dict[str, Any]]:
        return self.loss(model, batch)


@dataclass
class ImageClassification(Task):
    """Batches ``(x, y)``; cross-entropy (optional label smoothing); reports ``train_acc``."""

    label_smoothing: float = 0.0

    def loss(self, model: nn.Module, batch: Any) -> tuple[torch.Tensor, dict[str, Any]]:
        x, y = _to(batch, device_of(model))
        out = model(x)
        loss = F.cross_entropy(out.float(), y, label_smoothing=self.label_smoothing)
        return loss, {"train_acc": float((out.detach().argmax(1) == y).float().mean())}

    def example(self, batch: Any) -> tuple:
        return (batch[0][:1],)


def lm_loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy of logits (B, T, V) on ids (B, T)."""
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1))


def distill_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """KL(teacher || student) on softened logits, times T^2 (per token, mean)."""
    t = float(temperature)
    s = F.log_softmax(student.float() / t, dim=-1).reshape(-1, student.shape[-1])
    p = F.log_softmax(teacher.float() / t, dim=-1).reshape(-1, teacher.shape[-1])
    return F.kl_div(s, p, log_target=True, reduction="batchmean") * t * t


@dataclass
class CausalLM(Task):
    """Batches of token ids (B, T); next-token cross-entropy, plus ``distill * KL(teacher || student)``.

    Metrics: ``ce`` and, with a teacher, ``kl``. The teacher runs under ``no_grad``.
    """

    teacher: nn.Module | None = None
    distill: float = 0.0
    temperature: float = 1.0
    example_len: int = 64

    def loss(self, model: nn.Module, batch: Any) -> tuple[torch.Tensor, dict[str, Any]]:
        from dmscale.eval.perplexity import logits_of

        ids = batch.to(device_of(model))
        logits = logits_of(model, ids)
        ce = lm_loss(logits, ids)
        metrics: dict[str, Any] = {"ce": float(ce.detach())}
        if self.teacher is None or self.distill <= 0:
            return ce, metrics
        with torch.no_grad():
            t_logits = logits_of(self.teacher, ids.to(device_of(self.teacher)))
        kl = distill_loss(logits[:, :-1], t_logits[:, :-1].to(logits.device), self.temperature)
        metrics["kl"] = float(kl.detach())
        return ce + self.distill * kl, metrics

    def example(self, batch: Any) -> tuple:
        return (batch[:1, :self.example_len],)

    def example_kwargs(self, model: nn.Module) -> dict[str, Any]:
        return {"use_cache": False} if getattr(model, "config", None) is not None else {}


@dataclass
class LossFunction(Task):
    """A user's loss: ``fn(model, batch) -> loss`` or ``(loss, metrics)``.

    ``example(batch)`` defaults to ``(batch,)`` for a tensor batch and ``(batch[0],)`` for a tuple/list;
    pass ``example_fn=`` to say otherwise; ``kwargs`` are the traced call's keyword arguments.
    """

    fn: Callable[[nn.Module, Any], Any]
    example_fn: Callable[[Any], tuple] | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)

    def loss(self, model: nn.Module, batch: Any) -> tuple[torch.Tensor, dict[str, Any]]:
        out = self.fn(model, batch)
        if isinstance(out, tuple):
            if len(out) != 2 or not isinstance(out[1], dict):
                raise TypeError("a loss function returns loss or (loss, metrics dict)")
            loss, metrics = out
        else:
            loss, metrics = out, {}
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            raise TypeError(f"the loss function must return a scalar tensor, got {type(loss).__name__}"
                            + (f" of shape {tuple(loss.shape)}" if isinstance(loss, torch.Tensor) else ""))
        return loss.reshape(()), dict(metrics)

    def example(self, batch: Any) -> tuple:
        if self.example_fn is not None:
            return tuple(self.example_fn(batch))
        if isinstance(batch, torch.Tensor):
            return (batch,)
        if isinstance(batch, (tuple, list)) and batch:
            return (batch[0],)
        raise TypeError("cannot take example inputs from this batch; pass LossFunction(fn, example_fn=...)")

    def example_kwargs(self, model: nn.Module) -> dict[str, Any]:
        return dict(self.kwargs)


def as_task(task: Task | Callable[[nn.Module, Any], Any]) -> Task:
    """A :class:`Task` as is; a plain ``fn(model, batch)`` as :class:`LossFunction`."""
    if isinstance(task, Task):
        return task
    if callable(task):
        return LossFunction(task)
    raise TypeError(f"task must be a dmscale.recipes Task or a loss function fn(model, batch), got "
                    f"{type(task).__name__}")


# ----------------------------------------------------------------------------------------- LM batches
def sample_windows(ids: torch.Tensor, seq_len: int, batch_size: int, generator: torch.Generator) -> torch.Tensor:
    """A (batch_size, seq_len) batch of random contiguous windows of the token stream."""
    n = ids.numel()
    if n < seq_len + 1:
        raise ValueError(f"token stream of {n} tokens is shorter than seq_len+1={seq_len + 1}")
    starts = torch.randint(0, n - seq_len, (batch_size,), generator=generator)
    return torch.stack([ids[s:s + seq_len] for s in starts.tolist()])


def window_batches(ids: torch.Tensor, seq_len: int, batch_size: int, seed: int) -> Callable[[int], torch.Tensor]:
    """``batches(step)``: random windows drawn in order from a generator seeded with ``seed``."""
    gen = torch.Generator().manual_seed(int(seed))
    return lambda step: sample_windows(ids, seq_len, batch_size, gen)
