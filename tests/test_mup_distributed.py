"""μP under sharding: 2 gloo processes on CPU, FSDP2 (``fully_shard``).

The width record lives on the model object, so ``mup_optimizer`` on a ``fully_shard``-ed upscaled
model gives the same per-parameter learning rates as on the unsharded one, also after deepcopy,
``torch.compile`` wrapping, DDP and a state-dict round trip; optimizer state carried into the sharded
model is sharded like its parameters and training continues exactly like the small model's.
"""

from __future__ import annotations

import copy
import os

import pytest
import torch
import torch.distributed as dist
from torch import nn

import zoo

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")

WORLD = 2


def _groups(model) -> dict[str, tuple[float, float, float]]:
    from dmscale.mup import mup_param_groups

    return {n: (g["lr"], g["eps"], g["weight_decay"]) for g in mup_param_groups(model, kind="adamw", lr=1e-2,
                                                                               weight_decay=0.1, eps=1e-6)
            for n in g["param_names"]}


def _models(name: str):
    """Small model with a proxy base, a few AdamW steps, upscaled x2 (zero noise); all ranks identical."""
    from dmscale.mup import mup_optimizer, set_base, upscale

    torch.manual_seed(0)
    if name == "gpt2":
        small = zoo.hf_gpt2(16, 2)
        set_base(small, zoo.hf_gpt2(8, 2))
        g = torch.Generator().manual_seed(1)
        ids = [torch.randint(0, 61, (4, 8), generator=g) for _ in range(4)]
        batches = [({"input_ids": t}, t) for t in ids]
    else:
        small = zoo.NormMLP(hidden=16)
        set_base(small, 8)
        g = torch.Generator().manual_seed(1)
        batches = [(torch.randn(8, 10, generator=g), torch.randint(0, 3, (8,), generator=g)) for _ in range(4)]
    opt = mup_optimizer(small, "adamw", lr=1e-2, weight_decay=0.1, eps=1e-6)
    for x, y in batches[:2]:
        opt.zero_grad()
        _loss(small, x, y).backward()
        opt.step()
    big = upscale(small, 2)
    return small, opt, big, batches


def _loss(model, x, y):
    out = model(**x) if isinstance(x, dict) else model(x)
    out = getattr(out, "logits", out)
    return nn.functional.cross_entropy(out.reshape(-1, out.shape[-1]).float(), y.reshape(-1))


def _shard(model, name: str):
    from torch.distributed.fsdp import fully_shard

    blocks = model.transformer.h if name == "gpt2" else [model.net[0], model.net[3]]
    for b in blocks:
        fully_shard(b)
    fully_shard(model)
    return model


def _slice(x, rank: int):
    if isinstance(x, dict):
        return {k: v.chunk(WORLD)[rank] for k, v in x.items()}
    return x.chunk(WORLD)[rank]


def _scenario(name: str, rank: int) -> dict:
    from dmscale.mup import mup_optimizer, upscale_optimizer_state

    small, opt_s, big, batches = _models(name)
    ref = _groups(big)
    sharded = _shard(big, name)  # in place: the model upscale returned, now with DTensor parameters
    out = {"ref": ref, "sharded": _groups(sharded), "compiled": _groups(torch.compile(sharded)),
           "dtensor": all(hasattr(p, "device_mesh") for p in sharded.parameters())}
    sharded.load_state_dict(sharded.state_dict())  # a (sharded) state-dict round trip keeps the record
    out["after_state_dict"] = _groups(sharded)
    fresh = _models(name)[2]
    out["ddp"] = _groups(torch.nn.parallel.DistributedDataParallel(copy.deepcopy(fresh)))
    out["deepcopy_sharded"] = _groups(_shard(copy.deepcopy(fresh), name))  # deepcopy, then shard the copy
    # state carried into the sharded model's optimizer; one step each on the global batch stays equal
    opt_b = mup_optimizer(sharded, "adamw", lr=1e-2, weight_decay=0.1, eps=1e-6)
    upscale_optimizer_state(opt_s, opt_b, small, sharded)
    out["state_sharded"] = all(hasattr(v, "device_mesh") for st in opt_b.state.values() for k, v in st.items()
                               if k != "step")
    for x, y in batches[2:]:
        opt_s.zero_grad()
        _loss(small, x, y).backward()
        opt_s.step()
        opt_b.zero_grad()
        _loss(sharded, _slice(x, rank), _slice(y, rank)).backward()  # FSDP averages gradients over ranks
        opt_b.step()
    x = batches[0][0]
    with torch.no_grad():
        a, b = small(**x) if isinstance(x, dict) else small(x), sharded(**x) if isinstance(x, dict) else sharded(x)
    out["diff"] = float((getattr(a, "logits", a) - getattr(b, "logits", b)).abs().max())
    return out


def _worker(rank, init_file, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        res = {name: _scenario(name, rank) for name in ("mlp", "gpt2")}
        torch.save(res, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory, spawn_ranks):
    return spawn_ranks(_worker, tmp_path_factory.mktemp("fsdp_mup"), WORLD)


@pytest.mark.parametrize("name", ["mlp", "gpt2"])
def test_fsdp2_mup_learning_rates_equal_unsharded(name, ranks) -> None:
    for r in ranks:
        res = r[name]
        assert res["dtensor"], "fully_shard did not shard the parameters: the test would be vacuous"
        assert len(set(v[0] for v in res["ref"].values())) > 1  # several distinct μP learning rates
        for key in ("sharded", "compiled", "after_state_dict", "ddp", "deepcopy_sharded"):
            assert res[key] == res["ref"], key


@pytest.mark.parametrize("name", ["mlp", "gpt2"])
def test_fsdp2_state_transfer_and_training_stay_equivalent(name, ranks) -> None:
    for r in ranks:
        assert r[name]["state_sharded"]
        assert r[name]["diff"] < 1e-5, r[name]["diff"]
