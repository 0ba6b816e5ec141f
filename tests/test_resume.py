"""Checkpoint / resume: a search SIGKILLed mid-way and resumed ends exactly like an uninterrupted one.

The worker (tests/_resume_worker.py) checkpoints model + optimizer + ``dms.state_dict()`` +
RNG every k steps with ``dmscale.serialization.checkpoint.save_checkpoint`` (atomic: temp file, fsync, rename).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import dmscale
from dmscale.serialization.checkpoint import load_checkpoint, save_checkpoint
from zoo import MLP, ResNetCNN, TinyViT

WORKER = Path(__file__).with_name("_resume_worker.py")
STEPS, EVERY = 16, 3  # the schedule's refine phase starts at step 13: resume crosses it


def _start(ckpt, out, *extra):
    return subprocess.Popen([sys.executable, str(WORKER), str(ckpt), str(out), "--steps", str(STEPS),
                             "--every", str(EVERY), *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def _kill_after(proc, line):
    """Read the worker's progress until ``line`` appears, then SIGKILL it."""
    seen = []
    for got in proc.stdout:
        seen.append(got.strip())
        if got.strip() == line:
            break
    else:
        proc.wait()
        raise AssertionError(f"worker ended before {line!r}: {seen} {proc.stderr.read()}")
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    return seen


def _finish(proc):
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    return out


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run, started once and shared; it runs alongside the first interrupted run."""
    d = tmp_path_factory.mktemp("ref")
    proc = _start(d / "ref.ckpt", d / "ref.out")
    result = {}

    def get():
        if not result:
            _finish(proc)
            result.update(load_checkpoint(d / "ref.out"))
        return result
    yield get
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def _same(a, b):
    assert a["step"] == b["step"] == STEPS and a["refining"] and b["refining"]
    assert a["kept"] == b["kept"]
    assert a["export"] == b["export"]
    for key in ("ratios", "importance", "weights"):
        for k in a[key]:
            assert torch.equal(a[key][k], b[key][k]), (key, k)


def test_sigkill_between_checkpoints_then_resume_is_exact(tmp_path, reference):
    p = _start(tmp_path / "run.ckpt", tmp_path / "run.out", "--pause-at", "7")
    seen = _kill_after(p, "step 7")
    assert "saved 6" in seen and not (tmp_path / "run.out").exists()
    assert load_checkpoint(tmp_path / "run.ckpt")["dms"]["step"] == 6  # steps 7.. are lost and redone
    out = _finish(_start(tmp_path / "run.ckpt", tmp_path / "run.out", "--resume"))
    assert "resumed 6" in out
    a = reference()
    b = load_checkpoint(tmp_path / "run.out")
    assert any(k < f for f, k in a["kept"].values()), "nothing pruned: the comparison would be vacuous"
    _same(a, b)


def test_kill_at_any_moment_twice_then_resume_is_exact(tmp_path, reference):
    """Killed at an unplanned moment (maybe inside a checkpoint write), resumed, killed again, resumed."""
    p = _start(tmp_path / "run.ckpt", tmp_path / "run.out")
    _kill_after(p, "step 4")  # no pause: the worker is somewhere in steps 4..6 (or saving) when it dies
    first = load_checkpoint(tmp_path / "run.ckpt")["dms"]["step"]
    assert first % EVERY == 0 and 3 <= first < STEPS - 3
    pause = first + 5  # not a checkpoint step: the last EVERY-aligned checkpoint before it survives
    p = _start(tmp_path / "run.ckpt", tmp_path / "run.out", "--resume", "--pause-at", str(pause))
    _kill_after(p, f"step {pause}")
    assert load_checkpoint(tmp_path / "run.ckpt")["dms"]["step"] == pause // EVERY * EVERY
    _finish(_start(tmp_path / "run.ckpt", tmp_path / "run.out", "--resume"))
    _same(reference(), load_checkpoint(tmp_path / "run.out"))
    leftovers = [f for f in os.listdir(tmp_path) if f not in {"run.ckpt", "run.out"}]
    assert not leftovers or all(".tmp" in f or f.startswith(".") for f in leftovers)


# ---------------------------------------------------------------- in-process state round trips
def _searched(build, shape, steps=5, total=10):
    torch.manual_seed(0)
    model = build()
    x = torch.randn(*shape)
    dms = dmscale.DMS(model, (x[:2],), dmscale.Target(flops=0.3), total_steps=total)
    opt = torch.optim.SGD(dms.structure_parameters(), lr=0.5)
    for _ in range(steps):
        loss = dms.loss(model(x).pow(2).mean())
        opt.zero_grad()
        loss.backward()
        opt.step()
        dms.step()
    return model, dms, x


@pytest.mark.parametrize("build,shape", [(MLP, (4, 16)),
                                         (TinyViT, (4, 3, 16, 16))], ids=["mlp", "vit"])
def test_state_dict_roundtrip_through_checkpoint(build, shape, tmp_path):
    model, dms, x = _searched(build, shape, steps=9)  # 9 of 10: past the decay phase, depth frozen
    assert dms.refining
    save_checkpoint(tmp_path / "s.ckpt", {"dms": dms.state_dict(), "model": model.state_dict()})
    state = load_checkpoint(tmp_path / "s.ckpt")
    torch.manual_seed(0)
    model2 = build()
    dms2 = dmscale.DMS(model2, (x[:2],), dmscale.Target(flops=0.3), total_steps=10)
    model2.load_state_dict(state["model"])
    dms2.load_state_dict(state["dms"])
    assert dms2.step_count == dms.step_count and dms2.refining
    assert dms2.current_target() == dms.current_target()
    assert dms2.weight == dms.weight
    for g, g2 in zip(dms.groups, dms2.groups):
        assert torch.equal(dms.space.ratio(g), dms2.space.ratio(g2))
        assert torch.equal(dms.space.importance(g), dms2.space.importance(g2))
        assert dms2.space.ratio(g2).requires_grad == (g.kind not in ("depth", "heads"))  # frozen in refine
    assert dms2.kept() == dms.kept()
    model.eval()
    model2.eval()
    with torch.no_grad():
        torch.testing.assert_close(dms2.export()(x), dms.export()(x))


def test_state_of_another_model_is_rejected():
    _, dms, _ = _searched(MLP, (4, 16), steps=1)
    other = dmscale.DMS(ResNetCNN(), (torch.randn(2, 3, 8, 8),), dmscale.Target(flops=0.5), total_steps=4)
    with pytest.raises(ValueError, match="groups"):
        other.load_state_dict(dms.state_dict())


def test_crash_during_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "c.ckpt"
    save_checkpoint(path, {"step": 1, "t": torch.ones(3)})

    def boom(*a, **k):
        raise OSError("disk died mid-write")

    monkeypatch.setattr(os, "replace", boom)
    monkeypatch.setattr(os, "rename", boom)
    with pytest.raises(OSError):
        save_checkpoint(path, {"step": 2, "t": torch.zeros(3)})
    monkeypatch.undo()
    assert load_checkpoint(path)["step"] == 1
    assert sorted(os.listdir(tmp_path)) == ["c.ckpt"], "a failed save left temp files behind"


def test_truncated_or_foreign_checkpoint_is_a_clear_error(tmp_path):
    path = tmp_path / "c.ckpt"
    save_checkpoint(path, {"t": torch.randn(100)})
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="corrupted"):
        load_checkpoint(path)
    torch.save({"obj": _Evil()}, path)  # arbitrary pickled object: refused by weights_only=True
    with pytest.raises(ValueError, match="corrupted or not a dmscale checkpoint"):
        load_checkpoint(path)
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "missing.ckpt")


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))
