"""Sharded-search scenarios shared by tests/test_fsdp.py (gloo, CPU) and tests/test_cuda.py (NCCL / CUDA).

Each scenario builds a model, then ``DMS`` on the plain model, then ``fully_shard`` on every block
and the root (the documented order), trains on this rank's slice of every global batch, exports
(collective) and returns plain CPU tensors that the tests compare across ranks and with one
process on the global batch.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import dmscale
from zoo import TinyViT

STEPS = 5
BATCH = 4
VOCAB = 64


class ConvNet(nn.Module):
    """Convolutions whose masks dmscale folds into the weights (no BatchNorm: batch statistics are per rank)."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([nn.Sequential(nn.Conv2d(3, 12, 3, padding=1), nn.ReLU()),
                                     nn.Sequential(nn.Conv2d(12, 16, 3, padding=1), nn.ReLU())])
        self.head = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for b in self.blocks:
            x = b(x)
        return self.head(x.mean((2, 3)))


def build(name: str, device: str = "cpu", model_device: str | None = None):
    """(model, blocks to shard, inputs per step, targets per step, loss fn, probe input, DMS factory).

    Data on ``device``; the model (and the DMS examples) on ``model_device`` (default: ``device``).
    """
    model_device = model_device or device
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(123)
    if name in ("gpt2", "llama"):
        if name == "gpt2":
            from transformers import GPT2Config, GPT2LMHeadModel

            model = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=16,
                                               bos_token_id=0, eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0,
                                               attn_pdrop=0.0))
            blocks = list(model.transformer.h)
        else:
            from transformers import LlamaConfig, LlamaForCausalLM

            model = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                                 num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                                 max_position_embeddings=32))
            blocks = list(model.model.layers)
        model.config.use_cache = False
        xs = [torch.randint(0, VOCAB, (BATCH, 12), generator=g).to(device) for _ in range(STEPS)]
        ys = xs

        def loss_fn(out, y):
            return F.cross_entropy(out.logits[:, :-1].reshape(-1, VOCAB), y[:, 1:].reshape(-1))
        probe = torch.randint(0, VOCAB, (3, 12), generator=g).to(device)
        model.to(model_device)

        def make_dms(m):
            ex = xs[0][:1].to(model_device)
            if name == "llama":  # the LLM recipe's search: GQA heads (one element per KV head), FFN, depth
                from dmscale.recipes.llm import build_llm_dms

                return build_llm_dms(m, ex, dmscale.Target(params=0.6), STEPS, prune_depth=True)
            return dmscale.DMS(m, (ex,), dmscale.Target(flops=0.6), STEPS)
        return model, blocks, xs, ys, loss_fn, probe, make_dms
    if name == "vit":
        model = TinyViT(img=8, patch=4, dim=16, depth=2, heads=2, n_classes=10)
    else:
        model = ConvNet()
    blocks = list(model.blocks)
    model.to(model_device)
    xs = [torch.randn(BATCH, 3, 8, 8, generator=g).to(device) for _ in range(STEPS)]
    ys = [torch.randint(0, 10, (BATCH,), generator=g).to(device) for _ in range(STEPS)]
    probe = torch.randn(3, 3, 8, 8, generator=g).to(device)
    return model, blocks, xs, ys, F.cross_entropy, probe, \
        (lambda m: dmscale.DMS(m, (xs[0][:2].to(model_device),), dmscale.Target(flops=0.5), STEPS))


def shard(model: nn.Module, blocks: list[nn.Module]) -> None:
    """``fully_shard`` every block, then the root (FSDP2's default mesh over the default process group)."""
    from torch.distributed.fsdp import fully_shard

    for b in blocks:
        fully_shard(b)
    fully_shard(model)


def logits(out):
    return out.logits if hasattr(out, "logits") else out


def cpu(x):
    """Tensors (nested in dicts) moved to the CPU, for torch.save / comparison."""
    if isinstance(x, dict):
        return {k: cpu(v) for k, v in x.items()}
    return x.detach().cpu() if isinstance(x, torch.Tensor) else x


def run(name: str, rank: int = 0, world: int = 1, *, sharded: bool | None = None, fallback: bool = False,
        device: str = "cpu") -> dict:
    """A short search on rank's slice of every global batch (sharded by default when world > 1), then export.

    ``name@cpu``: the model and DMS are built on the CPU, the search state is moved to ``device``
    and ``fully_shard`` moves the model there (the recipe for models too large for one GPU).
    """
    name, _, where = name.partition("@")
    sharded = world > 1 if sharded is None else sharded
    out: dict = {}
    for r in range(world if sharded else 1):  # one rank at a time holds the unsharded model (host memory)
        if r == rank or not sharded:
            model, blocks, xs, ys, loss_fn, probe, make_dms = build(name, device, model_device=where or None)
            dms = make_dms(model)
            if where:
                dmscale.distributed.move_search_state(dms, device)
            if sharded and fallback:  # masks re-installed on sharded parameters: convs use activation masks
                folded = len(dms.masker.raw)
                dms.masker.remove()
                shard(model, blocks)
                dms.masker.install()
                out["folded_before"], out["folded_after"] = folded, len(dms.masker.raw)
            elif sharded:
                shard(model, blocks)
        if sharded and world > 1:
            dist.barrier()
    if sharded:
        out["dtensor_params"] = sum(dmscale.distributed.is_dtensor(p) for p in model.parameters())
    opt = torch.optim.SGD([{"params": dms.weight_parameters(), "lr": 0.05},
                           {"params": dms.structure_parameters(), "lr": 0.2, "weight_decay": 0.0}])
    n = BATCH // world
    for x, y in zip(xs, ys):
        xl, yl = x[rank * n:(rank + 1) * n], y[rank * n:(rank + 1) * n]
        loss = dms.loss(loss_fn(model(xl), yl))
        opt.zero_grad()
        loss.backward()
        opt.step()
        dms.step()
    small = dms.export()  # collective when sharded: every rank gets the model
    small.eval()
    with torch.no_grad():
        out["probe"] = logits(small(probe)).clone()
    out.update({
        "ratios": {k: v.detach().clone() for k, v in dms.space.ratios.items()},
        "importance": {g.name: dms.space.importance(g).clone() for g in dms.groups},
        "kept": dms.kept(),
        "export_shapes": {k: tuple(v.shape) for k, v in small.state_dict().items()},
        "export_device": str(next(small.parameters()).device),
        "nonfinite": dms.nonfinite_steps,
        "in_sync": dmscale.distributed.search_state_in_sync(dms),
        "sharded": dmscale.distributed.is_sharded(model),
    })
    if sharded and name == "vit":
        out.update(_vit_extras(dms, model, probe))
    return cpu(out)


def _vit_extras(dms, model, probe) -> dict:
    """Folded masks read outside a forward (DTensor weight), and the rank-0-only export."""
    from dmscale.distributed import export, full_state_dict

    model.reshard()  # FSDP2 keeps the root's weights gathered after a forward: shard them for this check
    w = model.patch_embed.weight  # the parametrization on a sharded original: a DTensor
    res = {"weight_is_dtensor": dmscale.distributed.is_dtensor(w), "masked_weight": w.full_tensor().detach().clone()}
    space = next(iter(dms.trace.layers["patch_embed"].out_dims.values()))  # its output channels
    with torch.no_grad():
        dms.masker.begin_forward()
        m = dms.masker.mask_for(space)
        res["expected_weight"] = full_state_dict(model)["patch_embed.weight"] * m.view(-1, 1, 1, 1)
        dms.masker.current.clear()
    small = export(dms, rank=0, device="cpu")  # gathered into host memory on rank 0 only
    res["rank0_export_is_none"] = small is None
    if small is not None:
        res["rank0_export_device"] = str(next(small.parameters()).device)
        with torch.no_grad():
            res["rank0_probe"] = logits(small.eval()(probe.cpu())).clone()
    return res


def refusals(device: str = "cpu") -> dict:
    """DMS after fully_shard is refused; raw parameters that are sharded already cannot be masked; remove too."""
    out = {}
    model, blocks, xs, *_ = build("vit", device)
    shard(model, blocks)
    try:
        dmscale.DMS(model, (xs[0][:2],), dmscale.Target(flops=0.5), STEPS)
    except dmscale.distributed.ShardingOrderError as exc:
        out["after_order"] = str(exc)
    model, blocks, xs, *_ = build("vit", device)
    dms = dmscale.DMS(model, (xs[0][:2],), dmscale.Target(flops=0.5), STEPS)
    shard(model, blocks)
    try:
        dms.remove()
    except RuntimeError as exc:
        out["remove"] = str(exc)
    model, blocks, xs, *_ = build("vit", device)
    dms = dmscale.DMS(model, (xs[0][:2],), dmscale.Target(flops=0.5), STEPS)
    dms.masker.remove()
    shard(model, blocks)
    try:
        dms.masker.install()
    except ValueError as exc:
        out["raw_sharded"] = str(exc)
    return out


def worker(rank: int, init_file: str, out_dir: str, world: int, backend: str = "gloo", device: str = "cpu",
           names: tuple[str, ...] = ("gpt2", "llama", "vit"), extras: bool = True) -> None:
    """One rank (``mp.spawn`` target): every scenario, results to ``out_dir/rank<r>.pt``.

    ``device``: "cpu", or "cuda" (rank r uses GPU ``r % device_count``: one GPU per rank, or all
    ranks on GPU 0 when there is only one).
    """
    torch.set_num_threads(1)
    if device == "cuda":
        torch.cuda.set_device(rank % torch.cuda.device_count())
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        device = f"cuda:{torch.cuda.current_device()}"
    dist.init_process_group(backend, init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        out = {name: run(name, rank, world, sharded=True, device=device) for name in names}  # name@cpu too
        if extras:
            out["conv_fallback"] = run("conv", rank, world, sharded=True, fallback=True, device=device)
            out["refusals"] = refusals(device)
        torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def assert_same_as_single(r: dict, single: dict, atol: float = 1e-5) -> None:
    """A sharded rank's search and export equal one process on the global batch (float tolerance)."""
    assert r["kept"] == single["kept"]
    assert r["export_shapes"] == single["export_shapes"]
    for k in single["ratios"]:
        torch.testing.assert_close(r["ratios"][k], single["ratios"][k], atol=atol, rtol=1e-4)
    for k in single["importance"]:
        torch.testing.assert_close(r["importance"][k], single["importance"][k], atol=1e-7, rtol=1e-3)
    torch.testing.assert_close(r["probe"], single["probe"], atol=atol, rtol=1e-4)


def assert_ranks_agree(r0: dict, r1: dict) -> None:
    """Bitwise identical search state, kept widths and exported model on every rank."""
    assert r0["in_sync"] and r1["in_sync"]
    for key in ("ratios", "importance"):
        for k in r0[key]:
            assert torch.equal(r0[key][k], r1[key][k]), (key, k)
    assert r0["kept"] == r1["kept"] and r0["export_shapes"] == r1["export_shapes"]
    assert torch.equal(r0["probe"], r1["probe"])
