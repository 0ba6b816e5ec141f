#!/usr/bin/env python3
"""One-shot GPU check: the CUDA tests and the CUDA benchmark column, logs and JSONs into one folder.

    python3 scripts/gpu_check.py [OUT_DIR] [--budget SECONDS]

OUT_DIR defaults to ``$OUT`` (else ``./gpu_check_out``). Run from anywhere; it uses the repository's
``src`` (no install needed) and the Python it runs under. It prints ``torch.__version__`` and
``torch.cuda.is_available()`` first; without a GPU it writes ``summary.json`` saying so and exits 0.

Steps (each a subprocess with its own time limit; the whole run stops starting new steps once
``--budget`` seconds, default 330, are spent, and says which it skipped):

1. ``pytest -m cuda tests/test_cuda.py`` -> ``pytest_cuda.xml``
2. NCCL probe: can two processes share the one GPU in an NCCL group? (recorded, not a test)
3. ``benchmarks/bench_topk.py --device cuda --quick``          -> ``bench_topk_cuda.json``
4. ``benchmarks/bench_overhead.py --device cuda --quick``      -> ``bench_overhead_cuda.json``
5. ``benchmarks/bench_export_speed.py --device cuda --quick --batches 1,64,512`` -> ``bench_export_speed_cuda.json``
6. ``benchmarks/bench_memory.py --device cuda --weights random --dtype bfloat16`` -> ``bench_memory_cuda.json``

Writes at most 7 files into OUT_DIR: ``summary.json`` (environment, each step's status, seconds,
exit code and the pytest counts), ``gpu_check.log`` (every step's output) and the XML / JSONs above.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

NCCL_PROBE = r"""
import os, sys, torch, torch.distributed as dist, torch.multiprocessing as mp
def f(rank, init):
    torch.cuda.set_device(0)
    dist.init_process_group("nccl", init_method="file://" + init, rank=rank, world_size=2)
    t = torch.ones(4, device="cuda:0") * (rank + 1)
    dist.all_reduce(t)
    torch.cuda.synchronize()
    assert float(t[0]) == 3.0, float(t[0])
    dist.destroy_process_group()
if __name__ == "__main__":
    mp.spawn(f, args=(sys.argv[1],), nprocs=2, join=True)
    print("NCCL_SHARED_GPU_OK")
"""


def _env() -> dict:
    info: dict = {"python": platform.python_version(), "executable": sys.executable, "platform": platform.platform(),
                  "time": time.strftime("%Y-%m-%d %H:%M:%S")}
    try:
        import torch
    except Exception as exc:  # no torch at all
        info["torch_error"] = repr(exc)
        return info
    info["torch"] = torch.__version__
    info["cuda_available"] = bool(torch.cuda.is_available())
    print(f"torch.__version__ = {torch.__version__}", flush=True)
    print(f"torch.cuda.is_available() = {info['cuda_available']}", flush=True)
    if info["cuda_available"]:
        info["device_count"] = torch.cuda.device_count()
        info["devices"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        info["cuda"] = torch.version.cuda
        try:
            info["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
        except Exception as exc:
            info["nccl"] = f"unavailable: {exc!r}"
    for mod in ("transformers", "safetensors", "numpy", "pytest", "matplotlib"):
        try:
            info[mod] = __import__(mod).__version__
        except Exception as exc:
            info[mod] = f"missing: {type(exc).__name__}"
    print(json.dumps(info, indent=1), flush=True)
    return info


def _run(cmd: list[str], log, timeout: float, env: dict) -> tuple[str, int | None, float, str]:
    """Run ``cmd`` in its own process group; (status, returncode, seconds, last output lines)."""
    t0 = time.perf_counter()
    log.write(f"\n\n===== {' '.join(cmd)}  (limit {timeout:.0f} s)\n")
    log.flush()
    with tempfile.TemporaryFile("w+") as buf:
        p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=buf, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc: int | None = p.wait(timeout=timeout)
            status = "passed" if rc == 0 else "failed"
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
            rc, status = None, "timeout"
        buf.seek(0)
        text = buf.read()
    log.write(text)
    log.write(f"\n===== {status} (rc={rc}) in {time.perf_counter() - t0:.1f} s\n")
    log.flush()
    tail = "\n".join(text.strip().splitlines()[-6:])
    print(f"[{status}] {' '.join(cmd[1:4])} ... {time.perf_counter() - t0:.0f} s\n{tail}", flush=True)
    return status, rc, time.perf_counter() - t0, tail


def _junit(path: Path) -> dict:
    """Counts and the non-passing test ids of a pytest junit XML."""
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError) as exc:
        return {"error": repr(exc)}
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    out = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    out["passed"] = out["tests"] - out["failures"] - out["errors"] - out["skipped"]
    cases = {}
    for case in suite.iter("testcase"):
        name = f"{case.get('classname', '')}::{case.get('name')}"
        state = "passed"
        for tag in ("failure", "error", "skipped"):
            el = case.find(tag)
            if el is not None:
                state = f"{tag}: {(el.get('message') or '')[:300]}"
        cases[name] = state
    out["cases"] = cases
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", nargs="?", default=os.environ.get("OUT") or "gpu_check_out")
    ap.add_argument("--budget", type=float, default=330.0, help="seconds after which no new step starts")
    ap.add_argument("--only", default="", help="comma-separated step names to run (default: all)")
    ap.add_argument("--dry-run-on-cpu", action="store_true",
                    help="check this script without a GPU: the tests and benchmarks run on the CPU (proves nothing "
                         "about CUDA)")
    args = ap.parse_args()
    out = Path(args.out).absolute()
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    summary: dict = {"env": _env(), "steps": {}}

    def save() -> None:
        summary["seconds"] = round(time.perf_counter() - t_start, 1)
        (out / "summary.json").write_text(json.dumps(summary, indent=1))

    dry = args.dry_run_on_cpu
    summary["dry_run_on_cpu"] = dry
    if not summary["env"].get("cuda_available") and not dry:
        summary["skipped"] = "no CUDA device: torch.cuda.is_available() is False (or torch is missing)"
        print(summary["skipped"], flush=True)
        save()
        return 0

    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT / "src") + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["PYTHONUNBUFFERED"] = "1"
    env.pop("DMSCALE_CUDA_TESTS_ON_CPU", None)
    if dry:
        env["DMSCALE_CUDA_TESTS_ON_CPU"] = "1"
    bench_dir = Path(tempfile.mkdtemp(prefix="dmscale_gpu_bench_"))
    env["DMSCALE_BENCH_RESULTS"] = str(bench_dir)
    py = sys.executable
    n_gpu = summary["env"].get("device_count", 0)
    steps = [
        ("pytest_cuda", [py, "-m", "pytest", "-m", "cuda", "-q", "-rA", "-p", "no:cacheprovider",
                         "tests/test_cuda.py", f"--junitxml={out / 'pytest_cuda.xml'}"], 200, None),
        ("nccl_shared_gpu_probe", None, 45, None),
        ("bench_topk_cuda", [py, "benchmarks/bench_topk.py", "--device", "cuda", "--quick", "--name", "bench_topk_cuda"],
         75, "bench_topk_cuda.json"),
        ("bench_overhead_cuda", [py, "benchmarks/bench_overhead.py", "--device", "cuda", "--quick",
                                 "--name", "bench_overhead_cuda"], 90, "bench_overhead_cuda.json"),
        ("bench_export_speed_cuda", [py, "benchmarks/bench_export_speed.py", "--device", "cuda", "--quick",
                                     "--batches", "1,64,512", "--name", "bench_export_speed_cuda"], 90,
         "bench_export_speed_cuda.json"),
        ("bench_memory_cuda", [py, "benchmarks/bench_memory.py", "--device", "cuda", "--weights", "random",
                               "--dtype", "bfloat16", "--name", "bench_memory_cuda"], 120, "bench_memory_cuda.json"),
    ]
    only = {s for s in args.only.split(",") if s}
    if dry:
        for _, cmd, _, _ in steps:
            if cmd and "--device" in cmd:
                cmd[cmd.index("--device") + 1] = "cpu"
    with open(out / "gpu_check.log", "w") as log:
        log.write(json.dumps(summary["env"], indent=1))
        for name, cmd, limit, result in steps:
            if only and name not in only:
                continue
            left = args.budget - (time.perf_counter() - t_start)
            if left < 15:
                summary["steps"][name] = {"status": "skipped", "why": f"budget of {args.budget:.0f} s spent"}
                print(f"[skipped] {name}: budget spent", flush=True)
                continue
            if name == "nccl_shared_gpu_probe":
                if n_gpu != 1 or dry:
                    summary["steps"][name] = {"status": "skipped", "why": f"{n_gpu} GPUs (the probe is for one)"}
                    continue
                init = tempfile.mktemp(prefix="dmscale_nccl_probe_")
                cmd = [py, "-c", NCCL_PROBE, init]
            status, rc, secs, tail = _run(cmd, log, min(limit, left), env)
            rec: dict = {"status": status, "returncode": rc, "seconds": round(secs, 1)}
            if name == "pytest_cuda":
                rec["junit"] = _junit(out / "pytest_cuda.xml")
            if name == "nccl_shared_gpu_probe":
                rec["two_ranks_share_one_gpu_with_nccl"] = status == "passed"
                rec["output_tail"] = tail[-1500:]
            if result is not None:
                src = bench_dir / result
                if src.is_file():
                    shutil.copy(src, out / result)
                    rec["result"] = result
                else:
                    rec["result"] = None
            summary["steps"][name] = rec
            save()
    save()
    shutil.rmtree(bench_dir, ignore_errors=True)
    print(json.dumps({k: v.get("status") for k, v in summary["steps"].items()}, indent=1), flush=True)
    print(f"gpu_check: {summary['seconds']} s; files in {out}: {sorted(p.name for p in out.iterdir())}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
