"""DMS under activation (gradient) checkpointing: the same ratio gradients and importance as without it.

Non-reentrant checkpointing (``torch.utils.checkpoint(..., use_reentrant=False)``, the Hugging Face
default in transformers 5) recomputes each block in the backward and refuses a recomputation
that saves different tensors than the forward did. DMS composes every mask before the blocks run
(in the root forward pre-hook), so a block only looks its masks up, forward and recomputation alike.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

import dmscale
from zoo import TinyViT


class CheckpointedViT(TinyViT):
    """TinyViT whose blocks run under non-reentrant checkpointing when ``ckpt`` is set."""

    ckpt = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        for blk in self.blocks:
            x = checkpoint(blk, x, use_reentrant=False) if self.ckpt else blk(x)
        return self.head(self.norm(x)[:, 0])


def _grads(dms: dmscale.DMS, loss: torch.Tensor) -> dict[str, torch.Tensor]:
    loss.backward()
    out = {f"ratio:{k}": p.grad.clone() for k, p in dms.space.ratios.items() if p.grad is not None}
    out.update({f"imp:{g.name}": dms.space.importance(g).clone() for g in dms.groups})
    return out


def _compare(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-9)
    assert any(float(v.abs().sum()) > 0 for k, v in a.items() if k.startswith("imp:"))


@pytest.mark.parametrize("frozen", [False, True], ids=["trained", "frozen"])
def test_checkpointed_blocks_give_the_same_gradients(frozen):
    res = []
    for ckpt in (False, True):
        torch.manual_seed(0)
        model = CheckpointedViT(img=8, patch=4, dim=16, depth=2, heads=2, n_classes=5)
        x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(1))
        y = torch.tensor([0, 1, 2, 3])
        dms = dmscale.DMS(model, (x[:2],), dmscale.Target(flops=0.5), total_steps=4)
        with torch.no_grad():
            for g in dms.groups:  # partial masks, composite (heads x head_dim) ones included
                dms.space.ratio(g).fill_(0.7)
        if frozen:
            for p in dms.weight_parameters():
                p.requires_grad_(False)
        model.ckpt = ckpt
        res.append(_grads(dms, dms.loss(F.cross_entropy(model(x), y))))
    _compare(*res)


def test_hf_llama_non_reentrant_gradient_checkpointing():
    pytest.importorskip("transformers")
    from transformers import LlamaConfig, LlamaForCausalLM

    from dmscale.recipes.llm import build_llm_dms, lm_loss

    res = []
    for ckpt in (False, True):
        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                             num_attention_heads=4, num_key_value_heads=2))
        model.config.use_cache = False
        for p in model.parameters():
            p.requires_grad_(False)
        model.train()
        if ckpt:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(2))
        dms = build_llm_dms(model, ids[:1], dmscale.Target(params=0.8), 10, prune_depth=True)
        with torch.no_grad():
            for g in dms.groups:
                dms.space.ratio(g).fill_(0.75)
        res.append(_grads(dms, dms.loss(lm_loss(model(ids).logits, ids))))
    _compare(*res)


def test_masks_are_composed_before_the_blocks_run():
    """After the root pre-hook every layer's mask is in the cache: a block does no mask arithmetic."""
    torch.manual_seed(0)
    model = TinyViT(img=8, patch=4, dim=16, depth=2, heads=2, n_classes=5)
    dms = dmscale.DMS(model, (torch.randn(2, 3, 8, 8),), dmscale.Target(flops=0.5), total_steps=4)
    m = dms.masker
    m.begin_forward()
    assert m._hooked
    for s in m._hooked:
        assert id(s.find()) in m._composite
    assert isinstance(model, nn.Module)
