"""The package layers (docs/architecture.md): no import cycle, no upward import, a light ``import dmscale``.

    core (dmscale/*.py, trace/, layers/, families/, adapters/) -> mup -> serialization
        -> recipes + eval -> app -> integrations

The walk reads every module's imports with ``ast``: module-level and function-level imports count,
imports under ``if TYPE_CHECKING:`` do not (they never run). Deprecation shims (modules whose
docstring starts with "Deprecated:") sit above everything: they may import any layer, nothing may
import them.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import dmscale

ROOT = Path(dmscale.__file__).resolve().parent
LAYERS = {"core": 1, "mup": 2, "serialization": 3, "recipes": 4, "eval": 4, "app": 5, "integrations": 6, "shim": 7}
CORE_PACKAGES = {"trace", "layers", "families", "adapters"}
# Known violations owned by other work, each with who removes it; the test fails once one is gone (delete the
# entry then) so the list can only shrink.
KNOWN: dict[tuple[str, str], str] = {}
HEAVY = ("yaml", "matplotlib", "tqdm")


def _modules() -> dict[str, Path]:
    out = {}
    for f in sorted(ROOT.rglob("*.py")):
        rel = f.relative_to(ROOT.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = f
    return out


MODULES = _modules()


def _is_shim(path: Path) -> bool:
    doc = ast.get_docstring(ast.parse(path.read_text("utf-8"))) or ""
    return doc.startswith("Deprecated:")


def layer_of(name: str) -> str:
    """The layer of a dmscale module (raises for a subpackage missing from the table)."""
    parts = name.split(".")
    if name == "dmscale":
        return "serialization"  # the package API: core + mup + serialization (upper names are lazy)
    if _is_shim(MODULES[name]):
        return "shim"
    if len(parts) == 2 and MODULES[name].name != "__init__.py":
        return "core"
    sub = parts[1]
    if sub in CORE_PACKAGES:
        return "core"
    if sub in LAYERS:
        return sub
    raise AssertionError(f"dmscale.{sub} is in no layer: add it to tests/test_layers.py and docs/architecture.md")


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _walk(node: ast.AST):
    """All nodes, skipping the bodies of ``if TYPE_CHECKING:`` (their ``else`` still runs)."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.If) and _is_type_checking(child.test):
            for c in child.orelse:
                yield c
                yield from _walk(c)
            continue
        yield child
        yield from _walk(child)


def imports_of(name: str) -> set[str]:
    """The dmscale modules ``name`` imports.

    Importing ``a.b.c`` also runs the packages ``a`` and ``a.b``; those count, except the packages
    ``name`` itself lives in (they are already running when ``name`` runs).
    """
    path = MODULES[name]
    pkg = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    own = {".".join(name.split(".")[:i]) for i in range(1, len(name.split(".")) + 1)}
    found: set[str] = set()

    def add(mod: str) -> None:
        parts = mod.split(".")
        for i in range(1, len(parts) + 1):
            m = ".".join(parts[:i])
            if m in MODULES and m != name and (m == mod or m not in own):
                found.add(m)

    for node in _walk(ast.parse(path.read_text("utf-8"))):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] == "dmscale":
                    add(a.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg.split(".")
                base = base[:len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if mod.split(".")[0] != "dmscale":
                continue
            subs = [f"{mod}.{a.name}" for a in node.names if f"{mod}.{a.name}" in MODULES]
            if len(subs) < len(node.names) or mod not in own:  # names from the package itself, or another package
                add(mod)
            for sub in subs:
                add(sub)
    return found


def _graph() -> dict[str, set[str]]:
    return {m: imports_of(m) for m in MODULES}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10000))
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


# ------------------------------------------------------------------ the walker itself
def test_walker_sees_function_level_imports_and_skips_type_checking(tmp_path, monkeypatch) -> None:
    src = ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from dmscale.app import runs\n"
           "else:\n    import dmscale.topk\n"
           "def f():\n    from dmscale.recipes import loop\n    from . import budget\n")
    f = tmp_path / "probe.py"
    f.write_text(src)
    monkeypatch.setitem(MODULES, "dmscale.probe", f)
    got = imports_of("dmscale.probe")
    assert {"dmscale.recipes.loop", "dmscale.recipes", "dmscale.budget", "dmscale.topk"} <= got
    assert "dmscale.app.runs" not in got
    assert "dmscale" not in got  # `from . import budget` runs no more of the package than is running
    assert layer_of("dmscale.probe") == "core"


def test_cycle_finder_finds_a_cycle() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


# ------------------------------------------------------------------ the package
def test_every_module_is_in_a_layer() -> None:
    assert {layer_of(m) for m in MODULES} <= set(LAYERS)
    assert layer_of("dmscale.search") == "core" and layer_of("dmscale.recipes.loop") == "recipes"
    assert layer_of("dmscale.app.runs") == "app" and layer_of("dmscale.tracing") == "shim"


def test_no_import_cycle() -> None:
    assert _cycles(_graph()) == []


def test_no_upward_import() -> None:
    bad = set()
    for mod, deps in _graph().items():
        for dep in deps:
            la, lb = layer_of(mod), layer_of(dep)
            if lb == "shim" and la != "shim":
                bad.add((mod, dep))  # nothing may depend on a deprecation shim
            elif LAYERS[lb] > LAYERS[la]:
                bad.add((mod, dep))
    unexpected = sorted(bad - set(KNOWN))
    assert not unexpected, "upward imports (layer order in docs/architecture.md):\n" + "\n".join(
        f"  {a} ({layer_of(a)}) imports {b} ({layer_of(b)})" for a, b in unexpected)
    fixed = sorted(set(KNOWN) - bad)
    assert not fixed, f"these known violations are gone: delete them from KNOWN in tests/test_layers.py: {fixed}"


# ------------------------------------------------------------------ import cost
_PROBE = """
import sys
import torch  # torch imports tqdm itself (torch.hub); the check is on what dmscale adds
before = set(sys.modules)
import dmscale
added = set(sys.modules) - before
heavy = sorted(m for m in added if m.split(".")[0] in {heavy})
print(",".join(heavy))
"""


def test_import_dmscale_adds_no_yaml_matplotlib_tqdm() -> None:
    out = subprocess.run([sys.executable, "-c", _PROBE.format(heavy=set(HEAVY))], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "", f"import dmscale imported {out.stdout.strip()}"


def test_importtime_shows_no_yaml_matplotlib_tqdm() -> None:
    out = subprocess.run([sys.executable, "-X", "importtime", "-c", "import torch; import dmscale"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    rows = [ln.rsplit("|", 1)[-1] for ln in out.stderr.splitlines() if ln.startswith("import time:")]
    # post-order: a module's line follows its imports; what comes after torch's own line is dmscale's
    after_torch = [r.strip() for r in rows[[r.rstrip() for r in rows].index(" torch") + 1:]]
    names = after_torch
    assert names and names[-1] == "dmscale", names[-5:]
    heavy = [n for n in names if n.split(".")[0] in HEAVY]
    assert not heavy, f"python -X importtime: import dmscale loads {heavy}"


@pytest.mark.parametrize("name", ["dmscale.recipes.loop", "dmscale.recipes.pipelines", "dmscale.recipes.oneshot"])
def test_recipes_import_no_app_and_no_tqdm(name: str) -> None:
    code = (f"import sys, torch\nbefore = set(sys.modules)\nimport {name}\n"
            "added = set(sys.modules) - before\n"
            "print(','.join(sorted(m for m in added if m.startswith('dmscale.app') or m.split('.')[0] in "
            f"{set(HEAVY)!r})))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "", f"import {name} loaded {out.stdout.strip()}"
