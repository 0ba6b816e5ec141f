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
import torch.nn as nn

import _fsdp_scenarios as S
import dmscale

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")

WORLD = 2


@pytest.fixture(scope="module")
def ranks(tmp_path_factory, spawn_ranks):
    """Every sharded scenario in one spawn of 2 gloo processes (start-up is the slow part)."""
    return spawn_ranks(S.worker, tmp_path_factory.mktemp("fsdp"), WORLD, WORLD)


@pytest.mark.parametrize("name", ["gpt2", "llama", "vit"])
def test_fsdp_search_equals_single_process_and_ranks_agree(name, ranks):
    r0, r1 = ranks[0][name], ranks[1][name]
    assert r0["sharded"] and r0["dtensor_params"] > 0
    S.assert_ranks_agree(r0, r1)  # bitwise: the same search state and the same exported model everywhere
    torch.set_num_threads(1)
    single = S.run(name)
    assert not single["sharded"]
    assert any(k < f for f, k in single["kept"].values()), "the search pruned nothing: test is vacuous"
    assert any(float(v.sum()) > 0 for v in single["importance"].values())
    S.assert_same_as_single(r0, single)
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
        assert float(v["masked_weight"].abs().sum()) > 0


def test_rank0_only_export(ranks):
    assert not ranks[0]["vit"]["rank0_export_is_none"] and ranks[1]["vit"]["rank0_export_is_none"]
    assert ranks[0]["vit"]["rank0_export_device"] == "cpu"
    torch.testing.assert_close(ranks[0]["vit"]["rank0_probe"], ranks[0]["vit"]["probe"])


def test_masks_on_already_sharded_weights_fall_back_to_activation_masks(ranks):
    r0, r1 = ranks[0]["conv_fallback"], ranks[1]["conv_fallback"]
    assert r0["folded_before"] > 0 and r0["folded_after"] == 0  # conv weights were folded; now activation hooks
    S.assert_ranks_agree(r0, r1)
    torch.set_num_threads(1)
    single = S.run("conv")  # unsharded: the masks are folded into the conv weights
    assert any(k < f for f, k in single["kept"].values())
    S.assert_same_as_single(r0, single)


def test_single_rank_fsdp_export_leaves_the_model_intact(tmp_path, spawn_ranks):
    """One rank: the gathered weights are the shard itself; exporting twice must give the same model."""
    r = spawn_ranks(S.worker, tmp_path, 1, 1, "gloo", "cpu", ("vit",), False)[0]["vit"]
    assert r["sharded"] and r["dtensor_params"] > 0
    torch.testing.assert_close(r["rank0_probe"], r["probe"])  # a second export, after the first one
    torch.testing.assert_close(r["masked_weight"], r["expected_weight"])


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

    model, _, xs, ys, loss_fn, _, make_dms = S.build("vit")
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
    model2, _, _, _, _, _, make2 = S.build("vit")
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

    other = dmscale.DMS(S.ConvNet(), (torch.zeros(2, 3, 8, 8),), dmscale.Target(flops=0.5), 4)
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
    model, _, xs, *_ = S.build("conv")
    dms = dmscale.DMS(model, (xs[0][:2],), dmscale.Target(flops=0.5), S.STEPS)
    assert not dmscale.distributed.is_sharded(model) and not hasattr(dms, "_skeleton")
    small = dmscale.distributed.export(dms, rank=0)  # no process group: rank 0 is this process
    assert isinstance(small, nn.Module)
