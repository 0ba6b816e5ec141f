"""``einsum``: one general rule read off the subscripts.

Every occurrence of a subscript letter is one space (operands' dims and the output's dim with
that letter are coupled); ``...`` dims are aligned from the right like broadcasting. A letter
summed over in a single operand (``"ij->i"``) is a reduction and fixed, a letter repeated in one
operand (a diagonal, ``"ii->i"``) is fixed; a letter contracted between operands couples them
like a matmul. With two operands, batch letters (in both operands and the output) that are
factors of a split dim are tagged attention ``heads``, contracted split factors ``head_dim``.
"""

from __future__ import annotations

import torch

from ..registry import op_rule
from ..spaces import Space, fix, union
from .matmul import tag_folded_heads


def _parse(term: str, ndim: int) -> list[str] | None:
    """Letters of one operand's subscripts, with '...' expanded to keys '.k' counted from the right."""
    if term.count("...") > 1:
        return None
    if "..." in term:
        left, right = term.split("...")
        n_ell = ndim - len(left) - len(right)
        if n_ell < 0:
            return None
        keys = list(left) + [f".{n_ell - j}" for j in range(n_ell)] + list(right)
    else:
        keys = list(term)
    if len(keys) != ndim or any(len(k) == 1 and not k.isalpha() for k in keys):
        return None
    return keys


@op_rule("einsum")
def einsum(tr, c) -> None:
    """See the module docstring. Records the op's FLOPs over every letter's space."""
    eq = c.args[0] if c.args else c.kwargs.get("equation")
    ops = list(c.args[1:])
    if len(ops) == 1 and isinstance(ops[0], (list, tuple)):
        ops = list(ops[0])
    if not isinstance(eq, str) or not all(isinstance(t, torch.Tensor) for t in ops) or \
            not isinstance(c.out, torch.Tensor):
        return tr.unknown(c.name, c.args, c.kwargs, c.out)
    eq = eq.replace(" ", "")
    lhs, arrow, rhs = eq.partition("->")
    terms = lhs.split(",")
    if len(terms) != len(ops):
        return tr.unknown(c.name, c.args, c.kwargs, c.out)
    keys = [_parse(t, op.dim()) for t, op in zip(terms, ops)]
    if any(k is None for k in keys):
        return tr.unknown(c.name, c.args, c.kwargs, c.out)
    where = tr.current_module() or "model"
    spaces: dict[str, Space] = {}
    sizes: dict[str, int] = {}
    count: dict[str, int] = {}  # in how many operands a letter appears
    for op, ks in zip(ops, keys):
        dims = list(tr.get(op))
        seen: dict[str, Space] = {}
        for k, s, n in zip(ks, dims, op.shape):
            if k in seen:  # a diagonal: positions pair up, export could not slice one side
                fix(seen[k], f"einsum diagonal '{k}' in {where}")
                fix(s, f"einsum diagonal '{k}' in {where}")
                continue
            seen[k] = s
            count[k] = count.get(k, 0) + 1
            if n == 1 and sizes.get(k, 1) != 1:
                continue  # broadcast
            if k in spaces and sizes[k] == n:
                spaces[k] = union(spaces[k], s)
            elif k not in spaces or sizes[k] == 1:
                spaces[k], sizes[k] = s, n
        if tr.is_param(op):
            tr.mark_raw(op)
    ell = sorted({k for ks in keys for k in ks if k.startswith(".")}, key=lambda k: -int(k[1:]))
    if arrow:
        out_keys = _parse(rhs, c.out.dim())
    else:  # implicit output: broadcast dims, then the letters that appear once, in alphabetical order
        once = sorted(k for k in count if not k.startswith(".") and
                      sum(ks.count(k) for ks in keys) == 1)
        out_keys = ell + once
    if out_keys is None or len(out_keys) != c.out.dim():
        return tr.unknown(c.name, c.args, c.kwargs, c.out)
    od: list[Space] = []
    for k, n in zip(out_keys, c.out.shape):
        s = spaces.get(k)
        od.append(s if s is not None and sizes[k] == n else Space(n, "einsum"))
    for k, s in spaces.items():
        if k in out_keys:
            continue
        if count.get(k, 0) < 2 and sizes[k] > 1:
            fix(s, f"einsum sums over '{k}' in {where}")
    if len(ops) == 2:
        batch = [k for k in out_keys if all(k in ks for ks in keys) and not k.startswith(".")]
        contracted = [k for k in spaces if k not in out_keys and count.get(k, 0) >= 2]
        tag_folded_heads([spaces[k] for k in batch], [spaces[k] for k in contracted])
    tr.set(c.out, od)
    tr.record_op("einsum", c.flops, [spaces[k] for k in spaces if sizes[k] > 1])
