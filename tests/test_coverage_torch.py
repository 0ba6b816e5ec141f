"""Coverage matrix, plain torch: architectures users bring, each searched for 40 steps with Adam.

For every model: the dimensions a user expects are searchable (group kinds and names), nothing is
lost silently (``trace.lost`` is what the row expects), the budget is met after
``dmscale.budget.project`` (``dmscale.count`` of the export against the target, within the row's
tolerance), the export equals the hard-masked supernet, ``dms.resource(soft=False)`` equals
``dmscale.count(export)``, and the ``dmscale.save`` / ``load`` round trip gives bit-identical outputs.
The README's coverage table lists what each row searches.
"""

from __future__ import annotations

import inspect
import os
from dataclasses import dataclass, field
from typing import Callable

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import dmscale
from dmscale.budget import project
from dmscale.layers import PrunedMultiheadAttention

STEPS = 40
# dmscale.budget.project lands within 1% of the target once it can move more than a common offset of the
# width ratios (the exact-budget work adds ``fallback``); today's common offset misses on coarse models
EXACT_BUDGET = "fallback" in inspect.signature(project).parameters


pytestmark = pytest.mark.usefixtures("one_thread")


# --------------------------------------------------------------------------- the models
class EncoderClassifier(nn.Module):
    """nn.TransformerEncoder (post-norm layers, batch first) between a linear embedding and a head."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(8, 32)
        layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 3, enable_nested_tensor=False)
        self.head = nn.Linear(32, 5)

    def forward(self, x):
        return self.head(self.encoder(self.embed(x)).mean(1))


class TransformerSeq2Seq(nn.Module):
    """nn.Transformer (encoder-decoder, checks its inputs against d_model) between embeddings and a head."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(40, 32)
        self.transformer = nn.Transformer(32, 4, 2, 2, 64, dropout=0.0, batch_first=True)
        self.out = nn.Linear(32, 40)

    def forward(self, src, tgt):
        return self.out(self.transformer(self.embed(src), self.embed(tgt)))


def _seq2seq_transformer_checks(model, small):
    t = small.transformer
    assert t.d_model == small.embed.embedding_dim == small.out.in_features
    assert t.encoder.norm.weight.shape[0] == t.decoder.norm.weight.shape[0] == t.d_model


class Bottleneck(nn.Module):
    def __init__(self, c: int, width: int, groups: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, groups=groups, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, c, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(c)

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        y = F.relu(self.bn2(self.conv2(y)))
        return F.relu(x + self.bn3(self.conv3(y)))


class ResNeXt(nn.Module):
    """ResNeXt bottlenecks with 8 groups of 4 channels."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.layer = nn.Sequential(Bottleneck(16, 32, 8), Bottleneck(16, 32, 8), Bottleneck(16, 32, 8))
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        return self.fc(self.layer(self.stem(x)).mean((2, 3)))


def _double_conv(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(),
                         nn.Conv2d(cout, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU())


class UNet(nn.Module):
    """Two-level UNet: max-pool down, ConvTranspose2d up, skip connections concatenated."""

    def __init__(self) -> None:
        super().__init__()
        self.down1 = _double_conv(3, 8)
        self.down2 = _double_conv(8, 16)
        self.bottom = _double_conv(16, 32)
        self.up2 = nn.ConvTranspose2d(32, 16, 2, stride=2)
        self.dec2 = _double_conv(32, 16)
        self.up1 = nn.ConvTranspose2d(16, 8, 2, stride=2)
        self.dec1 = _double_conv(16, 8)
        self.out = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        a = self.down1(x)
        b = self.down2(F.max_pool2d(a, 2))
        c = self.bottom(F.max_pool2d(b, 2))
        d = self.dec2(torch.cat([self.up2(c), b], 1))
        return self.out(self.dec1(torch.cat([self.up1(d), a], 1)))


class EinsumAttention(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, d // heads
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)

    def forward(self, x):
        b, n, _ = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, self.head_dim).unbind(2)
        att = torch.einsum("bihd,bjhd->bhij", q, k).mul(self.head_dim ** -0.5).softmax(-1)
        return self.proj(torch.einsum("bhij,bjhd->bihd", att, v).reshape(b, n, -1))


class EinsumBlock(nn.Module):
    def __init__(self, d: int = 32, heads: int = 4) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(d)
        self.attn = EinsumAttention(d, heads)
        self.norm2 = nn.LayerNorm(d)
        self.w1 = nn.Parameter(torch.randn(d, 2 * d) / d ** 0.5)  # an einsum MLP with raw weights
        self.w2 = nn.Parameter(torch.randn(2 * d, d) / (2 * d) ** 0.5)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        h = F.gelu(torch.einsum("bnd,df->bnf", self.norm2(x), self.w1))
        return x + torch.einsum("bnf,fd->bnd", h, self.w2)


class EinsumTransformer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(8, 32)
        self.blocks = nn.ModuleList([EinsumBlock(), EinsumBlock()])
        self.head = nn.Linear(32, 4)

    def forward(self, x):
        x = self.embed(x)
        for blk in self.blocks:
            x = blk(x)
        return self.head(x.mean(1))


class FoldedHeadsAttention(nn.Module):
    """Heads folded into the batch dim before ``bmm`` (``view(B * H, T, D)``, as DeBERTa and older fairseq
    code do), with a content->position term: per-head keys of a learned position table, tiled over the
    batch with ``repeat`` and read back by ``gather`` (DeBERTa's c2p)."""

    def __init__(self, d: int, heads: int, positions: int) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, d // heads
        self.q, self.k, self.v = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.pos = nn.Parameter(torch.randn(2 * positions, d) / d ** 0.5)
        self.pos_key = nn.Linear(d, d)
        self.proj = nn.Linear(d, d)

    def fold(self, x):
        b, t, _ = x.shape
        return x.view(b, t, self.heads, self.head_dim).transpose(1, 2).reshape(b * self.heads, t, self.head_dim)

    def forward(self, x):
        b, t, _ = x.shape
        q, k, v = self.fold(self.q(x)), self.fold(self.k(x)), self.fold(self.v(x))
        att = torch.bmm(q, k.transpose(1, 2)) * self.head_dim ** -0.5
        span = self.pos.shape[0] // 2
        pos_k = self.fold(self.pos_key(self.pos.unsqueeze(0))).repeat(b, 1, 1)  # (B * H, 2 * span, D)
        rel = torch.arange(t)[:, None] - torch.arange(t)[None, :]
        index = torch.clamp(rel + span, 0, 2 * span - 1).unsqueeze(0).expand(b * self.heads, t, t)
        att = att + torch.gather(torch.bmm(q, pos_k.transpose(1, 2)), -1, index)
        out = torch.bmm(att.softmax(-1), v).view(b, self.heads, t, self.head_dim)
        return self.proj(out.transpose(1, 2).reshape(b, t, -1))


class FoldedHeadsTransformer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(8, 32)
        self.attn = nn.ModuleList([FoldedHeadsAttention(32, 4, 6) for _ in range(2)])
        self.mlp = nn.ModuleList([nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 32)) for _ in range(2)])
        self.head = nn.Linear(32, 4)

    def forward(self, x):
        x = self.embed(x)
        for attn, mlp in zip(self.attn, self.mlp):
            x = x + attn(x)
            x = x + mlp(x)
        return self.head(x.mean(1))


def _folded_heads_checks(model, small):
    kept = [a.heads for a in small.attn]
    assert all(a.q.out_features == a.k.out_features == a.pos_key.out_features == a.heads * a.head_dim
               for a in small.attn)
    assert min(kept) < 4 and all(a.proj.in_features == a.heads * 8 for a in small.attn)


class RoundSTE(torch.autograd.Function):
    """Quantise to quarters in the forward, straight-through gradient in the backward."""

    @staticmethod
    def forward(ctx, x):
        return torch.round(x * 4) / 4

    @staticmethod
    def backward(ctx, grad):
        return grad


class QuantMLP(nn.Module):
    """A custom autograd.Function between two searched layers."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(12, 48)
        self.fc2 = nn.Linear(48, 32)
        self.fc3 = nn.Linear(32, 4)

    def forward(self, x):
        h = RoundSTE.apply(F.relu(self.fc1(x)))
        return self.fc3(F.relu(self.fc2(h)))


class LSTMClassifier(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(50, 16)
        self.lstm = nn.LSTM(16, 32, num_layers=2, batch_first=True)
        self.fc = nn.Linear(32, 4)

    def forward(self, tokens):
        _, (h, _) = self.lstm(self.embed(tokens))
        return self.fc(h[-1])


class GRUSeq2Seq(nn.Module):
    """GRU encoder, GRU decoder started from the encoder's state, teacher-forced decoder inputs."""

    def __init__(self) -> None:
        super().__init__()
        self.src_embed = nn.Embedding(30, 12)
        self.tgt_embed = nn.Embedding(30, 12)
        self.encoder = nn.GRU(12, 24, batch_first=True)
        self.decoder = nn.GRU(12, 24, batch_first=True)
        self.out = nn.Linear(24, 30)

    def forward(self, src, tgt):
        _, h = self.encoder(self.src_embed(src))
        y, _ = self.decoder(self.tgt_embed(tgt), h)
        return self.out(y)


def _separable(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cin, 3, stride, 1, groups=cin, bias=False), nn.BatchNorm2d(cin), nn.ReLU(),
                         nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


class SeparableCNN(nn.Module):
    """Depthwise-separable convolutions (MobileNetV1 style)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.features = nn.Sequential(_separable(16, 32, 1), _separable(32, 48, 2), _separable(48, 48, 1))
        self.fc = nn.Linear(48, 10)

    def forward(self, x):
        return self.fc(self.features(self.stem(x)).mean((2, 3)))


class MixerBlock(nn.Module):
    def __init__(self, tokens: int, d: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(d)
        self.token_mlp = nn.Sequential(nn.Linear(tokens, 32), nn.GELU(), nn.Linear(32, tokens))
        self.norm2 = nn.LayerNorm(d)
        self.channel_mlp = nn.Sequential(nn.Linear(d, 64), nn.GELU(), nn.Linear(64, d))

    def forward(self, x):
        x = x + self.token_mlp(self.norm1(x).transpose(1, 2)).transpose(1, 2)
        return x + self.channel_mlp(self.norm2(x))


class MLPMixer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, 32, 4, 4)
        self.blocks = nn.Sequential(MixerBlock(16, 32), MixerBlock(16, 32))
        self.norm = nn.LayerNorm(32)
        self.head = nn.Linear(32, 10)

    def forward(self, x):
        x = self.patch(x).flatten(2).transpose(1, 2)
        return self.head(self.norm(self.blocks(x)).mean(1))


class ChannelsFirstLayerNorm(nn.LayerNorm):
    """ConvNeXt's LayerNorm over dim 1 of (N, C, H, W), a subclass that overrides forward."""

    def forward(self, x):
        u = x.mean(1, keepdim=True)
        s = (x - u).pow(2).mean(1, keepdim=True)
        x = (x - u) / torch.sqrt(s + self.eps)
        return self.weight[:, None, None] * x + self.bias[:, None, None]


class ConvNeXtBlock(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(d, d, 7, padding=3, groups=d)
        self.norm = nn.LayerNorm(d, eps=1e-6)
        self.pwconv1 = nn.Linear(d, 4 * d)
        self.pwconv2 = nn.Linear(4 * d, d)
        self.gamma = nn.Parameter(torch.full((d,), 0.5))

    def forward(self, x):
        y = self.norm(self.dwconv(x).permute(0, 2, 3, 1))
        y = self.gamma * self.pwconv2(F.gelu(self.pwconv1(y)))
        return x + y.permute(0, 3, 1, 2)


class ConvNeXt(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 2, 2), ChannelsFirstLayerNorm(16, eps=1e-6))
        self.stage = nn.Sequential(ConvNeXtBlock(16), ConvNeXtBlock(16))
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        return self.head(self.stage(self.stem(x)).mean((2, 3)))


# --------------------------------------------------------------------------- the matrix
@dataclass
class Row:
    make: Callable[[], nn.Module]
    inputs: Callable[[], tuple]
    groups: dict[str, str]  # group name -> kind that must be searchable
    target: float = 0.5
    budget_today: float = 0.01  # how far below the target today's common-offset projection may land
    extra: Callable[[nn.Module, nn.Module], None] | None = None  # model-specific checks on (model, export)
    lost: list[str] = field(default_factory=list)  # names of dims the trace may not search


def _ints(*shape, high=30):
    return lambda: (torch.randint(0, high, shape),)


def _randn(*shape):
    return lambda: (torch.randn(*shape),)


def _encoder_checks(model, small):
    assert len(small.encoder.layers) >= 1
    for layer in small.encoder.layers:
        a = layer.self_attn
        width = small.embed.out_features
        assert a.in_proj_weight.shape[1] == layer.linear1.in_features == layer.norm1.weight.shape[0] == width
        assert a.embed_dim == a.num_heads * a.head_dim
        assert isinstance(a, PrunedMultiheadAttention) == (a.embed_dim != width)


def _resnext_checks(model, small):
    for blk in small.layer:
        g = blk.conv2
        assert g.groups <= 8 and g.in_channels == g.weight.shape[1] * g.groups == blk.conv1.out_channels


def _lstm_checks(model, small):
    assert small.lstm.hidden_size == small.fc.in_features <= 32


def _seq2seq_checks(model, small):
    assert small.encoder.hidden_size == small.decoder.hidden_size == small.out.in_features


ROWS = {
    "transformer_encoder": Row(EncoderClassifier, _randn(4, 6, 8),
                               {"embed": "width", "encoder.layers.0.self_attn.out_proj[heads]": "heads",
                                "encoder.layers.0.linear1": "width", "encoder.layers[depth]": "depth"},
                               budget_today=0.1, extra=_encoder_checks),
    "nn_transformer_seq2seq": Row(TransformerSeq2Seq,
                                  lambda: (torch.randint(0, 40, (4, 7)), torch.randint(0, 40, (4, 5))),
                                  {"embed": "width", "transformer.encoder.layers.0.self_attn.out_proj[heads]": "heads",
                                   "transformer.decoder.layers.0.multihead_attn.out_proj[heads]": "heads",
                                   "transformer.decoder.layers.0.linear1": "width",
                                   "transformer.encoder.layers[depth]": "depth"},
                                  budget_today=0.1, extra=_seq2seq_transformer_checks),
    "resnext_g8": Row(ResNeXt, _randn(4, 3, 8, 8),
                      {"stem.0": "width", "layer.0.conv1[groups]": "groups", "layer.0.conv1": "width",
                       "layer.0.conv2": "width", "layer[depth]": "depth"}, budget_today=0.3,
                      extra=_resnext_checks),
    "unet_convtranspose": Row(UNet, _randn(2, 3, 8, 8),
                              {"down1.0": "width", "down2.3": "width", "up2": "width", "up1": "width",
                               "dec1.0": "width"}),
    "einsum_attention": Row(EinsumTransformer, _randn(4, 6, 8),
                            {"embed": "width", "blocks.0.attn.qkv[heads]": "heads", "blocks.0": "width",
                             "blocks[depth]": "depth"}),
    # heads folded into the batch dim + bmm: searched as heads; the position table's rows are read by
    # gather (positions, not channels) and named as lost
    "folded_heads_bmm": Row(FoldedHeadsTransformer, _randn(4, 6, 8),
                            {"embed": "width", "attn.0.q[heads]": "heads", "attn.1.q[heads]": "heads",
                             "mlp.0.0": "width"}, lost=["attn.0", "attn.1"], extra=_folded_heads_checks),
    "autograd_function": Row(QuantMLP, _randn(16, 12), {"fc1": "width", "fc2": "width"}, budget_today=0.02),
    "lstm_classifier": Row(LSTMClassifier, _ints(4, 7, high=50), {"embed": "width", "lstm": "width"},
                           budget_today=0.1, extra=_lstm_checks),
    "gru_seq2seq": Row(GRUSeq2Seq, lambda: (torch.randint(0, 30, (4, 6)), torch.randint(0, 30, (4, 5))),
                       {"src_embed": "width", "tgt_embed": "width", "encoder": "width"}, budget_today=0.1,
                       extra=_seq2seq_checks),
    "separable_cnn": Row(SeparableCNN, _randn(4, 3, 8, 8),
                         {"stem.0": "width", "features.0.3": "width", "features.1.3": "width"}),
    "mlp_mixer": Row(MLPMixer, _randn(4, 3, 16, 16),
                     {"patch": "width", "blocks.0.token_mlp.0": "width", "blocks.0.channel_mlp.0": "width",
                      "blocks[depth]": "depth"}),
    "convnext_channels_first": Row(ConvNeXt, _randn(4, 3, 8, 8),
                                   {"stem.0": "width", "stage.0.pwconv1": "width", "stage[depth]": "depth"}),
}


def _search(row: Row):
    torch.manual_seed(0)
    model = row.make()
    inputs = row.inputs()
    with torch.no_grad():
        target_out = torch.randn_like(model(*inputs).float())
    dms = dmscale.DMS(model, inputs, dmscale.Target(flops=row.target), total_steps=STEPS, warn=False)
    opt = torch.optim.Adam([{"params": dms.weight_parameters(), "lr": 1e-3},
                            {"params": dms.structure_parameters(), "lr": 0.05}])
    model.train()
    for _ in range(STEPS):
        loss = dms.loss(F.mse_loss(model(*inputs), target_out))
        opt.zero_grad()
        loss.backward()
        opt.step()
        dms.step()
    return model, dms, inputs


def _load(path):
    """``dmscale.load``, trusting this test module's classes where the loader asks for it."""
    if "trust" in inspect.signature(dmscale.load).parameters:
        return dmscale.load(path, trust=[__name__])
    return dmscale.load(path)


@pytest.mark.parametrize("name", list(ROWS))
def test_coverage_row(name, tmp_path):
    row = ROWS[name]
    model, dms, inputs = _search(row)
    # the dimensions a user expects are searchable, and nothing is lost without being named
    kinds = {g.name: g.kind for g in dms.groups}
    for gname, kind in row.groups.items():
        assert kinds.get(gname) == kind, f"{gname}: expected a {kind} group, groups are {kinds}"
    assert [d.name for d in dms.trace.lost] == row.lost, dms.trace.lost_text()
    # the budget, measured on the export
    full = dmscale.count(model, inputs)["flops"]
    with torch.no_grad():
        proj = project(dms, warn=False)
    small = dms.export()
    got = dmscale.count(small, inputs)["flops"]
    assert got == pytest.approx(float(dms.resource(soft=False)["flops"]), rel=1e-9)
    assert got / full <= row.target * (1 + 1e-6)
    tol = 0.01 if EXACT_BUDGET else row.budget_today
    assert got / full >= row.target * (1 - tol), f"{name}: {got / full:.4f} of the model ({proj})"
    assert any(k < f for f, k in dms.kept().values())
    # the export computes the hard-masked supernet
    model.eval()
    small.eval()
    with torch.no_grad():
        with dms.hard():
            ref = model(*inputs)
        out = small(*inputs)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    if row.extra is not None:
        row.extra(model, small)
    # the round trip is exact
    path = os.path.join(tmp_path, name)
    try:
        dmscale.save(small, path)
    except TypeError as exc:
        if "_flat_weight_refs" in str(exc):  # RNN flat-weight references: fixed by the serialization branch
            pytest.xfail(f"dmscale.save cannot save an RNN's flat weight list on this branch: {exc}")
        raise
    loaded = _load(path)
    loaded.eval()
    with torch.no_grad():
        again = loaded(*inputs)
    assert torch.equal(again, out)
