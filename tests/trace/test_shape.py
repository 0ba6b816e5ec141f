"""Shape ops. Reshapes: one dim to one keeps its space, several to one build a product, one to several
split a space into a product (explicit ints recorded for export). Permutes reorder spaces. ``cat`` builds
a concatenation and couples the other dims; ``split`` / ``chunk`` refine a dim into a concatenation.
``stack`` couples its inputs. A contiguous slice (``x[..., a:b]``, ``narrow``, an index list of
consecutive ints) refines its dim into a concatenation; equal ``chunk`` / ``split`` pieces are one space
repeated. A dim tiled by ``repeat`` / ``tile`` / ``repeat_interleave`` (an int count) is a product of the dim
and a new fixed factor (the copies). Fixed: the dim of an int index, a strided slice, ``select``, ``unbind``,
a padded dim, a dim repeated by per-element counts or from size 1, and dims broadcast by ``expand`` (new,
fixed)."""

import torch
import torch.nn.functional as F

from ruletools import fixed, free, run_op, same


def test_view_splits_into_product_and_records_explicit_ints():
    tr, (x,), out = run_op(lambda x: x.view(2, 5, 3, 4), torch.randn(2, 5, 12))
    c = tr.get(x)[2].find()
    assert c.kind == "product" and [p.find().size for p in c.children] == [3, 4]
    assert same(tr.get(out)[2], c.children[0]) and same(tr.get(out)[3], c.children[1])
    assert same(tr.get(out)[1], tr.get(x)[1])
    assert [(r.value, r.space.find().size) for r in tr.reshapes] == [(3, 3), (4, 4)]
    assert free(c.children[0])


def test_flatten_merges_into_product():
    tr, (x,), out = run_op(lambda x: x.flatten(1), torch.randn(2, 3, 4, 5))
    m = tr.get(out)[1].find()
    assert m.kind == "product" and [same(a, b) for a, b in zip(m.children, tr.get(x)[1:])] == [True] * 3


def test_split_then_merge_gives_a_product_of_the_same_parts():
    tr, (x,), out = run_op(lambda x: x.view(2, 3, 4).reshape(2, 12), torch.randn(2, 12))
    a, b = tr.get(out)[1].find(), tr.get(x)[1].find()
    assert a.kind == b.kind == "product"
    assert [same(p, q) for p, q in zip(a.children, b.children)] == [True, True]


def test_unsqueeze_and_squeeze_keep_spaces():
    tr, (x,), out = run_op(lambda x: x.unsqueeze(1).squeeze(1), torch.randn(2, 3))
    assert all(same(a, b) for a, b in zip(tr.get(out), tr.get(x)))


def test_permutes():
    cases = [(lambda x: x.permute(2, 0, 1), [2, 0, 1]), (lambda x: x.transpose(0, 2), [2, 1, 0]),
             (lambda x: torch.movedim(x, 0, -1), [1, 2, 0]), (lambda x: x.mT, [0, 2, 1])]
    for fn, perm in cases:
        tr, (x,), out = run_op(fn, torch.randn(2, 3, 4))
        assert all(same(o, tr.get(x)[p]) for o, p in zip(tr.get(out), perm))
    tr, (x,), out = run_op(lambda x: x.T, torch.randn(2, 3))
    assert same(tr.get(out)[0], tr.get(x)[1])
    tr, (x,), out = run_op(lambda x: x.t(), torch.randn(2, 3))
    assert same(tr.get(out)[0], tr.get(x)[1])


def test_expand_broadcast_dim_is_new_and_fixed():
    tr, (x,), out = run_op(lambda x: x.expand(4, 3, 5), torch.randn(3, 1))
    od = tr.get(out)
    assert same(od[1], tr.get(x)[0]) and free(od[1])
    assert fixed(od[0]) and fixed(od[2])


def test_cat_builds_concat_and_couples_other_dims():
    tr, (a, b), out = run_op(lambda a, b: torch.cat([a, b], dim=-1), torch.randn(2, 3), torch.randn(2, 5))
    c = tr.get(out)[1].find()
    assert c.kind == "concat" and same(c.children[0], tr.get(a)[1]) and same(c.children[1], tr.get(b)[1])
    assert same(tr.get(a)[0], tr.get(b)[0])


def test_stack_couples_inputs():
    tr, (a, b), out = run_op(lambda a, b: torch.stack([a, b], 1), torch.randn(2, 3), torch.randn(2, 3))
    assert same(tr.get(a)[1], tr.get(b)[1]) and same(tr.get(out)[2], tr.get(a)[1]) and tr.get(out)[1].size == 2


def test_split_and_chunk_refine_into_concat():
    tr, (x,), (q, k, v) = run_op(lambda x: x.split(4, dim=-1), torch.randn(2, 12))
    c = tr.get(x)[1].find()
    assert c.kind == "concat" and [same(p, tr.get(t)[1]) for p, t in zip(c.children, (q, k, v))] == [True] * 3
    assert [r.value for r in tr.reshapes] == [4]
    tr, (x,), (a, b) = run_op(lambda x: x.chunk(2, dim=1), torch.randn(2, 8))
    assert tr.get(x)[1].find().kind == "concat" and free(tr.get(a)[1])


def test_unbind_fixes_its_dim():
    tr, (x,), outs = run_op(lambda x: x.unbind(1), torch.randn(2, 3, 4))
    assert fixed(tr.get(x)[1]) and same(tr.get(outs[0])[1], tr.get(x)[2])


def test_getitem():
    tr, (x,), out = run_op(lambda x: x[:, None, ..., :], torch.randn(2, 3, 4))
    od, xd = tr.get(out), tr.get(x)
    assert same(od[0], xd[0]) and od[1].size == 1 and same(od[2], xd[1]) and same(od[3], xd[2])
    assert all(free(s) for s in xd)
    tr, (x,), out = run_op(lambda x: x[:, 0], torch.randn(2, 3, 4))
    assert fixed(tr.get(x)[1]) and same(tr.get(out)[1], tr.get(x)[2]) and free(tr.get(x)[2])
    tr, (x,), out = run_op(lambda x: x[:, ::2], torch.randn(2, 3))
    assert fixed(tr.get(x)[1]) and fixed(tr.get(out)[1])


def test_contiguous_slices_cut_a_fused_dim_into_parts():
    """Phi-3's qkv_proj: q, k, v cut by positions are the three parts of one concatenation."""
    tr, (x,), (q, k, v) = run_op(lambda x: (x[..., :8], x[..., 8:12], x[..., 12:]), torch.randn(2, 16))
    c = tr.get(x)[1].find()
    assert c.kind == "concat" and [p.find().size for p in c.leaves()] == [8, 4, 4]
    assert [same(p, tr.get(t)[1]) for p, t in zip(c.leaves(), (q, k, v))] == [True] * 3
    assert all(free(tr.get(t)[1]) and "split" in tr.get(t)[1].find().tags for t in (q, k, v))
    tr, (x,), out = run_op(lambda x: x[:, :2], torch.randn(2, 3))
    assert free(tr.get(x)[1]) and same(tr.get(out)[1], tr.get(x)[1].find().children[0])


def test_index_list_of_consecutive_ints_is_a_slice():
    """Falcon's multi-query split ``qkv[..., [-2], :]`` keeps the dim, like ``[-2:-1]``."""
    tr, (x,), (q, k, v) = run_op(lambda x: (x[..., :-2, :], x[..., [-2], :], x[..., [-1], :]), torch.randn(2, 6, 4))
    c = tr.get(x)[1].find()
    assert [p.find().size for p in c.leaves()] == [4, 1, 1] and same(tr.get(q)[1], c.leaves()[0])
    assert not tr.unsupported and all(free(s) for s in tr.get(x))


def test_equal_chunks_are_one_space_repeated():
    """``gate, up = h.chunk(2)`` (Phi-3's gate_up_proj): element i of both pieces is pruned together."""
    tr, (x,), (a, b) = run_op(lambda x: x.chunk(2, dim=-1), torch.randn(2, 8))
    c = tr.get(x)[1].find()
    assert c.kind == "concat" and len(c.children) == 2 and same(c.children[0], c.children[1])
    assert same(tr.get(a)[1], tr.get(b)[1]) and free(tr.get(a)[1]) and "split" not in tr.get(a)[1].find().tags
    tr, (x,), outs = run_op(lambda x: x.split(3, dim=-1), torch.randn(2, 8))  # unequal: separate parts
    assert [p.find().size for p in tr.get(x)[1].find().children] == [3, 3, 2]
    assert not same(tr.get(outs[0])[1], tr.get(outs[1])[1])


def test_narrow_and_select():
    tr, (x,), out = run_op(lambda x: x.narrow(1, 1, 2), torch.randn(2, 3))
    assert free(tr.get(x)[1]) and same(tr.get(out)[1], tr.get(x)[1].find().children[1])
    tr, (x,), out = run_op(lambda x: x.narrow(1, 0, 3), torch.randn(2, 3))
    assert free(tr.get(x)[1]) and same(tr.get(out)[1], tr.get(x)[1])
    tr, (x,), out = run_op(lambda x: x.select(0, 1), torch.randn(2, 3))
    assert fixed(tr.get(x)[0]) and same(tr.get(out)[0], tr.get(x)[1])


def test_pad_fixes_padded_dims_only():
    tr, (x,), out = run_op(lambda x: F.pad(x, (1, 1)), torch.randn(2, 3, 4))
    assert fixed(tr.get(x)[2]) and free(tr.get(x)[1]) and same(tr.get(out)[1], tr.get(x)[1])


def test_repeat_tiles_the_repeated_dim_as_copies_times_the_dim():
    """Copy r of element i lands at r * n + i (``repeat``, ``tile``) or i * k + r (``repeat_interleave``)."""
    for fn, order in ((lambda x: x.repeat(1, 2), "copies first"), (lambda x: torch.tile(x, (2,)), "copies first"),
                      (lambda x: x.repeat_interleave(2, dim=1), "dim first")):
        tr, (x,), out = run_op(fn, torch.randn(2, 3))
        o = tr.get(out)[1].find()
        assert free(tr.get(x)[1]) and free(tr.get(x)[0]) and same(tr.get(out)[0], tr.get(x)[0])
        assert o.kind == "product" and [c.find().size for c in o.children] == ([2, 3] if order == "copies first" else [3, 2])
        dim, copies = (o.children[1], o.children[0]) if order == "copies first" else o.children
        assert same(dim, tr.get(x)[1]) and fixed(copies)
    # a leading new dim (repeat with more sizes than dims) is a new fixed space; the tiled batch of
    # DeBERTa's per-head position keys (H, P, D) -> (B * H, P, D) keeps the heads prunable
    tr, (x,), out = run_op(lambda x: x.repeat(3, 2, 1, 1), torch.randn(4, 5, 8))
    assert fixed(tr.get(out)[0]) and free(tr.get(x)[0]) and same(tr.get(out)[1].find().children[1], tr.get(x)[0])


def test_repeat_by_counts_or_from_size_one_fixes_the_dim():
    tr, (x,), out = run_op(lambda x: x.repeat_interleave(torch.tensor([1, 2, 1]), dim=1), torch.randn(2, 3))
    assert fixed(tr.get(x)[1]) and free(tr.get(x)[0]) and fixed(tr.get(out)[1])
    tr, (x,), out = run_op(lambda x: x.repeat_interleave(2), torch.randn(2, 3))  # flattened: not a product
    assert fixed(tr.get(x)[0]) and fixed(tr.get(x)[1]) and fixed(tr.get(out)[0])
    tr, (x,), out = run_op(lambda x: x.repeat(1, 4), torch.randn(2, 1))
    assert free(tr.get(x)[0]) and fixed(tr.get(out)[1])


def test_roll_fixes_the_rolled_dims_only():
    """Swin's shifted windows roll the spatial dims; the channels pass through."""
    tr, (x,), out = run_op(lambda x: torch.roll(x, shifts=(1, 1), dims=(1, 2)), torch.randn(2, 4, 4, 3))
    assert fixed(tr.get(x)[1]) and fixed(tr.get(x)[2]) and free(tr.get(x)[3]) and same(tr.get(out)[3], tr.get(x)[3])
