"""``F.normalize`` fixes the normalised dim (its ``dim``, default 1) and passes every other dim through."""

import torch
import torch.nn.functional as F

from ruletools import fixed, free, run_op, same


def test_normalize_fixes_its_dim_only():
    tr, (x,), out = run_op(lambda x: F.normalize(x, dim=-1), torch.randn(2, 3, 4))
    xd, od = tr.get(x), tr.get(out)
    assert fixed(xd[2]) and free(xd[0]) and free(xd[1])
    assert all(same(a, b) for a, b in zip(xd, od))


def test_normalize_default_dim_and_positional_dim():
    tr, (x,), _ = run_op(lambda x: F.normalize(x), torch.randn(2, 3, 4))
    assert fixed(tr.get(x)[1]) and free(tr.get(x)[0]) and free(tr.get(x)[2])
    tr, (x,), _ = run_op(lambda x: F.normalize(x, 1.0, 0), torch.randn(2, 3))
    assert fixed(tr.get(x)[0]) and free(tr.get(x)[1])


def test_heads_through_cosine_attention_stay_searchable():
    """Cosine attention normalises q and k over the head dim: the head count passes through."""
    def attn(q, k):
        q, k = q.view(2, 5, 4, 8).transpose(1, 2), k.view(2, 5, 4, 8).transpose(1, 2)
        return F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)

    tr, (q, k), out = run_op(attn, torch.randn(2, 5, 32), torch.randn(2, 5, 32))
    heads = tr.get(out)[1]
    assert heads.size == 4 and free(heads)
    assert not fixed(tr.get(q)[2]) and not free(tr.get(q)[2])  # q's width: heads searchable, head dim fixed
