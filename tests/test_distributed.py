"""Data parallel search: 2 gloo processes on CPU hold identical search state, equal to one process.

DMS is built on the plain model *before* it is wrapped in DDP; every rank sees an equal-sized
local batch and uses a mean loss, so DDP's averaged weight gradients and DMS's averaged mask /
ratio gradients are exactly those of one process on the global batch. Sharded (FSDP2) search:
tests/test_fsdp.py.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

import dmscale
from zoo import MLP, TinyViT

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")

WORLD = 2
STEPS = 6


def _build(name):
    torch.manual_seed(0)
    if name == "mlp":
        return MLP(16, 32, 5), (16,), 5
    return TinyViT(img=8, patch=4, dim=16, depth=2, heads=2, n_classes=5), (3, 8, 8), 5


def _data(name):
    g = torch.Generator().manual_seed(123)
    _, shape, n_cls = _build(name)
    xs = [torch.randn(8, *shape, generator=g) for _ in range(STEPS)]
    ys = [torch.randint(0, n_cls, (8,), generator=g) for _ in range(STEPS)]
    return xs, ys


def _run(name, rank=0, world=1, ddp=False):
    """A short search; rank r of `world` trains on its slice of every global batch."""
    from dmscale.distributed import broadcast_search_state

    model, shape, _ = _build(name)
    xs, ys = _data(name)
    dms = dmscale.DMS(model, (xs[0][:2],), dmscale.Target(flops=0.4), total_steps=STEPS)
    net = model
    if ddp:
        assert dms.distributed
        broadcast_search_state(dms, src=0)
        net = torch.nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.SGD([{"params": dms.weight_parameters(), "lr": 0.05},
                           {"params": dms.structure_parameters(), "lr": 0.2, "weight_decay": 0.0}])
    n = xs[0].shape[0] // world
    for x, y in zip(xs, ys):
        xl, yl = x[rank * n:(rank + 1) * n], y[rank * n:(rank + 1) * n]
        loss = dms.loss(F.cross_entropy(net(xl), yl))
        opt.zero_grad()
        loss.backward()
        opt.step()
        dms.step()
    small = dms.export()
    return {
        "ratios": {k: v.detach().clone() for k, v in dms.space.ratios.items()},
        "importance": {g.name: dms.space.importance(g).clone() for g in dms.groups},
        "kept": dms.kept(),
        "weights": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "export_shapes": {k: tuple(v.shape) for k, v in small.state_dict().items()},
        "nonfinite": dms.nonfinite_steps,
    }


def _local_importance(rank, world):
    """One backward with the all-reduce switched off: what each rank would hold without it."""
    model, _, _ = _build("mlp")
    xs, ys = _data("mlp")
    dms = dmscale.DMS(model, (xs[0][:2],), dmscale.Target(flops=0.4), total_steps=STEPS)
    assert dms.importance.reducer is not None
    n = xs[0].shape[0] // world
    x, y = xs[0][rank * n:(rank + 1) * n], ys[0][rank * n:(rank + 1) * n]
    F.cross_entropy(model(x), y).backward()
    synced = {g.name: dms.space.importance(g).clone() for g in dms.groups}
    dms.importance.reducer = None
    for g in dms.groups:
        dms.space.importance(g).zero_()
    F.cross_entropy(model(x), y).backward()
    local = {g.name: dms.space.importance(g).clone() for g in dms.groups}
    return {"synced": synced, "local": local}


def _worker(rank, init_file, out_dir):
    import sys

    from dmscale.distributed import check_in_sync

    # the export's optional Hugging Face adapter imports transformers (seconds per process); these
    # plain models do not need it, so make it unimportable in the workers
    sys.modules["transformers"] = None  # type: ignore[assignment]
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        out = {}
        for name in ("mlp", "vit"):
            res = _run(name, rank, WORLD, ddp=True)
            res["in_sync"] = check_in_sync(res["ratios"], res["importance"])
            out[name] = res
        out["local"] = _local_importance(rank, WORLD)
        torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory, spawn_ranks):
    """Run every distributed scenario in one spawn of 2 gloo processes (start-up is the slow part)."""
    return spawn_ranks(_worker, tmp_path_factory.mktemp("ddp"), WORLD)


@pytest.mark.parametrize("name", ["mlp", "vit"])
def test_ddp_ranks_identical_and_equal_single_process(name, ranks):
    r0, r1 = ranks[0][name], ranks[1][name]
    torch.set_num_threads(1)
    single = _run(name)
    assert r0["in_sync"] and r1["in_sync"]
    # every rank holds bitwise identical search state and exports the identical structure
    for key in ("ratios", "importance"):
        for k in r0[key]:
            assert torch.equal(r0[key][k], r1[key][k]), (key, k)
    assert r0["kept"] == r1["kept"]
    assert r0["export_shapes"] == r1["export_shapes"]
    # ... which is the single-process search on the global batch (float tolerance)
    assert any(k < f for f, k in single["kept"].values()), "the search pruned nothing: test is vacuous"
    assert any(float(v.sum()) > 0 for v in single["importance"].values())
    for k in single["ratios"]:
        torch.testing.assert_close(r0["ratios"][k], single["ratios"][k], atol=1e-5, rtol=1e-4)
    for k in single["importance"]:
        torch.testing.assert_close(r0["importance"][k], single["importance"][k], atol=1e-7, rtol=1e-3)
    for k in single["weights"]:
        torch.testing.assert_close(r0["weights"][k], single["weights"][k], atol=1e-5, rtol=1e-4)
    assert r0["kept"] == single["kept"]
    assert r0["export_shapes"] == single["export_shapes"]
    assert r0["nonfinite"] == 0


def test_importance_all_reduce_is_what_makes_ranks_agree(ranks):
    """Without DMS's all-reduce the ranks' importance differs: the equality above is not vacuous."""
    r0, r1 = ranks[0]["local"], ranks[1]["local"]
    for k in r0["synced"]:
        assert torch.equal(r0["synced"][k], r1["synced"][k])
    assert any(not torch.allclose(r0["local"][k], r1["local"][k]) for k in r0["local"])


def test_helpers_are_noops_without_a_process_group():
    from dmscale.distributed import broadcast_search_state, check_in_sync, search_state_in_sync

    model, _, _ = _build("mlp")
    dms = dmscale.DMS(model, (torch.randn(2, 16),), dmscale.Target(flops=0.5), total_steps=4)
    assert not dms.distributed and dms.importance.reducer is None
    broadcast_search_state(dms)
    assert check_in_sync({"a": torch.ones(2)}) and search_state_in_sync(dms)
