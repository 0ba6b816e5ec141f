"""Size attributes a layer's weights imply, and the layer state rebuilt on load.

:func:`expected_size_attrs` is the one place that maps a module to its size attributes
(``in_features``, ``out_channels``, ``num_heads``-derived ``head_dim``, ...) as its weights imply
them; :func:`dmscale.load` refuses a ``structure.json`` whose attributes disagree
(:func:`check_sizes`). It joins two sources: the layer registry (``LayerSpec.size_attrs`` of
``dmscale.layers``, which also covers layers users register with ``dmscale.register_layer``) and
the defensive table below (exact types, more layer types: RNNs, Bilinear, PReLU, kernel sizes, MHA
``kdim``/``vdim``/``head_dim``). Where both name an attribute the table's value is used; the
registry is meant to take over the table once it covers these layers.

:func:`transient_attrs` / :func:`rebuild_transient`: state a layer derives from its parameters
(the RNN flat-weight list and its weak references) is not saved and is rebuilt after loading.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from dmscale.serialization.errors import LoadError

__all__ = ["expected_size_attrs", "size_constraints", "check_sizes", "transient_attrs", "rebuild_transient"]

_RNN_GATES = {"LSTM": 4, "GRU": 3, "RNN_TANH": 1, "RNN_RELU": 1}


def _param(m: nn.Module, name: str) -> torch.Tensor | None:
    t = m._parameters.get(name)
    if t is None:
        t = m._buffers.get(name)
    return t if isinstance(t, torch.Tensor) else None


def _is_hf_conv1d(m: nn.Module) -> bool:
    t = type(m)
    return any(c.__name__ == "Conv1D" and c.__module__ == "transformers.pytorch_utils" for c in t.__mro__)


def _pos_int(v: Any) -> bool:
    return type(v) is int and v >= 1


def _registry_sizes(m: nn.Module) -> dict[str, Any]:
    """Size attributes from the module's ``LayerSpec`` (built-in or registered); LoadError if they cannot be derived."""
    from dmscale.layers.spec import spec_for

    spec = spec_for(m)
    if spec is None or spec.size_attrs is None:
        return {}
    try:
        return dict(spec.sizes(m))
    except Exception as exc:  # a crafted module may lack what the spec reads
        raise LoadError(f"its size attributes cannot be derived from its weights and attributes "
                        f"({type(exc).__name__}: {str(exc)[:120]})") from None


def expected_size_attrs(m: nn.Module) -> dict[str, Any]:
    """``{attribute: value}`` that ``m``'s own weights imply, for the layer types dmscale knows ({} otherwise).

    Only attributes that the weights determine are returned (a LayerNorm without affine weights has
    none). Values are ints or tuples of ints, exactly as the layer's constructor stores them. Joins
    :func:`_table_sizes` and the layer registry (see the module docstring).
    """
    out = _table_sizes(m)
    for k, v in _registry_sizes(m).items():
        out.setdefault(k, v)
    return out


def _table_sizes(m: nn.Module) -> dict[str, Any]:
    """The defensive size table (every tensor and attribute is type-checked before use)."""
    w = _param(m, "weight")
    out: dict[str, Any] = {}
    if isinstance(m, nn.Linear) and w is not None and w.dim() == 2:
        out = {"in_features": w.shape[1], "out_features": w.shape[0]}
    elif isinstance(m, nn.Bilinear) and w is not None and w.dim() == 3:
        out = {"out_features": w.shape[0], "in1_features": w.shape[1], "in2_features": w.shape[2]}
    elif isinstance(m, nn.modules.conv._ConvNd) and w is not None and w.dim() >= 3:
        g = m.__dict__.get("groups")
        if _pos_int(g):
            if m.__dict__.get("transposed"):
                out = {"in_channels": w.shape[0], "out_channels": w.shape[1] * g}
            else:
                out = {"out_channels": w.shape[0], "in_channels": w.shape[1] * g}
        out["kernel_size"] = tuple(int(s) for s in w.shape[2:])
    elif isinstance(m, nn.modules.batchnorm._NormBase):
        ref = w if w is not None else _param(m, "running_mean")
        if ref is not None and ref.dim() == 1:
            out = {"num_features": ref.shape[0]}
    elif isinstance(m, (nn.LayerNorm, nn.RMSNorm)) and w is not None:
        out = {"normalized_shape": tuple(int(s) for s in w.shape)}
    elif isinstance(m, nn.GroupNorm) and w is not None and w.dim() == 1:
        out = {"num_channels": w.shape[0]}
    elif isinstance(m, (nn.Embedding, nn.EmbeddingBag)) and w is not None and w.dim() == 2:
        out = {"num_embeddings": w.shape[0], "embedding_dim": w.shape[1]}
    elif isinstance(m, nn.PReLU) and w is not None:
        out = {"num_parameters": w.numel()}
    elif isinstance(m, nn.MultiheadAttention):
        if m.__dict__.get("_qkv_same_embed_dim"):
            ipw = _param(m, "in_proj_weight")
            if ipw is not None and ipw.dim() == 2:
                out = {"embed_dim": ipw.shape[1], "kdim": ipw.shape[1], "vdim": ipw.shape[1]}
        else:
            q, k, v = (_param(m, n) for n in ("q_proj_weight", "k_proj_weight", "v_proj_weight"))
            if q is not None and k is not None and v is not None and q.dim() == k.dim() == v.dim() == 2:
                out = {"embed_dim": q.shape[0], "kdim": k.shape[1], "vdim": v.shape[1]}
        h = m.__dict__.get("num_heads")
        if "embed_dim" in out and _pos_int(h):
            out["head_dim"] = out["embed_dim"] // h
    elif isinstance(m, nn.RNNBase):
        gates = _RNN_GATES.get(m.__dict__.get("mode"))  # type: ignore[arg-type]
        w_ih, w_hh = _param(m, "weight_ih_l0"), _param(m, "weight_hh_l0")
        if gates and w_ih is not None and w_hh is not None and w_ih.dim() == w_hh.dim() == 2:
            w_hr = _param(m, "weight_hr_l0")
            layers = 0
            while _param(m, f"weight_ih_l{layers}") is not None:
                layers += 1
            out = {"input_size": w_ih.shape[1], "hidden_size": w_ih.shape[0] // gates,
                   "proj_size": w_hr.shape[0] if w_hr is not None else 0, "num_layers": layers,
                   "bidirectional": _param(m, "weight_ih_l0_reverse") is not None}
    elif _is_hf_conv1d(m) and w is not None and w.dim() == 2:
        out = {"nf": w.shape[1]}
        if "nx" in m.__dict__:
            out["nx"] = w.shape[0]
    return {k: (int(v) if isinstance(v, int) and not isinstance(v, bool) else v) for k, v in out.items()}


def size_constraints(m: nn.Module) -> list[tuple[str, bool]]:
    """Consistency rules between a layer's attributes and tensors: ``[(description, holds), ...]``."""
    d = m.__dict__
    w = _param(m, "weight")
    b = _param(m, "bias")
    rules: list[tuple[str, bool]] = []
    if isinstance(m, (nn.Linear, nn.Bilinear)) and w is not None and b is not None:
        rules.append((f"bias shape {tuple(b.shape)} == ({w.shape[0]},)", tuple(b.shape) == (w.shape[0],)))
    if isinstance(m, nn.modules.conv._ConvNd):
        g = d.get("groups")
        rules.append((f"groups={_show(g)} is a positive integer", _pos_int(g)))
        if _pos_int(g):
            for key in ("in_channels", "out_channels"):
                c = d.get(key)
                rules.append((f"{key}={_show(c)} is divisible by groups={_show(g)}", type(c) is int and c % g == 0))
        if w is not None and b is not None:
            out_c = d.get("out_channels")
            rules.append((f"bias shape {tuple(b.shape)} == ({_show(out_c)},)", tuple(b.shape) == (out_c,)))
    if isinstance(m, nn.modules.batchnorm._NormBase):
        n = d.get("num_features")
        for name in ("weight", "bias", "running_mean", "running_var"):
            t = _param(m, name)
            if t is not None:
                rules.append((f"{name} shape {tuple(t.shape)} == ({_show(n)},)", tuple(t.shape) == (n,)))
    if isinstance(m, (nn.LayerNorm, nn.RMSNorm)) and w is not None and b is not None:
        rules.append((f"bias shape {tuple(b.shape)} == weight shape {tuple(w.shape)}", b.shape == w.shape))
    if isinstance(m, nn.GroupNorm):
        g, c = d.get("num_groups"), d.get("num_channels")
        rules.append((f"num_channels={_show(c)} is divisible by num_groups={_show(g)}",
                      _pos_int(g) and type(c) is int and c % g == 0))
        if w is not None and b is not None:
            rules.append((f"bias shape {tuple(b.shape)} == weight shape {tuple(w.shape)}", b.shape == w.shape))
    if isinstance(m, nn.MultiheadAttention):
        h, e = d.get("num_heads"), d.get("embed_dim")
        rules.append((f"embed_dim={_show(e)} is divisible by num_heads={_show(h)}",
                      _pos_int(h) and type(e) is int and e % h == 0))
    if isinstance(m, (nn.Embedding,)):
        p, n = d.get("padding_idx"), d.get("num_embeddings")
        rules.append((f"padding_idx={_show(p)} is None or in [0, {_show(n)})",
                      p is None or (type(p) is int and type(n) is int and 0 <= p < n)))
    return rules


def _show(v: Any) -> str:
    """A short, safe repr for messages (never the repr of a module, which may recurse)."""
    if v is None or isinstance(v, (bool, int, float, str)):
        return repr(v)[:60]
    if isinstance(v, tuple) and all(isinstance(x, (bool, int, float, str)) for x in v) and len(v) <= 8:
        return repr(v)
    return f"<{type(v).__name__}>"


def _same(have: Any, want: Any) -> bool:
    """Equal values of identical types (``16.0`` or ``True`` is not the size ``16`` / ``1``)."""
    if type(have) is not type(want):
        return False
    if isinstance(want, tuple):
        return len(have) == len(want) and all(_same(a, b) for a, b in zip(have, want))
    return bool(have == want)


def check_sizes(root: nn.Module, where: str = "structure.json") -> None:
    """Raise :class:`LoadError` if a layer's size attributes disagree with its weights or break a size rule."""
    seen: set[int] = set()
    for name, m in root.named_modules(remove_duplicate=False):
        if id(m) in seen:
            continue
        seen.add(id(m))
        label = f"{where}: module {name or '<root>'!r} ({type(m).__name__})"
        try:
            expected = expected_size_attrs(m)
        except LoadError as exc:
            raise LoadError(f"{label}: {exc}") from None
        for attr, want in expected.items():
            if attr not in m.__dict__:
                raise LoadError(f"{label}: size attribute {attr!r} is missing (its weights imply {want!r})")
            have = m.__dict__[attr]
            if not _same(have, want):
                raise LoadError(f"{label}: has {attr}={_show(have)} but its weights imply {attr}={want!r}; "
                                "the structure disagrees with the weights")
        for desc, ok in size_constraints(m):
            if not ok:
                raise LoadError(f"{label}: violates {desc}")


def transient_attrs(m: nn.Module) -> frozenset[str]:
    """Attributes that ``save`` skips because the layer rebuilds them from its parameters."""
    if isinstance(m, nn.RNNBase):
        return frozenset({"_flat_weights", "_flat_weight_refs"})
    return frozenset()


def rebuild_transient(m: nn.Module) -> None:
    """Rebuild what :func:`transient_attrs` skipped (after parameters and attributes are restored)."""
    if isinstance(m, nn.RNNBase):
        names = m.__dict__.get("_flat_weights_names")
        if not (isinstance(names, list) and all(isinstance(n, str) for n in names)):
            raise LoadError(f"{type(m).__name__}: attribute '_flat_weights_names' must be a list of strings")
        unknown = [n for n in names if n not in m._parameters]
        if unknown:
            raise LoadError(f"{type(m).__name__}: '_flat_weights_names' names unknown parameters {unknown[:5]}")
        m._init_flat_weights()
