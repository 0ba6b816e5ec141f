"""Property tests: random architectures, random masks -> export == hard-masked supernet, FLOPs == accounting.

Architectures are random compositions of conv / linear / norm / residual / concat / attention
blocks (an image part, optionally followed by a token part). For each, random ratios and random
importance are set, then ``dms.export(check=False)`` must compute what ``with dms.hard(): model(x)``
computes, and ``dmscale.count(export)`` must equal ``dms.resource(soft=False)``.

CI runs ``max_examples=25``; ``DMSCALE_HYPOTHESIS_EXAMPLES=500 pytest tests/test_property.py`` runs more.
"""

from __future__ import annotations

import os
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import dmscale
from zoo import Attention

EXAMPLES = int(os.environ.get("DMSCALE_HYPOTHESIS_EXAMPLES", "25"))
SETTINGS = settings(max_examples=EXAMPLES, deadline=None, derandomize=not os.environ.get("DMSCALE_HYPOTHESIS_EXAMPLES"),
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large], print_blob=True)


# ---------------------------------------------------------------- blocks (module level: export deep-copies)
class ConvBNAct(nn.Module):
    def __init__(self, cin, cout, k=3, groups=1):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, 1, k // 2, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(cout)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


class ConvResidual(nn.Module):
    def __init__(self, c, hidden):
        super().__init__()
        self.a = ConvBNAct(c, hidden, 1)
        self.b = nn.Conv2d(hidden, c, 3, 1, 1)
        self.bn = nn.BatchNorm2d(c)

    def forward(self, x):
        return x + self.bn(self.b(self.a(x)))


class ConvConcat(nn.Module):
    def __init__(self, cin, c1, c2):
        super().__init__()
        self.p = nn.Conv2d(cin, c1, 1)
        self.q = nn.Conv2d(cin, c2, 3, 1, 1)

    def forward(self, x):
        return torch.cat([F.relu(self.p(x)), self.q(x)], dim=1)


class GroupNormBlock(nn.Module):
    def __init__(self, c, per_channel):
        super().__init__()
        self.gn = nn.GroupNorm(c if per_channel else 1, c)

    def forward(self, x):
        return self.gn(x)


class LinearAct(nn.Module):
    def __init__(self, din, dout):
        super().__init__()
        self.fc = nn.Linear(din, dout)

    def forward(self, x):
        return F.gelu(self.fc(x))


class LayerNormBlock(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.ln = nn.LayerNorm(d)

    def forward(self, x):
        return self.ln(x)


class MLPResidual(nn.Module):
    def __init__(self, d, hidden, prenorm):
        super().__init__()
        self.norm = nn.LayerNorm(d) if prenorm else nn.Identity()
        self.fc1 = nn.Linear(d, hidden)
        self.fc2 = nn.Linear(hidden, d)

    def forward(self, x):
        return x + self.fc2(F.relu(self.fc1(self.norm(x))))


class LinearConcat(nn.Module):
    def __init__(self, din, a, b):
        super().__init__()
        self.p = nn.Linear(din, a)
        self.q = nn.Linear(din, b)

    def forward(self, x):
        return torch.cat([self.p(x), F.relu(self.q(x))], dim=-1)


class AttnResidual(nn.Module):
    def __init__(self, d, heads):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.attn = Attention(d, heads)

    def forward(self, x):
        return x + self.attn(self.norm(x))


class ToTokens(nn.Module):
    def forward(self, x):
        return x.flatten(2).transpose(1, 2)


class Composed(nn.Module):
    def __init__(self, blocks, d_out, n_out, tokens):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.tokens = tokens
        self.head = nn.Linear(d_out, n_out)

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        x = x.mean(1) if self.tokens else x.mean((2, 3))
        return self.head(x)


# ---------------------------------------------------------------- strategy
WIDTHS = st.sampled_from([4, 6, 8, 12])

img_block = st.sampled_from(["conv", "conv_residual", "conv_concat", "depthwise", "gn_channel", "gn_all"])
seq_block = st.sampled_from(["linear", "norm", "residual", "residual_prenorm", "concat", "attention"])


@st.composite
def architectures(draw):
    """(spec, input shape); spec is a list of (kind, params) that `build` turns into a model."""
    spec = []
    image = draw(st.booleans())
    if image:
        c = draw(WIDTHS)
        spec.append(("stem", (3, c)))
        for kind in draw(st.lists(img_block, min_size=1, max_size=4)):
            if kind == "conv":
                c2 = draw(WIDTHS)
                spec.append((kind, (c, c2)))
                c = c2
            elif kind == "conv_residual":
                spec.append((kind, (c, draw(WIDTHS))))
            elif kind == "conv_concat":
                a, b = draw(WIDTHS), draw(WIDTHS)
                spec.append((kind, (c, a, b)))
                c = a + b
            else:
                spec.append((kind, (c,)))
        d = c
        tokens = draw(st.booleans())
        if tokens:
            spec.append(("to_tokens", ()))
        shape = (3, 4, 4)
    else:
        d = draw(WIDTHS)
        tokens = True
        shape = (3, d)
    if tokens:
        for kind in draw(st.lists(seq_block, min_size=1 if not image else 0, max_size=4)):
            if kind == "linear":
                d2 = draw(WIDTHS)
                spec.append((kind, (d, d2)))
                d = d2
            elif kind == "norm":
                spec.append((kind, (d,)))
            elif kind.startswith("residual"):
                spec.append((kind, (d, draw(WIDTHS))))
            elif kind == "concat":
                a, b = draw(WIDTHS), draw(WIDTHS)
                spec.append((kind, (d, a, b)))
                d = a + b
            else:
                heads = draw(st.sampled_from([h for h in (1, 2, 4) if d % h == 0]))
                spec.append((kind, (d, heads)))
    return spec, d, tokens, shape


def build(spec, d, tokens):
    blocks = []
    for kind, p in spec:
        if kind == "stem":
            blocks.append(ConvBNAct(*p))
        elif kind == "conv":
            blocks.append(ConvBNAct(*p))
        elif kind == "conv_residual":
            blocks.append(ConvResidual(*p))
        elif kind == "conv_concat":
            blocks.append(ConvConcat(*p))
        elif kind == "depthwise":
            blocks.append(ConvBNAct(p[0], p[0], 3, groups=p[0]))
        elif kind == "gn_channel":
            blocks.append(GroupNormBlock(p[0], True))
        elif kind == "gn_all":
            blocks.append(GroupNormBlock(p[0], False))
        elif kind == "to_tokens":
            blocks.append(ToTokens())
        elif kind == "linear":
            blocks.append(LinearAct(*p))
        elif kind == "norm":
            blocks.append(LayerNormBlock(*p))
        elif kind == "residual":
            blocks.append(MLPResidual(*p, prenorm=False))
        elif kind == "residual_prenorm":
            blocks.append(MLPResidual(*p, prenorm=True))
        elif kind == "concat":
            blocks.append(LinearConcat(*p))
        elif kind == "attention":
            blocks.append(AttnResidual(*p))
        else:
            raise AssertionError(kind)
    return Composed(blocks, d, 3, tokens)


@torch.no_grad()
def randomize(model, dms, data):
    """Random weights in BN/norm affine and running stats; random ratios and random importance."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.5, generator=data)
            m.running_var.uniform_(0.5, 2.0, generator=data)
            m.weight.normal_(1.0, 0.3, generator=data)
            m.bias.normal_(0, 0.3, generator=data)
        elif isinstance(m, (nn.LayerNorm, nn.GroupNorm)):
            m.weight.normal_(1.0, 0.3, generator=data)
            m.bias.normal_(0, 0.3, generator=data)
    for g in dms.groups:
        dms.space.ratio(g).fill_(float(torch.rand((), generator=data)) * 1.1 - 0.05)
        dms.space.importance(g).copy_(torch.rand(g.size, generator=data))
    dms.space.clamp_()


def check(spec, d, tokens, shape, seed, options=None):
    torch.manual_seed(seed)
    model = build(spec, d, tokens)
    x = torch.randn(2, *shape)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # unsupported-op warnings are fine: those dims stay unpruned
        try:
            dms = dmscale.DMS(model, (x,), dmscale.Target(flops=0.9), total_steps=10, **(options or {}))
        except ValueError as exc:
            if "no prunable group" in str(exc):
                return
            raise
    randomize(model, dms, torch.Generator().manual_seed(seed))
    model.eval()
    small = dms.export(check=False)
    small.eval()
    with torch.no_grad():
        with dms.hard():
            ref = model(x)
        got = small(x)
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)
    acc = dms.resource(soft=False)
    c = dmscale.count(small, (x,))
    assert c["params"] == float(acc["params"]), (c, acc)
    assert c["flops"] == pytest.approx(float(acc["flops"]), rel=1e-6, abs=1e-3), (c, acc)
    # the export is smaller exactly where a group keeps fewer elements


@SETTINGS
@given(arch=architectures(), seed=st.integers(0, 2 ** 16), head_dim=st.booleans(),
       divisor=st.sampled_from([1, 1, 2]))
def test_random_architecture_export_equals_hard_supernet(arch, seed, head_dim, divisor):
    spec, d, tokens, shape = arch
    check(spec, d, tokens, shape, seed, {"prune_head_dim": head_dim, "divisor": divisor})


@pytest.mark.parametrize("head_dim", [False, True])
def test_heads_equal_head_dim_regression(head_dim):
    """Found by the property test: Attention(dim=4, heads=2) has num_heads == head_dim == 2 and the
    export used to set both attributes when only the heads were pruned (ExportError)."""
    spec = [("attention", (4, 2))]
    torch.manual_seed(0)
    model = build(spec, 4, True)
    x = torch.randn(2, 3, 4)
    dms = dmscale.DMS(model, (x,), dmscale.Target(flops=0.9), total_steps=10, prune_head_dim=head_dim)
    with torch.no_grad():
        for g in dms.groups:
            dms.space.ratio(g).fill_(0.5 if g.kind in ("heads", "head_dim") else 1.0)
    small = dms.export()  # verified against the hard-masked supernet
    attn = small.blocks[0].attn
    assert attn.num_heads == 1 and attn.head_dim == (1 if head_dim else 2)
