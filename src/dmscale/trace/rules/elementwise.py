"""Elementwise ops: every dim passes through; operands are united by numpy broadcasting."""

from __future__ import annotations

import torch

from ..registry import op_rule, tensors

# one tensor in, same shape out (activations, casts, dropout, pointwise math); a tensor second
# operand (``pow``, ``clamp``) is broadcast-united like a binary op
UNARY = (
    "relu", "relu_", "relu6", "gelu", "silu", "silu_", "tanh", "tanh_", "hardtanh", "hardtanh_", "hardswish",
    "leaky_relu", "leaky_relu_", "elu", "elu_", "selu", "celu", "mish", "neg", "__neg__", "abs", "dropout",
    "dropout_", "alpha_dropout", "feature_alpha_dropout", "dropout1d", "dropout2d", "dropout3d", "clone",
    "contiguous", "to", "type", "type_as", "float", "half", "bfloat16", "double", "detach", "requires_grad_",
    "clamp", "clamp_", "clip", "sign", "sin", "asin", "atan", "sinh", "erf", "gelu_", "prelu",
    "hardshrink", "softshrink", "tanhshrink", "square", "pow", "__pow__", "rrelu", "sqrt", "cpu", "cuda",
    "hardsigmoid", "sigmoid", "exp", "cos", "cosh", "log", "rsqrt", "reciprocal", "softplus", "logsigmoid",
    "nan_to_num", "round", "floor", "ceil", "trunc", "frac", "erfc", "exp2", "expm1", "log1p", "log2",
    "__invert__", "logical_not", "bitwise_not", "isnan", "isinf", "isfinite", "sigmoid_", "relu6_",
    "__abs__", "float_power", "pin_memory", "__deepcopy__", "cumsum_", "long", "int", "short", "bool", "byte",
    "char",
)
# several tensors (or scalars) in, the broadcast shape out
BINARY = (
    "add", "add_", "__add__", "__radd__", "__iadd__", "sub", "sub_", "__sub__", "__rsub__", "__isub__", "rsub",
    "mul", "mul_", "__mul__", "__rmul__", "__imul__", "div", "div_", "__div__", "__truediv__", "__rtruediv__",
    "__itruediv__", "true_divide", "floor_divide", "__floordiv__", "maximum", "minimum", "where", "masked_fill",
    "masked_fill_", "eq", "ne", "lt", "le", "gt", "ge", "__eq__", "__ne__", "__lt__", "__le__", "__gt__", "__ge__",
    "logical_and", "logical_or", "__and__", "__or__", "__xor__", "__mod__", "remainder", "fmod", "addcmul",
    "addcdiv", "lerp", "copysign", "atan2", "hypot", "xlogy", "pow_", "__rpow__", "fmax", "fmin", "__iand__",
    "__ior__", "bitwise_and", "bitwise_or", "copy_", "__rdiv__",
)


@op_rule(*UNARY)
def unary(tr, c) -> None:
    """Same shape out: out has the input's spaces; a tensor operand is broadcast-united (also when it
    broadcasts the output to a new shape, as ``torch.pow(base, exponents)``). Fixes nothing.

    Any other output of a different shape is unsupported.
    """
    src = c.args[0] if c.args and isinstance(c.args[0], torch.Tensor) else c.kwargs.get("input")
    out = c.out
    if src is None and isinstance(out, torch.Tensor) and tensors((c.args, c.kwargs)):  # ``torch.pow(2, t)``
        return tr.broadcast_union(tensors((c.args, c.kwargs)), out)
    others = [t for t in tensors((c.args[1:], c.kwargs)) if t is not src]
    if isinstance(src, torch.Tensor) and isinstance(out, torch.Tensor) and others:
        return tr.broadcast_union([src] + others, out)  # ``torch.pow(base, exponents)`` broadcasts like a binary op
    if isinstance(src, torch.Tensor) and isinstance(out, torch.Tensor) and out.shape == src.shape:
        tr.set(out, list(tr.get(src)))
        return
    tr.unknown(c.name, c.args, c.kwargs, c.out)


@op_rule(*BINARY)
def binary(tr, c) -> None:
    """Couples equally sized aligned dims of all tensor operands (size-1 dims broadcast). Fixes nothing."""
    if isinstance(c.out, torch.Tensor):
        return tr.broadcast_union(tensors((c.args, c.kwargs)), c.out)
    tr.unknown(c.name, c.args, c.kwargs, c.out)


@op_rule("triu", "tril")
def same_labels(tr, c) -> None:
    """Every output has the input's spaces."""
    src = c.args[0]
    for t in tensors(c.out):
        tr.set(t, list(tr.get(src)))


@op_rule("get:data")
def data(tr, c) -> None:
    """``t.data`` has ``t``'s spaces."""
    src = c.args[0] if c.args else None
    if not isinstance(src, torch.Tensor):
        return tr.unknown(c.name, c.args, c.kwargs, c.out)
    tr.set(c.out, list(tr.get(src)))


@op_rule("get:real", "get:imag")
def real_imag(tr, c) -> None:
    """``t.real`` / ``t.imag`` of the same shape have ``t``'s spaces (otherwise unsupported)."""
    src = c.args[0] if c.args else None
    if not (isinstance(src, torch.Tensor) and c.out.shape == src.shape):
        return tr.unknown(c.name, c.args, c.kwargs, c.out)
    tr.set(c.out, list(tr.get(src)))
