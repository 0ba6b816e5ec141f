"""``DMSCallback`` for PyTorch Lightning (``lightning.pytorch`` or ``pytorch_lightning``).

::

    dms = dmscale.DMS(module.net, example_inputs=(x,), target=dmscale.Target(flops=0.5), total_steps=max_steps)
    cb = DMSCallback(dms, lr_structure=0.01, save_dir="out/pruned")
    L.Trainer(max_steps=max_steps, callbacks=[cb]).fit(module, loader)
    small = cb.exported

Your ``training_step`` and ``configure_optimizers`` stay as they are: the callback adds the
structure parameters to the (first) optimizer in their own group (``lr_structure``, no weight
decay), adds the gradient of ``dms.weight * log(R / R_target)`` to them before every optimizer
step, calls ``dms.step()`` after it, logs ``dms/resource``, ``dms/target``, ``dms/resource_loss``
and ``dms/resource_weight`` with ``pl_module.log``, and at the end of fitting projects the kept
ratios onto the budget, exports and saves. Not supported: ``precision="16-mixed"`` (GradScaler; use
bf16), manual optimization, several optimizers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


from dmscale.integrations import (CallbackState, add_param_group_once, add_resource_grad, check_devices,
                                  extend_scheduler, finish, log_values, zero_structure_grads)

try:
    from lightning.pytorch import Callback
except ImportError:  # pragma: no cover - the standalone package
    try:
        from pytorch_lightning import Callback
    except ImportError as e:
        raise ImportError("dmscale.integrations.lightning needs lightning: pip install 'dmscale[lightning]'") from e

__all__ = ["DMSCallback"]


class DMSCallback(CallbackState, Callback):
    """Search a model's structure while Lightning trains it; export and save at the end of fitting.

    Args:
        dms: a :class:`dmscale.DMS` built on (a submodule of) the LightningModule, on its final device.
        lr_structure: learning rate of the kept ratios (default: ``min(0.1, max(0.005, 2 / total_steps))``).
        save_dir: where ``dmscale.save`` writes the export (None: not saved).
        project: project the kept ratios onto the budget before exporting (exact budget).
        remove_masks: take the masks out of the trained model after the export.
    """

    def __init__(self, dms: Any, lr_structure: float | None = None, save_dir: str | Path | None = None,
                 project: bool = True, remove_masks: bool = False) -> None:
        Callback.__init__(self)
        CallbackState.__init__(self, dms, lr_structure, save_dir, project, remove_masks)
        self._stepped = False

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        """Check the setup and add the structure group to the optimizer."""
        if "16" in str(trainer.precision) and "bf16" not in str(trainer.precision):
            raise ValueError(f"DMSCallback: precision={trainer.precision!r} (GradScaler) is not supported; use "
                             "'bf16-mixed' or '32-true'")
        if not pl_module.automatic_optimization:
            raise ValueError("DMSCallback: manual optimization is not supported; call dms.loss/dms.step yourself")
        if len(trainer.optimizers) != 1:
            raise ValueError(f"DMSCallback: expected one optimizer, the module configured {len(trainer.optimizers)}")
        check_devices(self.dms, pl_module)
        lr = self.learning_rate()
        if add_param_group_once(trainer.optimizers[0], self.dms, lr):
            for cfg in getattr(trainer, "lr_scheduler_configs", None) or []:
                extend_scheduler(cfg.scheduler, lr)

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        """Add the resource-loss gradient to the structure parameters."""
        add_resource_grad(self.dms)
        self._stepped = True

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        """After an optimizer step: advance the schedule, clear the structure gradients, log dms/ values."""
        if not self._stepped:
            return  # an accumulation micro-batch
        self._stepped = False
        self.dms.step()
        zero_structure_grads(self.dms)
        pl_module.log_dict(log_values(self.dms), on_step=True, on_epoch=False, prog_bar=False)

    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        """Project onto the budget, export and save."""
        self.exported, self.projection = finish(self.dms, self.save_dir, project=self.project,
                                                remove_masks=self.remove_masks)
