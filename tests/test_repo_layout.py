"""The layout of tests/ and benchmarks/: one test model zoo, and benchmarks that import the package only.

The walk reads the files with ``ast`` (nothing is imported or run): a class or function the zoo defines is
defined nowhere else in tests/, no test helper module repeats a model class another one defines, and no
benchmark imports a module of tests/ or names the tests/ folder in its code.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

TESTS = Path(__file__).resolve().parent
BENCHMARKS = TESTS.parent / "benchmarks"


def _tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text("utf-8"), filename=str(path))


def _top_level_defs(path: Path) -> set[str]:
    return {n.name for n in _tree(path).body if isinstance(n, (ast.ClassDef, ast.FunctionDef))}


def _imported_roots(path: Path) -> set[str]:
    roots = set()
    for node in ast.walk(_tree(path)):
        if isinstance(node, ast.Import):
            roots.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module.split(".")[0])
    return roots


def _code_strings(path: Path) -> list[tuple[int, str]]:
    """String constants of the code, docstrings left out (prose may cite a test file), and so are dict keys
    and subscripts (a result record's ``"tests"`` entry is not a path)."""
    tree = _tree(path)
    docs = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                docs.add(id(first.value))
        elif isinstance(node, ast.Dict):
            docs.update(id(k) for k in node.keys if k is not None)
        elif isinstance(node, ast.Subscript):
            docs.add(id(node.slice))
    return [(n.lineno, n.value) for n in ast.walk(tree)
            if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docs]


def test_zoo_names_are_defined_once_in_tests():
    zoo = _top_level_defs(TESTS / "zoo.py")
    assert {"MLP", "ResNetCNN", "AttrMLP", "NormMLP", "EinsumDense"} <= zoo
    clashes = {str(p.relative_to(TESTS)): sorted(zoo & _top_level_defs(p))
               for p in sorted(TESTS.rglob("*.py")) if p.name != "zoo.py"}
    clashes = {k: v for k, v in clashes.items() if v}
    assert not clashes, f"defined again outside tests/zoo.py (import them from zoo instead): {clashes}"


def test_helper_modules_do_not_repeat_a_model_class():
    """Helper modules (not test_*.py, not conftest.py) hold at most one definition of each nn.Module name."""
    where = defaultdict(list)
    for p in sorted(TESTS.rglob("*.py")):
        if p.name.startswith("test_") or p.name == "conftest.py":
            continue
        for node in _tree(p).body:
            if isinstance(node, ast.ClassDef) and any(ast.unparse(b).endswith("Module") for b in node.bases):
                where[node.name].append(str(p.relative_to(TESTS)))
    assert not {k: v for k, v in where.items() if len(v) > 1}


def test_old_zoo_modules_are_gone_and_named_nowhere():
    for old in ("models.py", "io_models.py", "upscale_models.py"):
        assert not (TESTS / old).exists(), old
    for p in sorted(TESTS.rglob("*.py")):
        roots = _imported_roots(p)
        assert not roots & {"models", "io_models", "upscale_models"}, (p, roots)


def test_benchmarks_import_the_package_not_the_tests():
    test_modules = {p.stem for p in TESTS.rglob("*.py")} - {"conftest"}
    bench = sorted(BENCHMARKS.glob("*.py"))
    assert bench, "no benchmark found: the test would be vacuous"
    for p in bench:
        assert not _imported_roots(p) & (test_modules | {"tests"}), p.name
        for line, s in _code_strings(p):
            assert "tests" not in Path(s).parts and s != "tests", f"{p.name}:{line} names tests/: {s!r}"
