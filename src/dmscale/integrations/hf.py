"""``DMSCallback`` for the Hugging Face ``transformers.Trainer``.

::

    dms = dmscale.DMS(model, example_inputs=(ids,), target=dmscale.Target(params=0.8), total_steps=max_steps,
                      example_kwargs={"use_cache": False})
    cb = DMSCallback(dms, lr_structure=0.01, save_dir="out/pruned")
    trainer = Trainer(model=model, args=TrainingArguments(..., max_steps=max_steps), callbacks=[cb], ...)
    trainer.train()
    small = cb.exported               # also saved to out/pruned with dmscale.save

The model's own loss (``labels`` in the batch) or your ``compute_loss`` is left as it is: once per
optimizer step the callback adds the gradient of ``dms.weight * log(R / R_target)`` to the structure
parameters (equal to training on ``dms.loss(task)``, independent of gradient accumulation and loss
scaling), and the Trainer's optimizer steps them in their own group (``lr_structure``, no weight
decay). ``dms/resource``, ``dms/target`` (fractions of the supernet), ``dms/resource_loss`` and
``dms/resource_weight`` are added to the Trainer's logs (``trainer.state.log_history`` and every
logging callback after this one; :meth:`DMSCallback.attach` puts it first so that the console and
reporting integrations show them too). At the end of training the kept ratios are projected onto
the budget, the model is exported and saved.

Not supported: fp16 with a GradScaler (use bf16), resuming a Trainer checkpoint with the structure
group in its optimizer state.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch.nn as nn

from dmscale.integrations import (CallbackState, add_param_group_once, add_resource_grad, check_devices,
                                  extend_scheduler, finish, log_values, zero_structure_grads)

try:
    from transformers import TrainerCallback
except ImportError as e:  # pragma: no cover - transformers is an optional dependency
    raise ImportError("dmscale.integrations.hf needs transformers: pip install 'dmscale[hf]'") from e

if not hasattr(TrainerCallback, "on_pre_optimizer_step"):  # pragma: no cover - old transformers
    raise ImportError("dmscale.integrations.hf needs transformers >= 4.46 (TrainerCallback.on_pre_optimizer_step)")

__all__ = ["DMSCallback"]


class DMSCallback(CallbackState, TrainerCallback):
    """Search a model's structure while ``transformers.Trainer`` trains it; export and save at the end.

    Args:
        dms: a :class:`dmscale.DMS` built on the model the Trainer trains (on its final device).
        lr_structure: learning rate of the kept ratios (default: ``min(0.1, max(0.005, 2 / max_steps))``).
        save_dir: where ``dmscale.save`` writes the export (default: ``<output_dir>/dmscale``; ``False``: not saved).
        project: project the kept ratios onto the budget before exporting (exact budget).
        remove_masks: take the masks out of the trained model after the export.
    """

    def __init__(self, dms: Any, lr_structure: float | None = None, save_dir: str | Path | bool | None = None,
                 project: bool = True, remove_masks: bool = False) -> None:
        CallbackState.__init__(self, dms, lr_structure, save_dir, project, remove_masks)
        self.saved_to: Path | None = None
        self._last: dict[str, float] = {}

    # ---------------------------------------------------------------- placement
    @classmethod
    def attach(cls, trainer: Any, dms: Any, **kwargs: Any) -> "DMSCallback":
        """Create the callback and put it first in ``trainer``'s callbacks (so every logger sees dms/ values)."""
        cb = cls(dms, **kwargs)
        trainer.callback_handler.callbacks.insert(0, cb)
        return cb

    # ---------------------------------------------------------------- hooks
    def on_train_begin(self, args: Any, state: Any, control: Any, model: nn.Module | None = None,
                       optimizer: Any = None, lr_scheduler: Any = None, **kwargs: Any) -> None:
        """Check the setup and add the structure parameters to the optimizer in their own group."""
        if getattr(args, "fp16", False):
            raise ValueError("DMSCallback: fp16 mixed precision (GradScaler) is not supported; use bf16=True, or a "
                             "plain loop with dms.attach_grad_scaler(scaler)")
        if optimizer is None:
            raise ValueError("DMSCallback: the Trainer passed no optimizer to on_train_begin")
        if model is not None:
            check_devices(self.dms, model)
        steps = int(state.max_steps or 0)
        if steps and steps != self.dms.schedule.total_steps:
            warnings.warn(f"DMSCallback: DMS was built with total_steps={self.dms.schedule.total_steps} but the "
                          f"Trainer runs max_steps={steps}; the target schedule follows total_steps", stacklevel=2)
        lr = self.learning_rate()
        if add_param_group_once(optimizer, self.dms, lr):
            extend_scheduler(lr_scheduler, lr)  # the Trainer's schedule leaves the structure lr constant

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Add the resource-loss gradient to the structure parameters (after the task gradients)."""
        self._last = add_resource_grad(self.dms)

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Advance the DMS schedule by one optimizer step and clear the structure gradients."""
        self.dms.step()
        zero_structure_grads(self.dms)

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, float] | None = None,
               **kwargs: Any) -> None:
        """Add dms/resource, dms/target, dms/resource_loss and dms/resource_weight to a training log."""
        if logs is None or "loss" not in logs or not self.dms.last:
            return  # evaluation logs and logs before the first step
        vals = log_values(self.dms)
        logs.update(vals)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(vals)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Project onto the budget, export, and save the export."""
        if self.save_dir is False:
            target = None
        elif self.save_dir is None or self.save_dir is True:
            target = Path(args.output_dir) / "dmscale"
        else:
            target = Path(self.save_dir)
        self.exported, self.projection = finish(self.dms, target, project=self.project,
                                                remove_masks=self.remove_masks)
        self.saved_to = target
