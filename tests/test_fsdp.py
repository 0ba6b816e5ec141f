"""Sharded search: DMS on models sharded with FSDP2 ``fully_shard`` over 2 gloo processes on CPU.

The documented order: ``DMS(model, ...)`` on the plain model after ``init_process_group``, then
``fully_shard`` on every block and the root. Every rank trains on its half of each global batch;
the ranks must hold bitwise identical search state, export the identical model, and match one
process on the global batch (float tolerance: FSDP reduce-scatters the weight gradients).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F

import dmscale
from models import TinyViT

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")

WORLD = 2
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


def _build(name: str):
    """(model, blocks to shard, global inputs per step, targets per step, loss fn, probe input, DMS factory)."""
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
        xs = [torch.randint(0, VOCAB, (BATCH, 12), generator=g) for _ in range(STEPS)]
        ys = xs

        def loss_fn(out, y):
            return F.cross_entropy(out.logits[:, :-1].reshape(-1, VOCAB), y[:, 1:].reshape(-1))
        probe = torch.randint(0, VOCAB, (3, 12), generator=g)

        def make_dms(m):
            if name == "llama":  # the LLM recipe's search: GQA heads (one element per KV head), FFN, depth
                from dmscale.recipes.llm import build_llm_dms

                return build_llm_dms(m, xs[0][:1], dmscale.Target(params=0.6), STEPS, prune_depth=True)
            return dmscale.DMS(m, (xs[0][:1],), dmscale.Target(flops=0.6), STEPS)
        return model, blocks, xs, ys, loss_fn, probe, make_dms
    if name == "vit":
        model = TinyViT(img=8, patch=4, dim=16, depth=2, heads=2, n_classes=10)
        blocks = list(model.blocks)
    else:
        model = ConvNet()
        blocks = list(model.blocks)
    xs = [torch.randn(BATCH, 3, 8, 8, generator=g) for _ in range(STEPS)]
    ys = [torch.randint(0, 10, (BATCH,), generator=g) for _ in range(STEPS)]
    probe = torch.randn(3, 3, 8, 8, generator=g)
    return model, blocks, xs, ys, F.cross_entropy, probe, \
        (lambda m: dmscale.DMS(m, (xs[0][:2],), dmscale.Target(flops=0.5), STEPS))


def _shard(model: nn.Module, blocks: list[nn.Module]) -> None:
    from torch.distributed.fsdp import fully_shard

    for b in blocks:
        fully_shard(b)
    fully_shard(model)


def _logits(out):
    return out.logits if hasattr(out, "logits") else out


def _run(name: str, rank: int = 0, world: int = 1, fallback: bool = False) -> dict:
    """A short search on rank's slice of every global batch (sharded when world > 1), then export."""
    model, blocks, xs, ys, loss_fn, probe, make_dms = _build(name)
    dms = make_dms(model)
    out: dict = {}
    if world > 1:
        if fallback:  # masks re-installed on sharded parameters: conv layers use activation masks
            folded = len(dms.masker.raw)
            dms.masker.remove()
            _shard(model, blocks)
            dms.masker.install()
            out["folded_before"], out["folded_after"] = folded, len(dms.masker.raw)
        else:
            _shard(model, blocks)
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
        out["probe"] = _logits(small(probe)).clone()
    out.update({
        "ratios": {k: v.detach().clone() for k, v in dms.space.ratios.items()},
        "importance": {g.name: dms.space.importance(g).clone() for g in dms.groups},
        "kept": dms.kept(),
        "export_shapes": {k: tuple(v.shape) for k, v in small.state_dict().items()},
        "nonfinite": dms.nonfinite_steps,
        "in_sync": dmscale.distributed.search_state_in_sync(dms),
        "sharded": dmscale.distributed.is_sharded(model),
    })
    if world > 1 and name == "vit":
        out.update(_vit_extras(dms, model, probe))
    return out


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
    small = export(dms, rank=0)
    res["rank0_export_is_none"] = small is None
    if small is not None:
        with torch.no_grad():
            res["rank0_probe"] = _logits(small.eval()(probe)).clone()
    return res


def _refusals() -> dict:
    """DMS after fully_shard is refused; raw parameters that are sharded already cannot be masked; remove too."""
    out = {}
    model, blocks, xs, *_ = _build("vit")
    _shard(model, blocks)
    try:
        dmscale.DMS(model, (xs[0][:2],), dmscale.Target(flops=0.5), STEPS)
    except dmscale.distributed.ShardingOrderError as exc:
        out["after_order"] = str(exc)
    model, blocks, xs, *_ = _build("vit")
    dms = dmscale.DMS(model, (xs[0][:2],), dmscale.Target(flops=0.5), STEPS)
    _shard(model, blocks)
    try:
        dms.remove()
    except RuntimeError as exc:
        out["remove"] = str(exc)
    model, blocks, xs, *_ = _build("vit")
    dms = dmscale.DMS(model, (xs[0][:2],), dmscale.Target(flops=0.5), STEPS)
    dms.masker.remove()
    _shard(model, blocks)
    try:
        dms.masker.install()
    except ValueError as exc:
        out["raw_sharded"] = str(exc)
    return out


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        out = {name: _run(name, rank, WORLD) for name in ("gpt2", "llama", "vit")}
        out["conv_fallback"] = _run("conv", rank, WORLD, fallback=True)
        out["refusals"] = _refusals()
        torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """Every sharded scenario in one spawn of 2 gloo processes (start-up is the slow part)."""
    d = tmp_path_factory.mktemp("fsdp")
    mp.spawn(_worker, args=(str(d / "init"), str(d)), nprocs=WORLD, join=True)
    return [torch.load(d / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]


def _same_as_single(r: dict, single: dict, atol: float = 1e-5) -> None:
    assert r["kept"] == single["kept"]
    assert r["export_shapes"] == single["export_shapes"]
    for k in single["ratios"]:
        torch.testing.assert_close(r["ratios"][k], single["ratios"][k], atol=1e-5, rtol=1e-4)
    for k in single["importance"]:
        torch.testing.assert_close(r["importance"][k], single["importance"][k], atol=1e-7, rtol=1e-3)
    torch.testing.assert_close(r["probe"], single["probe"], atol=atol, rtol=1e-4)


@pytest.mark.parametrize("name", ["gpt2", "llama", "vit"])
def test_fsdp_search_equals_single_process_and_ranks_agree(name, ranks):
    r0, r1 = ranks[0][name], ranks[1][name]
    assert r0["sharded"] and r0["dtensor_params"] > 0
    assert r0["in_sync"] and r1["in_sync"]
    for key in ("ratios", "importance"):  # bitwise identical on every rank
        for k in r0[key]:
            assert torch.equal(r0[key][k], r1[key][k]), (key, k)
    assert r0["kept"] == r1["kept"] and r0["export_shapes"] == r1["export_shapes"]
    assert torch.equal(r0["probe"], r1["probe"])  # the same exported model on every rank
    torch.set_num_threads(1)
    single = _run(name)
    assert not single["sharded"]
    assert any(k < f for f, k in single["kept"].values()), "the search pruned nothing: test is vacuous"
    assert any(float(v.sum()) > 0 for v in single["importance"].values())
    _same_as_single(r0, single)
    assert r0["nonfinite"] == 0


def test_llama_gqa_heads_searched_per_kv_head(ranks):
    kept = ranks[0]["llama"]["kept"]
    heads = {k: v for k, v in kept.items() if k.endswith("[heads]")}
    assert heads and all(full == 2 for full, _ in heads.values()), heads  # 2 KV heads, their 4 query heads follow


def test_folded_mask_on_sharded_weight_outside_forward(ranks):
    """Reading a folded (parametrized) weight whose original FSDP sharded: a DTensor, correctly masked."""
    for r in ranks:
        v = r["vit"]
        assert v["weight_is_dtensor"]
        torch.testing.assert_close(v["masked_weight"], v["expected_weight"])
        assert not torch.equal(v["masked_weight"], v["expected_weight"] * 0)


def test_rank0_only_export(ranks):
    assert not ranks[0]["vit"]["rank0_export_is_none"] and ranks[1]["vit"]["rank0_export_is_none"]
    assert torch.equal(ranks[0]["vit"]["rank0_probe"], ranks[0]["vit"]["probe"])


def test_masks_on_already_sharded_weights_fall_back_to_activation_masks(ranks):
    r0, r1 = ranks[0]["conv_fallback"], ranks[1]["conv_fallback"]
    assert r0["folded_before"] > 0 and r0["folded_after"] == 0  # conv weights were folded; now activation hooks
    assert r0["in_sync"] and r1["in_sync"] and torch.equal(r0["probe"], r1["probe"])
    torch.set_num_threads(1)
    single = _run("conv")  # unsharded: the masks are folded into the conv weights
    assert any(k < f for f, k in single["kept"].values())
    _same_as_single(r0, single)


def test_wrong_order_and_unsupported_operations_are_clear_errors(ranks):
    for r in ranks:
        msgs = r["refusals"]
        assert "before fully_shard" in msgs["after_order"] and "blocks.0" in msgs["after_order"]
        assert "cannot be removed" in msgs["remove"]
        raw = msgs["raw_sharded"]
        assert "already sharded" in raw and ("pos_embed" in raw or "cls_token" in raw)


# ---------------------------------------------------------------------------------------------- resume
WORKER = Path(__file__).with_name("_fsdp_resume_worker.py")


def _worker_run(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    src = str(Path(__file__).resolve().parents[1] / "src")
    env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, str(WORKER), *args], capture_output=True, text=True, env=env,
                          timeout=600)


def test_sharded_resume_is_bit_identical(tmp_path):
    """Crash after step 5 (last checkpoint at 3), resume from the sharded checkpoint: ends bit-identical."""
    from dmscale.serialization.checkpoint import load_checkpoint

    full = _worker_run(str(tmp_path / "ck_full"), str(tmp_path / "full.pt"), "--steps", "8", "--every", "3")
    assert full.returncode == 0, full.stderr[-3000:]
    crashed = _worker_run(str(tmp_path / "ck"), str(tmp_path / "res.pt"), "--steps", "8", "--every", "3",
                          "--crash-at", "5")
    assert crashed.returncode == 3, crashed.stderr[-3000:]
    assert not (tmp_path / "res.pt").exists()
    resumed = _worker_run(str(tmp_path / "ck"), str(tmp_path / "res.pt"), "--steps", "8", "--every", "3", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed 3 {'step': 3}" in resumed.stdout
    a, b = load_checkpoint(tmp_path / "full.pt"), load_checkpoint(tmp_path / "res.pt")
    assert a["step"] == b["step"] == 8 and a["refining"] and b["refining"]  # crossed into the refine phase
    assert a["kept"] == b["kept"]
    for key in ("ratios", "importance", "weights", "export"):
        assert a[key].keys() == b[key].keys()
        for k in a[key]:
            assert torch.equal(a[key][k], b[key][k]), (key, k)
    assert torch.equal(a["probe"], b["probe"])


# ---------------------------------------------------------------------------------------------- single process
def test_sharded_checkpoint_roundtrip_and_refusals_without_process_group(tmp_path):
    """The DCP checkpoint works in one process; foreign dirs, other searches and code in metadata are refused."""
    import pickle

    from dmscale.serialization.checkpoint import CheckpointError
    from dmscale.serialization.sharded import load_sharded_checkpoint, save_sharded_checkpoint

    model, _, xs, ys, loss_fn, _, make_dms = _build("vit")
    dms = make_dms(model)
    opt = torch.optim.Adam([{"params": dms.weight_parameters(), "lr": 1e-2},
                            {"params": dms.structure_parameters(), "lr": 5e-2}])
    for x, y in zip(xs[:2], ys[:2]):
        loss = dms.loss(loss_fn(model(x), y))
        opt.zero_grad()
        loss.backward()
        opt.step()
        dms.step()
    ck = tmp_path / "ck"
    save_sharded_checkpoint(ck, model, opt, dms, extra={"epoch": 1})
    save_sharded_checkpoint(ck, model, opt, dms, extra={"epoch": 2})  # replaces its own directory
    model2, _, _, _, _, _, make2 = _build("vit")
    dms2 = make2(model2)
    opt2 = torch.optim.Adam([{"params": dms2.weight_parameters(), "lr": 1e-2},
                             {"params": dms2.structure_parameters(), "lr": 5e-2}])
    info = load_sharded_checkpoint(ck, model2, opt2, dms2)
    assert info["extra"] == {"epoch": 2} and dms2.step_count == 2
    for k, v in dms.space.state_dict().items():
        assert torch.equal(v, dms2.space.state_dict()[k])
    sd2 = dict(model2.state_dict())
    for k, v in model.state_dict().items():
        assert torch.equal(v, sd2[k]), k
    assert opt2.state_dict()["state"].keys() == opt.state_dict()["state"].keys()

    other = dmscale.DMS(ConvNet(), (torch.zeros(2, 3, 8, 8),), dmscale.Target(flops=0.5), 4)
    with pytest.raises(CheckpointError, match="another model"):
        load_sharded_checkpoint(ck, other.model, None, other)
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(Exception, match="not created by dmscale|did not write"):
        save_sharded_checkpoint(foreign, model, opt, dms)
    assert (foreign / "notes.txt").read_text() == "keep me"
    with pytest.raises(CheckpointError, match="not a dmscale sharded checkpoint"):
        load_sharded_checkpoint(foreign, model2, opt2, dms2)

    class Evil:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))
    (ck / ".metadata").write_bytes(pickle.dumps(Evil()))
    with pytest.raises(CheckpointError, match="refused to load"):
        load_sharded_checkpoint(ck, model2, opt2, dms2)
    assert not (tmp_path / "pwned").exists()


def test_export_without_sharding_is_unchanged_and_helpers_need_no_group():
    model, _, xs, *_ = _build("conv")
    dms = dmscale.DMS(model, (xs[0][:2],), dmscale.Target(flops=0.5), STEPS)
    assert not dmscale.distributed.is_sharded(model) and not hasattr(dms, "_skeleton")
    small = dmscale.distributed.export(dms, rank=0)  # no process group: rank 0 is this process
    assert isinstance(small, nn.Module)
