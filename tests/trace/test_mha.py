"""``multi_head_attention_forward`` (``nn.MultiheadAttention``): the output projection's input dim is
split into heads x head_dim; the packed in-projection's rows are three stacked copies of it (separate
q/k/v weights: one each); their input dims are the widths of query / key / value; the output is the
output projection's rows. Attention weights read later, or a 3-D attn_mask, fix the heads."""

import torch
import torch.nn as nn

from dmscale.trace.tracer import trace

from ruletools import fixed, free, same


class SelfAttn(nn.Module):
    def __init__(self, d=8, h=2, use_weights=False, **kw):
        super().__init__()
        self.inp = nn.Linear(4, d)
        self.attn = nn.MultiheadAttention(d, h, batch_first=True, **kw)
        self.out = nn.Linear(d, 3)
        self.use_weights = use_weights

    def forward(self, x, mask=None):
        h = self.inp(x)
        y, w = self.attn(h, h, h, attn_mask=mask)
        y = self.out(y)
        return y + w.sum() if self.use_weights else y


def test_packed_projection_heads_and_widths():
    m = SelfAttn()
    res = trace(m, (torch.randn(2, 5, 4),))
    p = res.params
    inner = p["attn.out_proj.weight"].dims[1].find()
    assert inner.kind == "product" and [c.find().size for c in inner.children] == [2, 4]
    heads, hd = inner.children
    assert "heads" in heads.find().tags and "head_dim" in hd.find().tags and free(heads)
    qkv = p["attn.in_proj_weight"].dims[0].find()
    assert qkv.kind == "concat" and all(c.find() is inner for c in qkv.children)
    assert same(p["attn.in_proj_weight"].dims[1], p["inp.weight"].dims[0])  # input width
    assert same(p["attn.out_proj.weight"].dims[0], p["out.weight"].dims[1])  # output width
    assert same(p["attn.out_proj.bias"].dims[0], p["attn.out_proj.weight"].dims[0])
    assert p["attn.in_proj_weight"].raw and p["attn.out_proj.weight"].raw  # out_proj's forward never runs
    assert [r.attr for r in res.size_attrs] == ["num_heads"] and same(res.size_attrs[0].space, heads)
    assert sum(o.flops for o in res.ops if o.module == "attn") > 0 and not res.unsupported


def test_separate_projections_with_kdim_vdim():
    class Cross(nn.Module):
        def __init__(self):
            super().__init__()
            self.q = nn.Linear(4, 8)
            self.kv = nn.Linear(4, 6)
            self.attn = nn.MultiheadAttention(8, 2, kdim=6, vdim=6, batch_first=True)

        def forward(self, x, y):
            kv = self.kv(y)
            return self.attn(self.q(x), kv, kv, need_weights=False)[0]

    res = trace(Cross(), (torch.randn(2, 5, 4), torch.randn(2, 7, 4)))
    p = res.params
    inner = p["attn.out_proj.weight"].dims[1]
    for w in ("q", "k", "v"):
        assert same(p[f"attn.{w}_proj_weight"].dims[0], inner)
    assert same(p["attn.k_proj_weight"].dims[1], p["kv.weight"].dims[0])
    assert same(p["attn.q_proj_weight"].dims[1], p["q.weight"].dims[0])


def test_attention_weights_that_are_read_fix_the_heads():
    res = trace(SelfAttn(), (torch.randn(2, 5, 4),))
    assert free(res.params["attn.out_proj.weight"].dims[1].find().children[0])  # returned but unused: fine
    res = trace(SelfAttn(use_weights=True), (torch.randn(2, 5, 4),))
    heads = res.params["attn.out_proj.weight"].dims[1].find().children[0]
    assert fixed(heads) and any("attention weights" in r for r in heads.find().fix_reasons)


def test_3d_attn_mask_fixes_the_heads():
    mask = torch.zeros(2 * 2, 5, 5)
    res = trace(SelfAttn(), (torch.randn(2, 5, 4), mask))
    heads = res.params["attn.out_proj.weight"].dims[1].find().children[0]
    assert fixed(heads)
    res = trace(SelfAttn(), (torch.randn(2, 5, 4), torch.zeros(5, 5)))
    assert free(res.params["attn.out_proj.weight"].dims[1].find().children[0])
