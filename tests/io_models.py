"""Tiny module zoo for the save/load tests (module-level classes so they are importable by path)."""

from __future__ import annotations

import enum

import torch
import torch.nn.functional as F
from torch import nn


class MLP(nn.Module):
    """Plain MLP with a function-valued activation attribute."""

    def __init__(self, d_in: int = 8, hidden: int = 16, d_out: int = 4) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d_in, hidden)
        self.fc2 = nn.Linear(hidden, d_out, bias=False)
        self.act = F.gelu
        self.scale = 0.5

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x))) * self.scale


class ResidualBlock(nn.Module):
    """Conv-BN-ReLU-Conv-BN with a residual add."""

    def __init__(self, c: int, mid: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c, mid, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.conv2 = nn.Conv2d(mid, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        return F.relu(x + self.bn2(self.conv2(y)))


class SmallCNN(nn.Module):
    """Stem, two residual blocks (different widths), pooled classifier."""

    def __init__(self, c: int = 8, classes: int = 5) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU())
        self.blocks = nn.ModuleList([ResidualBlock(c, 12), ResidualBlock(c, 5)])
        self.pool = nn.AdaptiveAvgPool2d((1, 1))
        self.head = nn.Linear(c, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for b in self.blocks:
            x = b(x)
        return self.head(torch.flatten(self.pool(x), 1))


class Mode(enum.Enum):
    """Example enum attribute."""

    FAST = "fast"
    EXACT = "exact"


class Attention(nn.Module):
    """Multi-head self-attention whose head count/size live in int attributes (prunable)."""

    def __init__(self, dim: int, num_heads: int, head_dim: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.q = nn.Linear(dim, num_heads * head_dim)
        self.k = nn.Linear(dim, num_heads * head_dim)
        self.v = nn.Linear(dim, num_heads * head_dim)
        self.o = nn.Linear(num_heads * head_dim, dim)
        self.mode = Mode.EXACT
        self.dtype_hint = torch.float32
        self.meta = {"heads": (num_heads,), 3: [1.5, None], "$odd": {"x"}}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        shape = (b, t, self.num_heads, self.head_dim)
        q, k, v = (p(x).view(shape).transpose(1, 2) for p in (self.q, self.k, self.v))
        att = torch.softmax(q @ k.transpose(-1, -2) / self.head_dim**0.5, dim=-1)
        return self.o((att @ v).transpose(1, 2).reshape(b, t, self.num_heads * self.head_dim))


class Block(nn.Module):
    """Pre-norm transformer block with a custom attention and a two-layer MLP."""

    def __init__(self, dim: int = 32, num_heads: int = 4, hidden: int = 64) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads, dim // num_heads)
        self.ln2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.register_buffer("pos_scale", torch.linspace(0.5, 1.5, dim), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x)))) * self.pos_scale


class TinyTransformer(nn.Module):
    """Embedding + blocks + head; head shares (ties) the embedding weight and holds a shared submodule."""

    def __init__(self, vocab: int = 50, dim: int = 32, depth: int = 2) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.blocks = nn.ModuleList([Block(dim) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.embed.weight  # tied
        self.final_norm = self.norm  # shared submodule under a second name
        self.block_list = [self.blocks[0]]  # plain attribute referring to a tree module
        self.index = torch.arange(dim)  # plain tensor attribute (e.g. kept channel indices)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        for b in self.blocks:
            x = b(x)
        return self.head(self.final_norm(x)[..., self.index])


def prune_linear(lin: nn.Linear, keep_out: torch.Tensor | None = None, keep_in: torch.Tensor | None = None) -> nn.Linear:
    """A smaller ``nn.Linear`` with the selected output rows / input columns (what an export produces)."""
    w = lin.weight.detach()
    b = lin.bias.detach() if lin.bias is not None else None
    if keep_out is not None:
        w = w[keep_out]
        b = b[keep_out] if b is not None else None
    if keep_in is not None:
        w = w[:, keep_in]
    new = nn.Linear(w.shape[1], w.shape[0], bias=b is not None)
    with torch.no_grad():
        new.weight.copy_(w)
        if b is not None:
            new.bias.copy_(b)
    return new


def prune_block(block: Block, heads: int, hidden: int) -> None:
    """Physically shrink a Block: keep the first ``heads`` heads and ``hidden`` MLP units."""
    attn = block.attn
    keep = torch.arange(heads * attn.head_dim)
    attn.q = prune_linear(attn.q, keep_out=keep)
    attn.k = prune_linear(attn.k, keep_out=keep)
    attn.v = prune_linear(attn.v, keep_out=keep)
    attn.o = prune_linear(attn.o, keep_in=keep)
    attn.num_heads = heads
    attn.meta = {"heads": (heads,), 3: [1.5, None], "$odd": {"x"}}
    units = torch.arange(hidden)
    block.fc1 = prune_linear(block.fc1, keep_out=units)
    block.fc2 = prune_linear(block.fc2, keep_in=units)


class NotAModule:
    """A class that must never be instantiated by ``load``."""


class SharedStorage(nn.Module):
    """Two buffers that are different views of one storage (safetensors refuses those as-is)."""

    def __init__(self) -> None:
        super().__init__()
        base = torch.arange(12.0)
        self.register_buffer("a", base[:4])
        self.register_buffer("b", base[4:].view(2, 4).t())  # non-contiguous view
        self.lin = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x * self.a) + self.b.sum()


def local_scale(x: torch.Tensor, factor: float = 2.0) -> torch.Tensor:
    """A module-level function of this package (loading a partial of it needs trust=["io_models"])."""
    return x * factor


class PartialActs(nn.Module):
    """Activations held as ``functools.partial`` of allowlisted functions (as HF ``GELUTanh`` does)."""

    def __init__(self) -> None:
        super().__init__()
        import functools

        self.fc = nn.Linear(5, 7)
        self.gelu = functools.partial(F.gelu, approximate="tanh")
        self.softmax = functools.partial(F.softmax, dim=-1)
        self.scale = functools.partial(local_scale, factor=0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale(self.softmax(self.gelu(self.fc(x))))


class RecurrentClassifier(nn.Module):
    """LSTM (bidirectional, projected) + GRU + linear head: RNN flat weights are rebuilt on load."""

    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(6, 10, num_layers=2, batch_first=True, bidirectional=True, proj_size=4)
        self.gru = nn.GRU(8, 5, batch_first=True)
        self.head = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, _ = self.lstm(x)
        g, _ = self.gru(h)
        return self.head(g[:, -1])


class OddSizes(nn.Module):
    """Odd-sized tensors, so most tensors start at offsets of the weights file that are not 64-byte aligned."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(37, 129)
        self.n = nn.LayerNorm(129)
        self.b = nn.Linear(129, 67)
        self.c = nn.Conv1d(3, 5, 3)
        self.register_buffer("odd", torch.randn(13))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.n(torch.relu(self.a(x)))) + self.odd.sum()


class EinsumDense(nn.Module):
    """A user's layer whose sizes live in attributes (``dmscale.register_layer`` tells load how to check them)."""

    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__()
        self.n_in, self.n_out = n_in, n_out
        self.kernel = nn.Parameter(torch.randn(n_in, n_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.einsum("ni,io->no", x, self.kernel)
