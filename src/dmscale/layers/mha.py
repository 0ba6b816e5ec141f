"""``nn.MultiheadAttention``: heads and the model width are searched independently.

The op rule (:mod:`dmscale.trace.rules.mha`) labels ``F.multi_head_attention_forward``: the
attention's inner width is heads x head_dim, coupled across q, k, v and the output projection's
input; the embedding width on each side is the width of the tensors it reads and writes. Every
parameter is masked as a raw parameter (``out_proj``'s forward never runs).

torch's module computes its head size as ``embed_dim // num_heads``, so its inner width must
equal its input width. When the search keeps as many inner channels as input channels the
export stays an ``nn.MultiheadAttention``; otherwise it becomes a
:class:`PrunedMultiheadAttention` (a subclass with the same parameters and a forward that
allows ``num_heads * head_dim != embed_dim``). The fused eval fast path of torch's module and
of ``nn.TransformerEncoderLayer`` needs them equal; the subclass runs the regular path.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from .spec import LayerSpec, _register_builtin

__all__ = ["PrunedMultiheadAttention", "MULTIHEAD_ATTENTION", "TRANSFORMER"]


class PrunedMultiheadAttention(nn.MultiheadAttention):
    """``nn.MultiheadAttention`` whose inner width ``num_heads * head_dim`` may differ from ``embed_dim``.

    Made by ``dms.export()`` from a searched ``nn.MultiheadAttention`` (never constructed directly):
    same parameters, the forward of ``F.multi_head_attention_forward`` for a query of any width.
    ``embed_dim`` keeps torch's meaning for the projections (``num_heads * head_dim``); the query,
    key and value widths are those of the projection weights (``kdim`` / ``vdim`` for key / value).
    ``_qkv_same_embed_dim`` is False so that torch's fused paths (which assume equal widths) are
    not taken.
    """

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,  # noqa: D102
                key_padding_mask: torch.Tensor | None = None, need_weights: bool = True,
                attn_mask: torch.Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        is_batched = query.dim() == 3
        key_padding_mask = F._canonical_mask(mask=key_padding_mask, mask_name="key_padding_mask",
                                             other_type=F._none_or_dtype(attn_mask), other_name="attn_mask",
                                             target_type=query.dtype)
        attn_mask = F._canonical_mask(mask=attn_mask, mask_name="attn_mask", other_type=None, other_name="",
                                      target_type=query.dtype, check_other=False)
        if self.batch_first and is_batched:
            query, key, value = (t.transpose(1, 0) for t in (query, key, value))
        if not is_batched:
            query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        tgt_len, bsz, _ = query.shape
        heads, hd = self.num_heads, self.head_dim
        inner = heads * hd
        if is_causal and key_padding_mask is None and not need_weights:
            attn_mask = None
        elif is_causal and attn_mask is None:
            raise RuntimeError("Need attn_mask if specifying the is_causal hint")
        elif key_padding_mask is not None:
            is_causal = False
        if self.in_proj_weight is not None:
            w_q, w_k, w_v = self.in_proj_weight.chunk(3)
        else:
            w_q, w_k, w_v = self.q_proj_weight, self.k_proj_weight, self.v_proj_weight
        b_q, b_k, b_v = self.in_proj_bias.chunk(3) if self.in_proj_bias is not None else (None, None, None)
        q, k, v = F.linear(query, w_q, b_q), F.linear(key, w_k, b_k), F.linear(value, w_v, b_v)
        if attn_mask is not None and attn_mask.dim() == 2:
            attn_mask = attn_mask.unsqueeze(0)
        if self.bias_k is not None and self.bias_v is not None:
            k = torch.cat([k, self.bias_k.repeat(1, bsz, 1)])
            v = torch.cat([v, self.bias_v.repeat(1, bsz, 1)])
            if attn_mask is not None:
                attn_mask = F.pad(attn_mask, (0, 1))
            if key_padding_mask is not None:
                key_padding_mask = F.pad(key_padding_mask, (0, 1))
        q = q.view(tgt_len, bsz * heads, hd).transpose(0, 1)
        k = k.view(k.shape[0], bsz * heads, hd).transpose(0, 1)
        v = v.view(v.shape[0], bsz * heads, hd).transpose(0, 1)
        if self.add_zero_attn:
            zeros = torch.zeros((bsz * heads, 1, hd), dtype=k.dtype, device=k.device)
            k, v = torch.cat([k, zeros], dim=1), torch.cat([v, zeros], dim=1)
            if attn_mask is not None:
                attn_mask = F.pad(attn_mask, (0, 1))
            if key_padding_mask is not None:
                key_padding_mask = F.pad(key_padding_mask, (0, 1))
        src_len = k.size(1)
        if key_padding_mask is not None:
            kpm = key_padding_mask.view(bsz, 1, 1, src_len).expand(-1, heads, -1, -1).reshape(bsz * heads, 1, src_len)
            attn_mask = kpm if attn_mask is None else attn_mask + kpm
        dropout_p = self.dropout if self.training else 0.0
        if need_weights:
            q_scaled = q * math.sqrt(1.0 / float(hd))
            if is_causal and attn_mask is None:
                raise RuntimeError("is_causal is not implemented with need_weights")
            if attn_mask is not None:
                weights = torch.baddbmm(attn_mask, q_scaled, k.transpose(-2, -1))
            else:
                weights = torch.bmm(q_scaled, k.transpose(-2, -1))
            weights = F.softmax(weights, dim=-1)
            if dropout_p > 0.0:
                weights = F.dropout(weights, p=dropout_p)
            out = torch.bmm(weights, v).transpose(0, 1).reshape(tgt_len * bsz, inner)
            out = F.linear(out, self.out_proj.weight, self.out_proj.bias).view(tgt_len, bsz, -1)
            weights = weights.view(bsz, heads, tgt_len, src_len)
            if average_attn_weights:
                weights = weights.mean(dim=1)
            if not is_batched:
                out, weights = out.squeeze(1), weights.squeeze(0)
        else:
            if attn_mask is not None:
                if attn_mask.size(0) == 1 and attn_mask.dim() == 3:
                    attn_mask = attn_mask.unsqueeze(0)
                else:
                    attn_mask = attn_mask.view(bsz, heads, -1, src_len)
            q, k, v = q.view(bsz, heads, tgt_len, hd), k.view(bsz, heads, src_len, hd), v.view(bsz, heads, src_len, hd)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask, dropout_p, is_causal)
            out = out.permute(2, 0, 1, 3).reshape(bsz * tgt_len, inner)
            out = F.linear(out, self.out_proj.weight, self.out_proj.bias).view(tgt_len, bsz, -1)
            weights = None
            if not is_batched:
                out = out.squeeze(1)
        if self.batch_first and is_batched:
            out = out.transpose(1, 0)
        return out, weights


def _widths(mod: nn.Module) -> tuple[int, int, int]:
    """Widths of the query / key / value the module reads."""
    if mod.in_proj_weight is not None:
        return (mod.in_proj_weight.shape[1],) * 3
    return tuple(getattr(mod, f"{p}_proj_weight").shape[1] for p in "qkv")


def _mha_sizes(mod: nn.Module) -> dict[str, Any]:
    _, k_in, v_in = _widths(mod)
    inner = mod.out_proj.weight.shape[1]
    if isinstance(mod, PrunedMultiheadAttention) or mod.in_proj_weight is None:
        embed = inner  # torch's meaning: the width of the q / k / v projections
    else:
        embed = mod.in_proj_weight.shape[1]
    return {"embed_dim": embed, "kdim": k_in, "vdim": v_in, "head_dim": inner // mod.num_heads}


def _mha_update(mod: nn.Module) -> None:
    """After export slicing (``num_heads`` already set from the kept heads): the subclass when the inner
    width no longer equals the query width, then the sizes from the weights."""
    q_in = _widths(mod)[0]
    if mod.out_proj.weight.shape[1] != q_in and type(mod) is nn.MultiheadAttention:
        mod.__class__ = PrunedMultiheadAttention
    for attr, value in _mha_sizes(mod).items():
        setattr(mod, attr, value)
    if isinstance(mod, PrunedMultiheadAttention):
        mod._qkv_same_embed_dim = False  # torch's fused paths assume inner == embed_dim == query width


MULTIHEAD_ATTENTION = LayerSpec("mha", params=(), size_attrs=_mha_sizes, update_attrs=_mha_update)
_register_builtin((nn.MultiheadAttention,), MULTIHEAD_ATTENTION)


def _transformer_sizes(mod: nn.Module) -> dict[str, Any]:
    """``nn.Transformer`` checks its inputs against ``d_model``: the model width after export, read off the
    encoder's final norm (or, without one, the first encoder layer's attention output)."""
    norm = getattr(mod.encoder, "norm", None)
    w = getattr(norm, "weight", None)
    if isinstance(w, torch.Tensor):
        return {"d_model": int(w.shape[0])}
    for layer in getattr(mod.encoder, "layers", ()):
        attn = getattr(layer, "self_attn", None)
        if isinstance(attn, nn.MultiheadAttention):
            return {"d_model": int(attn.out_proj.weight.shape[0])}
    return {}


TRANSFORMER = LayerSpec("transformer", params=(), size_attrs=_transformer_sizes)
_register_builtin((nn.Transformer,), TRANSFORMER)
