"""Model families for the pipelines and benchmarks: a ResNet-style CNN with width/depth multipliers (the enlarged
supernet) and a DeiT-style tiny ViT (fused qkv attention)."""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["BasicBlock", "ResNet", "TinyViT", "build", "scaled", "describe", "reinitialize"]


class BasicBlock(nn.Module):
    """ResNet basic block: two 3x3 convs with BatchNorm and a (projected) shortcut."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """A small ResNet: stem conv, stages of residual blocks (stride 2 between stages), pooling, linear head."""

    def __init__(self, widths: Sequence[int] = (16, 32, 64), depths: Sequence[int] = (2, 2, 2), in_ch: int = 1,
                 n_classes: int = 10, stem_stride: int = 1) -> None:
        super().__init__()
        widths, depths = list(widths), list(depths)
        self.stem = nn.Sequential(nn.Conv2d(in_ch, widths[0], 3, stem_stride, 1, bias=False),
                                  nn.BatchNorm2d(widths[0]), nn.ReLU())
        stages = []
        cin = widths[0]
        for i, (w, d) in enumerate(zip(widths, depths)):
            blocks = [BasicBlock(cin, w, stride=1 if i == 0 else 2)] + [BasicBlock(w, w) for _ in range(d - 1)]
            stages.append(nn.Sequential(*blocks))
            cin = w
        self.stages = nn.Sequential(*stages)
        self.head = nn.Linear(cin, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stages(self.stem(x))
        return self.head(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class _Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection (timm style)."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.qkv = nn.Linear(dim, 3 * num_heads * self.head_dim)
        self.proj = nn.Linear(num_heads * self.head_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, -1))


class _ViTBlock(nn.Module):
    """Pre-norm transformer block: attention and MLP, each with a residual."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 2.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = _Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, int(dim * mlp_ratio))
        self.fc2 = nn.Linear(int(dim * mlp_ratio), dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class TinyViT(nn.Module):
    """DeiT-style ViT: patch embedding, class token, position embedding, blocks, head on the class token."""

    def __init__(self, img: int = 16, patch: int = 4, dim: int = 32, depth: int = 3, heads: int = 4,
                 n_classes: int = 10, in_ch: int = 3) -> None:
        super().__init__()
        self.patch_embed = nn.Conv2d(in_ch, dim, patch, patch)
        n = (img // patch) ** 2
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.pos_embed = nn.Parameter(torch.randn(1, n + 1, dim) * 0.02)
        self.blocks = nn.ModuleList([_ViTBlock(dim, heads) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.norm(x)[:, 0])


def _round_half_up(x: float) -> int:
    return int(math.floor(x + 0.5))


def scaled(widths: Sequence[int], depths: Sequence[int], width_mult: float = 1.0,
           depth_mult: float = 1.0) -> tuple[list[int], list[int]]:
    """Widths and depths after the multipliers (rounded half up, at least 1)."""
    if width_mult <= 0 or depth_mult <= 0:
        raise ValueError(f"width_mult and depth_mult must be > 0, got {width_mult}, {depth_mult}")
    return ([max(1, _round_half_up(w * width_mult)) for w in widths],
            [max(1, _round_half_up(d * depth_mult)) for d in depths])


def build(widths: Sequence[int] = (16, 32, 64), depths: Sequence[int] = (2, 2, 2), in_ch: int = 1,
          n_classes: int = 10, width_mult: float = 1.0, depth_mult: float = 1.0, stem_stride: int = 1) -> ResNet:
    """The ResNet family member with widths x width_mult and depths x depth_mult (the enlarged supernet at >1)."""
    if len(widths) != len(depths) or not widths:
        raise ValueError(f"widths and depths need the same non-zero length, got {list(widths)} and {list(depths)}")
    if any(int(w) < 1 for w in widths) or any(int(d) < 1 for d in depths):
        raise ValueError(f"widths and depths must be positive, got {list(widths)} and {list(depths)}")
    w, d = scaled(widths, depths, width_mult, depth_mult)
    return ResNet(w, d, in_ch=in_ch, n_classes=n_classes, stem_stride=stem_stride)


def describe(model: nn.Module) -> dict[str, Any]:
    """Per-stage block count and conv widths of a ResNet (or its export), for reports."""
    out: dict[str, Any] = {"stem": None, "stages": []}
    stem = getattr(model, "stem", None)
    if isinstance(stem, nn.Sequential) and isinstance(stem[0], nn.Conv2d):
        out["stem"] = stem[0].out_channels
    stages = getattr(model, "stages", None)
    if isinstance(stages, nn.Sequential):
        for st in stages:
            blocks = list(st) if isinstance(st, nn.Sequential) else []
            out["stages"].append({
                "blocks": len(blocks),
                "inner": [b.conv1.out_channels for b in blocks if isinstance(b, BasicBlock)],
                "out": [b.conv2.out_channels for b in blocks if isinstance(b, BasicBlock)],
            })
    return out


@torch.no_grad()
def reinitialize(model: nn.Module, seed: int) -> nn.Module:
    """Re-initialize every layer's parameters in place (``--reset``), reproducibly from ``seed``."""
    state = torch.get_rng_state()
    torch.manual_seed(seed)
    try:
        for m in model.modules():
            if hasattr(m, "reset_parameters") and callable(m.reset_parameters):
                m.reset_parameters()
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.reset_running_stats()
    finally:
        torch.set_rng_state(state)
    return model
