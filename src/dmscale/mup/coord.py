"""μP coordinate check: per-layer activation and update sizes after t steps, across widths.

Under μP, the typical size of every layer's output (``mean |h_t|``) and of its change since
initialisation (``mean |h_t - h_0|``, the update) stays O(1) as the width grows; under the standard
parametrization with a fixed learning rate the updates of hidden layers grow with width.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["coord_check", "plot_coord_check"]


def _default_loss(out: Any, y: Any) -> Tensor:
    """HF ``.loss`` if present; cross-entropy for integer targets, MSE for float targets."""
    loss = getattr(out, "loss", None)
    if isinstance(loss, Tensor):
        return loss
    logits = getattr(out, "logits", out)
    if y is None:
        return logits.float().pow(2).mean()
    if not y.is_floating_point():
        return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), y.reshape(-1))
    return nn.functional.mse_loss(logits.float(), y.float())


def _call(model: nn.Module, x: Any) -> Any:
    if isinstance(x, Mapping):
        return model(**x)
    if isinstance(x, tuple):
        return model(*x)
    return model(x)


def _split(batch: Any) -> tuple[Any, Any]:
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return batch[0], batch[1]
    return batch, None


def _probe(model: nn.Module, layers: dict[nn.Module, str], x: Any, seed: int) -> dict[str, Tensor]:
    """Outputs of every layer on the probe input (train mode, no grad, buffers and RNG untouched)."""
    outs: dict[str, Tensor] = {}

    def hook(mod: nn.Module, _a: Any, out: Any) -> None:
        if isinstance(out, Tensor) and out.is_floating_point():
            outs[layers[mod]] = out.detach().double().clone()

    buffers = {n: b.detach().clone() for n, b in model.named_buffers()}
    handles = [m.register_forward_hook(hook) for m in layers]
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            out = _call(model, x)
        logits = getattr(out, "logits", out)
        if isinstance(logits, Tensor):
            outs["<output>"] = logits.detach().double().clone()
    finally:
        for h in handles:
            h.remove()
        with torch.no_grad():
            for n, b in model.named_buffers():
                b.copy_(buffers[n])
    return outs


def coord_check(models_by_width: Mapping[int, nn.Module | Callable[[], nn.Module]], batches: Any,
                optimizer_factory: Callable[[nn.Module], torch.optim.Optimizer], steps: int = 3, *,
                loss_fn: Callable[[Any, Any], Tensor] | None = None, probe: Any = None,
                out_png: str | None = None, seed: int = 0) -> dict[int, dict[str, dict[str, list[float]]]]:
    """Per-layer activation and update sizes of each model after 0..steps training steps.

    ``models_by_width``: {width: model (or a zero-argument factory)}; ``batches``: one (inputs,
    targets) batch or a list of them (cycled); ``optimizer_factory(model)`` builds each model's
    optimizer (e.g. ``lambda m: dmscale.mup_optimizer(m, kind="adam", lr=1e-2)``).  Every layer with
    parameters is probed on ``probe`` (default: the first batch's inputs) in training mode without
    changing buffers.  Returns ``{width: {"activation": {layer: [mean|h_t|, t = 0..steps]},
    "update": {layer: [mean|h_t - h_0|, t = 1..steps]}}}``; layer ``"<output>"`` is the model output.
    ``out_png`` writes a plot (matplotlib, imported only then).
    """
    if not models_by_width:
        raise ValueError("coord_check: models_by_width is empty")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"coord_check: steps must be an integer >= 1, got {steps!r}")
    blist = list(batches) if isinstance(batches, list) else [batches]
    if not blist:
        raise ValueError("coord_check: no batches")
    x_probe = _split(blist[0])[0] if probe is None else probe
    lf = loss_fn or _default_loss
    results: dict[int, dict[str, dict[str, list[float]]]] = {}
    for width in sorted(models_by_width):
        model = models_by_width[width]
        if not isinstance(model, nn.Module):
            model = model()
        if not isinstance(model, nn.Module):
            raise TypeError(f"coord_check: width {width}: expected an nn.Module or a factory returning one")
        opt = optimizer_factory(model)
        model.train()
        layers = {m: n for n, m in model.named_modules() if n and any(True for _ in m.parameters(recurse=False))}
        h0 = _probe(model, layers, x_probe, seed)
        act = {n: [float(h.abs().mean())] for n, h in h0.items()}
        upd: dict[str, list[float]] = {n: [] for n in h0}
        for t in range(steps):
            x, y = _split(blist[t % len(blist)])
            loss = lf(_call(model, x), y)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"coord_check: width {width}: loss is {float(loss)} at step {t}")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            ht = _probe(model, layers, x_probe, seed)
            for n, h in ht.items():
                if n in act:
                    act[n].append(float(h.abs().mean()))
                    upd[n].append(float((h - h0[n]).abs().mean()) if h.shape == h0[n].shape else math.nan)
        results[width] = {"activation": act, "update": upd}
    if out_png:
        plot_coord_check(results, out_png)
    return results


def plot_coord_check(results: Mapping[int, Mapping[str, Mapping[str, Sequence[float]]]], out_png: str) -> None:
    """Two rows (activation, update) x steps: per-layer size vs width, log-log, one line per layer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    widths = sorted(results)
    layers = list(results[widths[0]]["activation"])
    steps = len(results[widths[0]]["update"][layers[0]]) if layers else 0
    cols = max(1, steps)
    fig, axes = plt.subplots(2, cols, figsize=(3.6 * cols, 6.4), squeeze=False)
    for row, key in enumerate(("activation", "update")):
        for s in range(cols):
            ax = axes[row][s]
            idx = s + 1 if key == "activation" else s
            for name in layers:
                ys = []
                for w in widths:
                    v = results[w][key].get(name, [])
                    ys.append(v[idx] if len(v) > idx else math.nan)
                ax.plot(widths, ys, marker="o", lw=1, ms=3, label=name)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_title(f"{key}, step {s + 1}", fontsize=9)
            ax.set_xlabel("width")
        axes[row][0].set_ylabel("mean |h_t|" if key == "activation" else "mean |h_t - h_0|")
    if len(layers) <= 16:
        axes[0][-1].legend(fontsize=6, loc="best")
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
