"""FLOP formulas for fused ops that ``torch.utils.flop_counter`` does not count.

``torch.utils.flop_counter`` counts matmul-like aten ops (2 FLOPs per multiply-add). A few
layers run as one fused aten op in some modes, and the counter sees 0 FLOPs for them:

- ``nn.LSTM`` / ``nn.GRU`` / ``nn.RNN`` on CPU (``aten.mkldnn_rnn_layer``) and with cuDNN
  (``aten._cudnn_rnn``, ``aten.miopen_rnn``);
- the eval fast path of ``nn.TransformerEncoderLayer`` (``aten._transformer_encoder_layer_fwd``)
  and of ``nn.MultiheadAttention`` (``aten._native_multi_head_attention``);
- ``F.scaled_dot_product_attention`` on CPU (``aten._scaled_dot_product_flash_attention_for_cpu``).

The formulas here count what the unfused path computes (its input projections, recurrent
products, attention products and output projections), so a model has the same count whichever
path runs. ``FLOP_FORMULAS`` maps op packets to formulas over shapes, as
``FlopCounterMode(custom_mapping=FLOP_FORMULAS)`` expects; :func:`flop_formula` returns the
formula for an op (torch's own first), ready to call with tensors.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
from torch.utils.flop_counter import flop_registry, sdpa_flop_count, shape_wrapper

__all__ = ["FLOP_FORMULAS", "flop_formula"]

aten = torch.ops.aten


def _tokens(shape: Any) -> int:
    """Rows of an input whose last dim is the feature dim (time x batch, or packed rows)."""
    if not isinstance(shape, (tuple, list, torch.Size)) or len(shape) < 1:
        return 0
    return int(math.prod(shape[:-1]))


def _matrices(shapes: Any) -> int:
    """Sum of the element counts of the 2-D weight matrices in a list of shapes."""
    total = 0
    for s in shapes or ():
        if isinstance(s, (tuple, list, torch.Size)) and len(s) == 2:
            total += int(s[0]) * int(s[1])
    return total


def _rnn_layer_flop(input, weight0, weight1, *args, out_shape=None, **kwargs) -> int:
    """``mkldnn_rnn_layer``: one layer and direction, ``2 * rows * (|W_ih| + |W_hh|)``."""
    return 2 * _tokens(input) * _matrices([weight0, weight1])


def _cudnn_rnn_flop(input, weight, *args, out_shape=None, **kwargs) -> int:
    """``_cudnn_rnn`` / ``miopen_rnn``: every layer and direction, ``2 * rows * sum |W|`` over the 2-D weights."""
    return 2 * _tokens(input) * _matrices(weight)


def _attention_products(batch: int, tgt: int, src: int, width: int) -> int:
    """``q @ k^T`` and ``attn @ v`` over all heads: ``2 * 2 * B * L * S * E``."""
    return 4 * batch * tgt * src * width


def _encoder_layer_flop(src, embed_dim, num_heads, qkv_weight, qkv_bias, proj_weight, proj_bias, use_gelu,
                        norm_first, eps, nw1, nb1, nw2, nb2, ffn_weight_1, ffn_bias_1, ffn_weight_2, ffn_bias_2,
                        *args, out_shape=None, **kwargs) -> int:
    """``_transformer_encoder_layer_fwd`` (batch-first ``src``): projections, FFN and the attention products."""
    if not isinstance(src, (tuple, list, torch.Size)) or len(src) != 3:
        return 0
    b, n, e = (int(v) for v in src)
    rows = b * n
    mats = _matrices([qkv_weight, proj_weight, ffn_weight_1, ffn_weight_2])
    return 2 * rows * mats + _attention_products(b, n, n, e)


def _native_mha_flop(query, key, value, embed_dim, num_head, qkv_weight, qkv_bias, proj_weight, proj_bias,
                     *args, out_shape=None, **kwargs) -> int:
    """``_native_multi_head_attention`` (batch-first): q / k / v / output projections and the attention products."""
    if not all(isinstance(s, (tuple, list, torch.Size)) and len(s) == 3 for s in (query, key, value)):
        return 0
    b, lq, e = (int(v) for v in query)
    lk = int(key[1])
    w = int(qkv_weight[0]) // 3 * int(qkv_weight[1])  # one of the three stacked projections
    proj = _matrices([proj_weight])
    return 2 * b * (lq * w + 2 * lk * w + lq * proj) + _attention_products(b, lq, lk, e)


def _cpu_flash_flop(query, key, value, *args, out_shape=None, **kwargs) -> int:
    """``_scaled_dot_product_flash_attention_for_cpu``: ``q @ k^T`` and ``attn @ v`` (torch's sdpa formula)."""
    if not all(isinstance(s, (tuple, list, torch.Size)) and len(s) == 4 for s in (query, key, value)):
        return 0
    return sdpa_flop_count(query, key, value)


FLOP_FORMULAS: dict[Any, Callable[..., int]] = {
    aten._scaled_dot_product_flash_attention_for_cpu: _cpu_flash_flop,
    aten.mkldnn_rnn_layer: _rnn_layer_flop,
    aten._cudnn_rnn: _cudnn_rnn_flop,
    aten.miopen_rnn: _cudnn_rnn_flop,
    aten._transformer_encoder_layer_fwd: _encoder_layer_flop,
    aten._native_multi_head_attention: _native_mha_flop,
}

_WRAPPED = {k: shape_wrapper(v) for k, v in FLOP_FORMULAS.items()}


def flop_formula(packet: Any) -> Callable[..., int] | None:
    """The FLOP formula for an aten op packet (``fn(*args, out_val=out, **kwargs)``), or None."""
    fn = flop_registry.get(packet)
    return fn if fn is not None else _WRAPPED.get(packet)
