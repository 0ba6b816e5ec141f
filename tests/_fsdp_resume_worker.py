"""Subprocess worker for tests/test_fsdp.py: a DMS search sharded with FSDP2 over 2 gloo processes.

    python _fsdp_resume_worker.py CKPT OUT --steps N --every K [--resume] [--crash-at S]

Both ranks build TinyViT, then DMS, then ``fully_shard`` each block and the root, and train on
their half of every global batch (drawn from the global RNG, so the RNG is checkpointed). Every
K steps they write a sharded checkpoint (``torch.distributed.checkpoint``: model shards, Adam
state over weights and ratios, DMS state, each rank's RNG). ``--crash-at S`` makes both ranks
die (``os._exit``) right after step S, without any cleanup. At the end the export (on every rank),
the search state and the gathered full weights go to OUT (rank 0 writes it).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

sys.modules["transformers"] = None  # type: ignore[assignment]  # not needed; keeps start-up fast

WORLD = 2
CRASH = 3


def _rank(rank: int, init: str, a: argparse.Namespace) -> None:
    from torch.distributed.fsdp import fully_shard

    import dmscale
    from dmscale.distributed import full_state_dict
    from dmscale.serialization.checkpoint import save_checkpoint
    from dmscale.serialization.sharded import load_sharded_checkpoint, save_sharded_checkpoint
    from zoo import TinyViT  # this script's folder (tests/) is on sys.path, and so on the spawned ranks'

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=WORLD)
    torch.manual_seed(0)
    model = TinyViT(img=8, patch=4, dim=16, depth=2, heads=2, n_classes=10)
    dms = dmscale.DMS(model, (torch.zeros(2, 3, 8, 8),), dmscale.Target(flops=0.4), total_steps=a.steps)
    for blk in model.blocks:
        fully_shard(blk)
    fully_shard(model)
    opt = torch.optim.Adam([{"params": dms.weight_parameters(), "lr": 1e-2},
                            {"params": dms.structure_parameters(), "lr": 5e-2, "weight_decay": 0.0}])
    torch.manual_seed(1)  # the data stream
    if a.resume and os.path.isdir(a.ckpt):
        rng = {"rng": torch.get_rng_state()}
        info = load_sharded_checkpoint(a.ckpt, model, opt, dms, rank_state=rng)
        torch.set_rng_state(rng["rng"])
        if rank == 0:
            print(f"resumed {dms.step_count} {info['extra']}", flush=True)
    n = 8 // WORLD
    for _ in range(dms.step_count, a.steps):
        x = torch.randn(8, 3, 8, 8)
        y = torch.randint(0, 10, (8,))
        loss = dms.loss(F.cross_entropy(model(x[rank * n:(rank + 1) * n]), y[rank * n:(rank + 1) * n]))
        opt.zero_grad()
        loss.backward()
        opt.step()
        dms.step()
        if dms.step_count % a.every == 0:
            save_sharded_checkpoint(a.ckpt, model, opt, dms, extra={"step": dms.step_count},
                                    rank_state={"rng": torch.get_rng_state()})
        if dms.step_count == a.crash_at:
            sys.stdout.flush()
            os._exit(CRASH)  # both ranks die here, no cleanup
    small = dms.export()
    full = full_state_dict(model)
    if rank == 0:
        small.eval()
        with torch.no_grad():
            probe = small(torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(5)))
        save_checkpoint(a.out, {
            "ratios": {k: v.detach().clone() for k, v in dms.space.ratios.items()},
            "importance": {g.name: dms.space.importance(g).clone() for g in dms.groups},
            "kept": {k: list(v) for k, v in dms.kept().items()},
            "weights": full, "probe": probe, "refining": dms.refining, "step": dms.step_count,
            "export": {k: v.clone() for k, v in small.state_dict().items()},
        })
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("ckpt")
    ap.add_argument("out")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--every", type=int, default=3)
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--crash-at", type=int, default=-1)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        try:
            mp.spawn(_rank, args=(os.path.join(d, "init"), a), nprocs=WORLD, join=True)
        except mp.ProcessExitedException as exc:
            sys.exit(CRASH if exc.exit_code == CRASH else 1)
    print("done", flush=True)


if __name__ == "__main__":
    main()
