"""Subprocess worker for tests/test_resume.py: a DMS search that checkpoints every k steps.

    python _resume_worker.py CKPT OUT --steps N --every K [--resume] [--pause-at S] [--slow]

Prints ``step i`` after every step (and ``saved i`` after every checkpoint). ``--pause-at S``
blocks forever after step S so the parent can SIGKILL it at a known point between
checkpoints. Writes the final ratios, importance, kept widths and export shapes to OUT.
The checkpoint holds model + optimizer + DMS state + RNG, written atomically.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.modules["transformers"] = None  # type: ignore[assignment]  # not needed; keeps start-up fast

import dmscale  # noqa: E402
from dmscale.serialization.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from zoo import ResNetCNN  # noqa: E402  (run as a script: its folder, tests/, is first on sys.path)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("ckpt")
    ap.add_argument("out")
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--every", type=int, default=3)
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--pause-at", type=int, default=-1)
    a = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = ResNetCNN(widths=(8, 16), depths=(2, 2))
    example = torch.zeros(2, 3, 8, 8)
    dms = dmscale.DMS(model, (example,), dmscale.Target(flops=0.35), total_steps=a.steps)
    opt = torch.optim.Adam([{"params": dms.weight_parameters(), "lr": 1e-2},
                            {"params": dms.structure_parameters(), "lr": 5e-2, "weight_decay": 0.0}])
    torch.manual_seed(1)  # the data stream: drawn from the global RNG, so the RNG must be checkpointed
    start = 0
    if a.resume and os.path.exists(a.ckpt):
        state = load_checkpoint(a.ckpt)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        dms.load_state_dict(state["dms"])
        torch.set_rng_state(state["rng"])
        start = int(state["dms"]["step"])
        print(f"resumed {start}", flush=True)
    for i in range(start, a.steps):
        x = torch.randn(8, 3, 8, 8)
        y = torch.randint(0, 10, (8,))
        loss = dms.loss(F.cross_entropy(model(x), y))
        opt.zero_grad()
        loss.backward()
        opt.step()
        dms.step()
        if dms.step_count % a.every == 0:
            save_checkpoint(a.ckpt, {"model": model.state_dict(), "optimizer": opt.state_dict(),
                                     "dms": dms.state_dict(), "rng": torch.get_rng_state()})
            print(f"saved {dms.step_count}", flush=True)
        print(f"step {dms.step_count}", flush=True)
        if dms.step_count == a.pause_at:
            while True:  # wait for SIGKILL
                time.sleep(1)
    small = dms.export()
    save_checkpoint(a.out, {
        "ratios": {k: v.detach().clone() for k, v in dms.space.ratios.items()},
        "importance": {g.name: dms.space.importance(g).clone() for g in dms.groups},
        "kept": {k: list(v) for k, v in dms.kept().items()},
        "export": {k: list(v.shape) for k, v in small.state_dict().items()},
        "weights": {k: v.clone() for k, v in model.state_dict().items()},
        "refining": dms.refining, "step": dms.step_count,
    })
    print("done", flush=True)


if __name__ == "__main__":
    main()
