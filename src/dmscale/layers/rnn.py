"""``nn.LSTM`` / ``nn.GRU`` / ``nn.RNN``: the hidden size is searched; the layer is traced as one unit.

The hidden size ``H`` is one space for every layer and direction (torch's RNNs have one
``hidden_size``). The gate-stacked weights ``weight_ih_l{k}`` / ``weight_hh_l{k}`` / biases are
concatenations of their gates (4 for an LSTM, 3 for a GRU, 1 for an RNN) along dim 0, each gate
block one copy of ``H``; the recurrent input (``weight_hh``'s dim 1) and the next layer's input
are the output width ``O`` (``H``, or ``proj_size`` with projections; both directions
concatenated in a bidirectional layer).

Masking is exact: every parameter is masked as a raw parameter along each searched dim. In hard
mode a removed unit's gate rows and recurrent columns are 0, so (from a zero or masked initial
state) its state and output stay exactly 0 and nothing else sees it; the export removes those
rows and columns and folds the kept units' mask values into the same weights.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
from torch.nn.utils.rnn import PackedSequence

from ..trace.spaces import Space, composite, union
from .spec import LayerSpec, _register_builtin

__all__ = ["RNN_SPEC", "gates_of"]

_GATES = {"LSTM": 4, "GRU": 3, "RNN_TANH": 1, "RNN_RELU": 1}


def gates_of(mod: nn.RNNBase) -> int:
    """Number of gate blocks stacked in ``weight_ih`` / ``weight_hh`` (4 LSTM, 3 GRU, 1 RNN)."""
    return _GATES[mod.mode]


def _stacked(tr, t: torch.Tensor, dim: int, copies: int, h: Space, where: str) -> None:
    """Tie ``t``'s ``dim`` with ``copies`` stacked blocks of ``h`` (the gates, or both directions)."""
    d = tr.get(t)[dim]
    union(d, composite("concat", [h] * copies, where) if copies > 1 else h)


def _rnn_unit(tr, mod: nn.Module, name: str, x: Any, output: Any, flops: float) -> None:
    """Label the RNN's parameters and outputs (see the module docstring) and record its FLOPs."""
    gates = gates_of(mod)
    dirs = 2 if mod.bidirectional else 1
    sfx = [""] + (["_reverse"] if dirs == 2 else [])
    proj = getattr(mod, "proj_size", 0) or 0
    h = tr.get(mod.weight_hr_l0)[1] if proj else tr.get(mod.weight_hh_l0)[1]
    o = tr.get(mod.weight_hr_l0)[0] if proj else h
    for s in (h, o):
        s.find().tags.add("act")
    packed = isinstance(x, PackedSequence)
    data = x.data if packed else x
    xd = list(tr.get(data))
    mats: list[tuple[int, list[Space]]] = []
    for layer in range(mod.num_layers):
        for s in sfx:
            w_ih, w_hh = getattr(mod, f"weight_ih_l{layer}{s}"), getattr(mod, f"weight_hh_l{layer}{s}")
            _stacked(tr, w_ih, 0, gates, h, f"gates:{name}")
            _stacked(tr, w_hh, 0, gates, h, f"gates:{name}")
            if layer == 0:
                union(tr.get(w_ih)[1], xd[-1])
            else:
                _stacked(tr, w_ih, 1, dirs, o, f"directions:{name}")
            union(tr.get(w_hh)[1], o)
            for b in ("bias_ih", "bias_hh"):
                t = getattr(mod, f"{b}_l{layer}{s}", None)
                if isinstance(t, torch.Tensor):
                    _stacked(tr, t, 0, gates, h, f"gates:{name}")
            mats += [(w_ih.numel(), list(tr.get(w_ih))), (w_hh.numel(), list(tr.get(w_hh)))]
            if proj:
                w_hr = getattr(mod, f"weight_hr_l{layer}{s}")
                union(tr.get(w_hr)[0], o)
                union(tr.get(w_hr)[1], h)
                mats.append((w_hr.numel(), list(tr.get(w_hr))))
    out_ch = o
    if dirs == 2:
        out_ch = composite("concat", [o, o], f"directions:{name}")
    args, kwargs = tr.unit_call
    hx = args[1] if len(args) > 1 else kwargs.get("hx")
    inits = list(hx) if isinstance(hx, (tuple, list)) else ([hx] if isinstance(hx, torch.Tensor) else [])
    y, state = output if isinstance(output, tuple) else (output, None)
    batched = (data.dim() == 3) if not packed else True
    batch = None
    if not packed and batched:
        batch = xd[0] if mod.batch_first else xd[1]
    ydata = y.data if isinstance(y, PackedSequence) else y
    tr.set(ydata, list(xd[:-1]) + [out_ch])
    if isinstance(y, PackedSequence):
        tr.set(y.batch_sizes, tr.fresh(y.batch_sizes))
    states = list(state) if isinstance(state, tuple) else ([state] if isinstance(state, torch.Tensor) else [])
    for i, t in enumerate(inits):  # initial states: (h_0, c_0) or h_0, shaped like the final ones
        dims = tr.get(t)
        union(dims[-1], h if (i == 1 and gates == 4) else o)
        if batch is not None and t.dim() == 3 and dims[1].find().size == batch.find().size:
            union(dims[1], batch)
    for i, t in enumerate(states):
        last = h if (i == 1 and gates == 4) else o  # LSTM (h_n, c_n): c_n has the hidden size
        dims = tr.fresh(t)
        dims[-1] = last
        if batch is not None and t.dim() == 3 and dims[1].size == batch.find().size:
            dims[1] = union(dims[1], batch)
        tr.set(t, dims)
    total = sum(n for n, _ in mats)
    for n, dims in mats:
        tr.record_op(mod.mode.lower(), flops * n / total if total else 0.0, dims)


def _rnn_sizes(mod: nn.Module) -> dict[str, Any]:
    gates = gates_of(mod)
    out = {"input_size": mod.weight_ih_l0.shape[1], "hidden_size": mod.weight_hh_l0.shape[0] // gates}
    if getattr(mod, "proj_size", 0):
        out["proj_size"] = mod.weight_hr_l0.shape[0]
    return out


def _refresh(mod: nn.Module) -> None:
    """Point the RNN's flat weight list at its current (masked or sliced) parameters."""
    mod._flat_weights = [getattr(mod, wn) if hasattr(mod, wn) else None for wn in mod._flat_weights_names]


def _update(mod: nn.Module) -> None:
    for attr, value in _rnn_sizes(mod).items():
        setattr(mod, attr, value)
    mod._init_flat_weights()


RNN_SPEC = LayerSpec("rnn", params=(), trace_unit=_rnn_unit, size_attrs=_rnn_sizes, update_attrs=_update,
                     refresh=_refresh)
_register_builtin((nn.LSTM, nn.GRU, nn.RNN), RNN_SPEC)
