"""The one model zoo of the tests: tiny CPU-sized models of the architectures dmscale must handle.

Module-level classes, so that ``dmscale.save`` records them as ``zoo:Class`` and ``dmscale.load`` rebuilds
them when the caller trusts ``"zoo"``. Sections:

- search and export: ``MLP``, ``ResNetCNN``, ``MobileNetV2ish``, ``TinyViT`` (and its block's ``Attention``);
- save/load: ``AttrMLP``, ``SmallCNN``, ``TinyTransformer`` and the odd cases (enums, partials, shared storage,
  RNNs, odd sizes, a user layer ``EinsumDense``, ``NotAModule``);
- μpscaling: ``NormMLP``, ``DeepMLP``, ``BasicResNet``, ``GroupedMobileNet``, ``EncoderViT``, tiny Hugging Face
  models (``hf_gpt2``, ``hf_llama``, ``hf_vit``, ``hf_resnet``) and ``randomize_norms``.

The Hugging Face family matrix of the coverage tests (``(model, args, kwargs)`` builders) is ``hf_models.py``.
"""

from __future__ import annotations

import enum
import functools
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

# the pipelines' models: one definition for the tests and the library
from dmscale.app.zoo import BasicBlock, ResNet, TinyViT
from dmscale.app.zoo import _Attention as Attention  # TinyViT's fused-qkv attention, tested on its own

__all__ = [
    "MLP", "ResNetCNN", "InvertedResidual", "MobileNetV2ish", "Attention", "TinyViT",
    "AttrMLP", "ResidualBlock", "SmallCNN", "Mode", "SplitAttention", "TransformerBlock", "TinyTransformer",
    "NotAModule", "SharedStorage", "local_scale", "PartialActs", "RecurrentClassifier", "OddSizes", "EinsumDense",
    "NormMLP", "DeepMLP", "BasicResNet", "GroupedMobileNet", "EncoderViT", "hf_gpt2", "hf_llama", "hf_vit",
    "hf_resnet", "randomize_norms",
]


# ------------------------------------------------------------------------------------------ search and export

class MLP(nn.Module):
    """Three Linear layers with ReLU."""

    def __init__(self, d_in: int = 16, hidden: int = 32, n_out: int = 5) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d_in, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.fc3 = nn.Linear(hidden, n_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(F.relu(self.fc2(F.relu(self.fc1(x)))))


class ResNetCNN(ResNet):
    """The pipelines' small ResNet (stem, residual stages, pooling, linear head) with test defaults."""

    def __init__(self, widths=(8, 16), depths=(2, 2), n_classes: int = 10, in_ch: int = 3) -> None:
        super().__init__(widths, depths, in_ch=in_ch, n_classes=n_classes)


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1x1 expand, 3x3 depthwise, 1x1 project, residual when shapes match."""

    def __init__(self, cin: int, cout: int, stride: int = 1, expand: int = 4) -> None:
        super().__init__()
        hid = cin * expand
        self.use_res = stride == 1 and cin == cout
        self.block = nn.Sequential(
            nn.Conv2d(cin, hid, 1, bias=False), nn.BatchNorm2d(hid), nn.ReLU6(inplace=True),
            nn.Conv2d(hid, hid, 3, stride, 1, groups=hid, bias=False), nn.BatchNorm2d(hid), nn.ReLU6(inplace=True),
            nn.Conv2d(hid, cout, 1, bias=False), nn.BatchNorm2d(cout),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.block(x)
        return x + y if self.use_res else y


class MobileNetV2ish(nn.Module):
    """A tiny MobileNetV2: stem, inverted residual blocks, 1x1 head conv, classifier."""

    def __init__(self, n_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU6(inplace=True))
        self.features = nn.Sequential(
            InvertedResidual(8, 8, 1, 2), InvertedResidual(8, 12, 2, 3), InvertedResidual(12, 12, 1, 3),
            InvertedResidual(12, 12, 1, 3),
        )
        self.head = nn.Sequential(nn.Conv2d(12, 32, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU6(inplace=True))
        self.classifier = nn.Sequential(nn.Dropout(0.0), nn.Linear(32, n_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.head(self.features(self.stem(x)))
        return self.classifier(x.mean((2, 3)))


# ------------------------------------------------------------------------------------------------- save/load

class AttrMLP(nn.Module):
    """Two Linear layers whose activation is a function-valued attribute and scale a float attribute."""

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


class SplitAttention(nn.Module):
    """Multi-head self-attention with separate q/k/v projections; head count/size live in int attributes."""

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


class TransformerBlock(nn.Module):
    """Pre-norm transformer block with a custom attention and a two-layer MLP."""

    def __init__(self, dim: int = 32, num_heads: int = 4, hidden: int = 64) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(dim)
        self.attn = SplitAttention(dim, num_heads, dim // num_heads)
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
        self.blocks = nn.ModuleList([TransformerBlock(dim) for _ in range(depth)])
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
    """A module-level function of this package (loading a partial of it needs trust=["zoo"])."""
    return x * factor


class PartialActs(nn.Module):
    """Activations held as ``functools.partial`` of allowlisted functions (as HF ``GELUTanh`` does)."""

    def __init__(self) -> None:
        super().__init__()
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
    """A user's layer, ``y = x @ kernel + b`` written with einsum (no op rule), whose sizes live in attributes its
    forward uses (``dmscale.register_layer`` tells search, export and load about it)."""

    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__()
        self.n_in, self.n_out = n_in, n_out
        self.kernel = nn.Parameter(torch.randn(n_in, n_out) / math.sqrt(n_in))
        self.b = nn.Parameter(0.1 * torch.randn(n_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.einsum("ni,io->no", x.reshape(-1, self.n_in), self.kernel) + self.b
        return y.reshape(*x.shape[:-1], self.n_out)


# ------------------------------------------------------------------------------------------------ μpscaling

class NormMLP(nn.Module):
    """MLP with GELU, LayerNorm and Tanh: input 10 -> hidden -> hidden -> 3 classes."""

    def __init__(self, d_in: int = 10, hidden: int = 16, d_out: int = 3) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(d_in, hidden), nn.GELU(), nn.LayerNorm(hidden),
            nn.Linear(hidden, hidden), nn.Tanh(), nn.Linear(hidden, d_out),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class DeepMLP(nn.Module):
    """MLP with uneven hidden widths: 10 -> h0 -> h1 -> h2 -> 3 (LayerNorm after the first layer)."""

    def __init__(self, hidden: tuple[int, int, int] = (6, 8, 10), d_in: int = 10, d_out: int = 3) -> None:
        super().__init__()
        h0, h1, h2 = hidden
        self.net = nn.Sequential(
            nn.Linear(d_in, h0), nn.GELU(), nn.LayerNorm(h0),
            nn.Linear(h0, h1), nn.Tanh(), nn.Linear(h1, h2), nn.ReLU(), nn.Linear(h2, d_out),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class BasicResNet(nn.Module):
    """ResNet-style CNN with named stages: stem conv+BN, ``layer1``, ``layer2`` (stride 2), pool, ``fc``."""

    def __init__(self, c: int = 8, classes: int = 5, in_ch: int = 3) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_ch, c, 3, 1, 1), nn.BatchNorm2d(c), nn.ReLU())
        self.layer1 = BasicBlock(c, c)
        self.layer2 = BasicBlock(c, 2 * c, stride=2)
        self.fc = nn.Linear(2 * c, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer2(self.layer1(self.stem(x)))
        return self.fc(x.mean(dim=(2, 3)))


class GroupedMobileNet(nn.Module):
    """MobileNetV2-style net with depthwise convs, then a grouped conv and GroupNorm."""

    def __init__(self, c: int = 8, classes: int = 4) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, c, 3, 2, 1, bias=False), nn.BatchNorm2d(c), nn.ReLU6())
        self.b1 = InvertedResidual(c, c)
        self.b2 = InvertedResidual(c, 2 * c, stride=2)
        self.grouped = nn.Conv2d(2 * c, 2 * c, 3, 1, 1, groups=2)
        self.gn = nn.GroupNorm(2, 2 * c)
        self.head = nn.Linear(2 * c, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.gn(self.grouped(self.b2(self.b1(self.stem(x)))))
        return self.head(x.mean(dim=(2, 3)))


class EncoderViT(nn.Module):
    """Small ViT on ``nn.TransformerEncoder`` (``nn.MultiheadAttention``): patch conv, cls token, positions, head."""

    def __init__(self, dim: int = 16, heads: int = 2, depth: int = 2, classes: int = 5,
                 img: int = 16, patch: int = 4) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, dim, patch, patch)
        n = (img // patch) ** 2
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.pos_embed = nn.Parameter(torch.randn(1, n + 1, dim) * 0.02)
        layer = nn.TransformerEncoderLayer(dim, heads, 2 * dim, dropout=0.0, batch_first=True,
                                           norm_first=True, activation="gelu")
        self.encoder = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        x = self.norm(self.encoder(x))
        return self.head(x[:, 0])


def hf_gpt2(hidden: int = 32, heads: int = 4, layers: int = 2, vocab: int = 61, tied: bool = True):
    """Tiny GPT2LMHeadModel (tied embeddings unless tied=False, Conv1D, fused c_attn), dropout off."""
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(n_embd=hidden, n_head=heads, n_layer=layers, vocab_size=vocab, n_positions=32,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
                     tie_word_embeddings=tied)
    return GPT2LMHeadModel(cfg)


def hf_llama(hidden: int = 32, heads: int = 4, kv_heads: int = 2, layers: int = 2, vocab: int = 61):
    """Tiny LlamaForCausalLM with GQA (4 query / 2 KV heads) and RoPE."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_attention_heads=heads,
                      num_key_value_heads=kv_heads, num_hidden_layers=layers, vocab_size=vocab,
                      max_position_embeddings=64)
    return LlamaForCausalLM(cfg)


def hf_vit(hidden: int = 32, heads: int = 4, layers: int = 2):
    """Tiny ViTForImageClassification (16x16 images, 4x4 patches, 3 classes)."""
    from transformers import ViTConfig, ViTForImageClassification

    cfg = ViTConfig(hidden_size=hidden, num_attention_heads=heads, num_hidden_layers=layers,
                    intermediate_size=2 * hidden, image_size=16, patch_size=4, num_labels=3,
                    hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return ViTForImageClassification(cfg)


def hf_resnet():
    """Tiny ResNetForImageClassification (basic blocks, BatchNorm)."""
    from transformers import ResNetConfig, ResNetForImageClassification

    cfg = ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic",
                       num_labels=3)
    return ResNetForImageClassification(cfg)



def randomize_norms(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give norm weights/biases and BatchNorm running stats non-trivial values (stronger tests)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            for name in ("weight", "bias"):
                t = getattr(m, name, None)
                if isinstance(t, torch.Tensor) and t.dim() == 1 and "Norm" in type(m).__name__:
                    t.copy_(1.0 + 0.3 * torch.randn(t.shape, generator=g) if name == "weight"
                            else 0.1 * torch.randn(t.shape, generator=g))
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
                m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=g))
                m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=g))
    return model
