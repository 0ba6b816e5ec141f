"""Tiny model zoo for the μpscaling tests: plain nn models and offline HF models with random weights."""

from __future__ import annotations

import torch
from torch import nn

from dmscale.app.zoo import BasicBlock  # shared with the pipelines and the core tests


class MLP(nn.Module):
    """Plain MLP with LayerNorm: input 10 -> hidden -> hidden -> 3 classes."""

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


class ResNetCNN(nn.Module):
    """ResNet-style CNN: stem conv+BN, two residual stages, global pool, linear classifier."""

    def __init__(self, c: int = 8, classes: int = 5, in_ch: int = 3) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_ch, c, 3, 1, 1), nn.BatchNorm2d(c), nn.ReLU())
        self.layer1 = BasicBlock(c, c)
        self.layer2 = BasicBlock(c, 2 * c, stride=2)
        self.fc = nn.Linear(2 * c, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer2(self.layer1(self.stem(x)))
        return self.fc(x.mean(dim=(2, 3)))


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1x1 expand, 3x3 depthwise, 1x1 project, residual when shapes match."""

    def __init__(self, c_in: int, c_out: int, expand: int = 4, stride: int = 1) -> None:
        super().__init__()
        h = c_in * expand
        self.use_res = stride == 1 and c_in == c_out
        self.block = nn.Sequential(
            nn.Conv2d(c_in, h, 1, bias=False), nn.BatchNorm2d(h), nn.ReLU6(),
            nn.Conv2d(h, h, 3, stride, 1, groups=h, bias=False), nn.BatchNorm2d(h), nn.ReLU6(),
            nn.Conv2d(h, c_out, 1, bias=False), nn.BatchNorm2d(c_out),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.block(x)
        return x + y if self.use_res else y


class MobileNetV2ish(nn.Module):
    """MobileNetV2-style net with depthwise and a grouped conv."""

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


class TinyViT(nn.Module):
    """Small ViT: patch conv, cls token, learned positions, nn.TransformerEncoder (MHA), head."""

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


def layer_outputs(model: nn.Module, x) -> dict[str, torch.Tensor]:
    """Output of every module that owns parameters, plus the model output ('<output>'), in eval mode."""
    outs: dict[str, torch.Tensor] = {}
    handles = []
    for name, mod in model.named_modules():
        if name and any(True for _ in mod.parameters(recurse=False)):
            def hook(_m, _a, out, name=name):
                if isinstance(out, torch.Tensor):
                    outs[name] = out.detach().clone()
            handles.append(mod.register_forward_hook(hook))
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            y = model(**x) if isinstance(x, dict) else model(x)
    finally:
        model.train(was)
        for h in handles:
            h.remove()
    outs["<output>"] = getattr(y, "logits", y).detach().clone()
    return outs


def layer_diffs(small: nn.Module, big: nn.Module, x) -> dict[str, float]:
    """Max |difference| per layer between the wide model and the small one's outputs copied by the index maps.

    A folded tied-head multiplier (final norm ÷ k) is divided out of that norm's output.
    """
    from dmscale.mup import upscale_maps, width_info

    st, rec, srec = upscale_maps(big), width_info(big), width_info(small)
    ratio = rec["output_mult"] / (srec["output_mult"] if srec else 1.0)
    fold = rec["fold"] or ""
    fold_norm = fold[5:] if fold.startswith("norm:") else None
    so, bo = layer_outputs(small, x), layer_outputs(big, x)
    assert set(so) == set(bo)
    diffs = {}
    for name, a in so.items():
        b = bo[name] / ratio if name == fold_norm else bo[name]
        if a.shape != b.shape:
            axes = [i for i, (p, q) in enumerate(zip(a.shape, b.shape)) if p != q]
            assert len(axes) == 1, (name, a.shape, b.shape)
            pname = next(f"{name}.{pn}" for pn, _ in big.get_submodule(name).named_parameters(recurse=False)
                         if rec["params"][f"{name}.{pn}"]["dims"][1] is not None)
            idx = dict(st["maps"][pname])[rec["params"][pname]["dims"][1]]
            a = a.index_select(axes[0], idx)
        diffs[name] = float((a - b).abs().max())
    return diffs
