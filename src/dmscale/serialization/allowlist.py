"""What a saved model may name: classes from allowlisted packages, functions from an explicit list.

``structure.json`` names classes and functions as ``module:qualname`` strings. :func:`dmscale.load`
turns a name into an object only through :class:`Allowlist`:

* **Classes** (module classes, enums, Hugging Face configs) only from modules under the allowed
  prefixes: :data:`DEFAULT_CLASS_PREFIXES` plus what the caller trusts explicitly
  (``dmscale.load(d, trust=["mypkg.models"])``). A module outside them is never imported.
* **Resolution is by exact qualified name**: the module's own namespace, then nested classes only;
  the object found must say it *is* ``module:qualname`` (its ``__module__`` and ``__qualname__``).
  So ``torch:os.system`` (a walk through a module) or a re-exported alias is refused.
* **Functions** (activations and the like that layers hold as attributes, also inside a
  ``functools.partial``) only from :data:`FUNCTIONS`, an explicit list of objects; functions are
  never imported by name from the defaults. Under a caller-trusted prefix, module-level functions
  and classes of that package are allowed too.
* A package found inside the directory being loaded (e.g. ``transformers/`` next to
  ``structure.json`` with the current directory on ``sys.path``) is refused before it is imported.
"""

from __future__ import annotations

import builtins
import importlib
import importlib.util
import math
import operator
import os
import re
import sys
import types
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dmscale.serialization.errors import LoadError

__all__ = ["Allowlist", "DEFAULT_CLASS_PREFIXES", "FUNCTIONS", "function_names", "ref_name", "split_path",
           "module_allowed", "FORBIDDEN_TRUST"]

#: Packages whose classes a saved model may use without ``trust=``.
DEFAULT_CLASS_PREFIXES: tuple[str, ...] = (
    "torch.nn",
    "transformers.models",
    "transformers.activations",  # GELUActivation, NewGELUActivation, GELUTanh, ...
    "transformers.pytorch_utils",  # Conv1D (GPT-2)
    "dmscale",
)
#: Hugging Face config classes outside ``transformers.models`` that a saved model may hold.
_HF_CONFIG_CLASSES = frozenset({
    "transformers.generation.configuration_utils:GenerationConfig",
    "transformers.configuration_utils:PreTrainedConfig",
    "transformers.configuration_utils:PretrainedConfig",
})
#: Packages that ``trust=`` may not name: trusting them would allow arbitrary code, not model code.
FORBIDDEN_TRUST = frozenset({"builtins", "os", "posix", "nt", "sys", "subprocess", "importlib", "pickle", "marshal",
                             "shutil", "ctypes", "socket", "runpy", "code", "codeop", "pty", "multiprocessing",
                             "io", "types", "functools", "operator", "inspect", "pathlib", "tempfile", "signal"})

_DOTTED = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")

# The functions a layer may hold as an attribute (activations, normalisations, elementwise math).
_FUNCTION_SOURCES: tuple[tuple[Any, str, tuple[str, ...]], ...] = (
    (F, "torch.nn.functional", (
        "relu", "relu6", "elu", "selu", "celu", "gelu", "silu", "mish", "leaky_relu", "hardswish", "hardsigmoid",
        "hardtanh", "sigmoid", "tanh", "softplus", "softsign", "softmax", "softmin", "log_softmax", "logsigmoid",
        "glu", "tanhshrink", "softshrink", "hardshrink", "threshold", "normalize", "dropout", "layer_norm",
        "group_norm", "rms_norm", "linear", "prelu", "rrelu", "gumbel_softmax")),
    (torch, "torch", (
        "relu", "sigmoid", "tanh", "exp", "expm1", "log", "log1p", "erf", "sin", "cos", "abs", "square", "sqrt",
        "rsqrt", "neg", "sign", "softmax", "log_softmax", "add", "sub", "mul", "div", "matmul", "bmm", "einsum",
        "cat", "stack", "maximum", "minimum", "clamp", "where", "logsumexp", "mean", "sum", "cumsum", "flatten")),
    (math, "math", ("sqrt", "exp", "log", "tanh", "erf", "cos", "sin")),
    (operator, "operator", ("add", "sub", "mul", "truediv", "floordiv", "matmul", "neg", "pos", "getitem")),
    (builtins, "builtins", ("abs", "min", "max", "sum", "round", "pow", "len", "int", "float", "bool", "tuple",
                            "list", "range", "divmod")),
)


def _optional_function_sources() -> list[tuple[Any, str, tuple[str, ...]]]:
    """Functions of torch submodules that are imported on demand (HF gradient checkpointing holds checkpoint)."""
    import torch.utils.checkpoint as ckpt

    return [(ckpt, "torch.utils.checkpoint", ("checkpoint",))]


_functions_cache: dict[str, Any] = {}
_function_ids: dict[int, str] = {}


def _build_functions() -> None:
    if _functions_cache:
        return
    table: dict[str, Any] = {}
    ids: dict[int, str] = {}
    for mod, name, attrs in (*_FUNCTION_SOURCES, *_optional_function_sources()):
        for attr in attrs:
            obj = mod.__dict__.get(attr)
            if obj is None or not callable(obj):
                continue
            spelling = f"{name}:{attr}"
            table.setdefault(spelling, obj)
            ids.setdefault(id(obj), spelling)
            # the object's own spelling (e.g. torch._C._nn:gelu for F.gelu), as earlier saves wrote it
            own_mod, own_qual = getattr(obj, "__module__", None), getattr(obj, "__qualname__", None)
            if isinstance(own_mod, str) and isinstance(own_qual, str) and _DOTTED.match(own_qual or ""):
                if _lookup_exact(own_mod, own_qual) is obj:
                    table.setdefault(f"{own_mod}:{own_qual}", obj)
    _functions_cache.update(table)
    _function_ids.update(ids)


def _lookup_exact(mod: str, qual: str) -> Any:
    """``mod:qual`` through already-imported modules' namespaces only (no import, no ``__getattr__``)."""
    m = sys.modules.get(mod)
    if m is None:
        parent, _, last = mod.rpartition(".")
        pm = sys.modules.get(parent) if parent else None
        m = vars(pm).get(last) if pm is not None else None
        if not isinstance(m, types.ModuleType):
            return None
    obj: Any = m
    for part in qual.split("."):
        d = vars(obj) if isinstance(obj, (types.ModuleType, type)) else None
        if d is None or part not in d:
            return None
        obj = d[part]
    return obj


#: Explicit function allowlist: ``{"module:name": function}`` (built on first use).
FUNCTIONS = _functions_cache


def function_names() -> dict[str, Any]:
    """The explicit function allowlist as ``{"module:name": function}``."""
    _build_functions()
    return dict(_functions_cache)


def split_path(spec: Any, where: str) -> tuple[str, str]:
    """Parse ``module:qualname`` (identifiers only; nothing is evaluated) or raise :class:`LoadError`."""
    if not isinstance(spec, str) or spec.count(":") != 1:
        raise LoadError(f"{where}: invalid class/function name {spec!r:.120} (expected 'module:qualname')")
    mod, qual = spec.split(":")
    if not _DOTTED.match(mod) or not _DOTTED.match(qual):
        raise LoadError(f"{where}: invalid class/function name {spec!r:.120} (expected 'module:qualname')")
    return mod, qual


def module_allowed(mod: str, prefixes: Iterable[str]) -> bool:
    """Whether module ``mod`` is one of ``prefixes`` or inside one (``torch.nn`` allows ``torch.nn.modules.linear``)."""
    return any(mod == p or mod.startswith(p + ".") for p in prefixes)


def _is_under(path: str | None, directory: Path) -> bool:
    if not path:
        return False
    try:
        Path(path).resolve().relative_to(directory)
        return True
    except (ValueError, OSError):
        return False


def ref_name(obj: Any, where: str) -> str:
    """The name a function/class is saved under (``module:qualname``); TypeError if it cannot be named.

    Allowlisted functions get their allowlist spelling. Anything else must resolve back to itself by
    its exact ``__module__:__qualname__``; loading it then needs ``trust=`` for its package.
    """
    _build_functions()
    spelling = _function_ids.get(id(obj))
    if spelling is not None and _functions_cache.get(spelling) is obj:
        return spelling
    mod, qual = getattr(obj, "__module__", None), getattr(obj, "__qualname__", None)
    if isinstance(mod, str) and isinstance(qual, str) and "<" not in qual and _DOTTED.match(mod) \
            and _DOTTED.match(qual) and _lookup_exact(mod, qual) is obj:
        return f"{mod}:{qual}"
    raise TypeError(
        f"{where}: cannot save {obj!r:.100}: it is not importable by its exact qualified name "
        "(lambdas, local functions, bound methods and re-exported aliases are not supported; use a module-level "
        "function, an allowlisted activation, or functools.partial of one)"
    )


class Allowlist:
    """Resolves names from ``structure.json`` to classes/functions under the load policy (see module doc).

    ``trust``: extra module prefixes whose classes and functions the caller trusts (like Hugging
    Face's ``trust_remote_code``, but for installed packages only). ``directory``: the directory being
    loaded; packages found inside it are never imported.
    """

    def __init__(self, trust: Iterable[str] | str | None = (), directory: str | os.PathLike[str] | None = None) -> None:
        if trust is None:
            trust = ()
        if isinstance(trust, str):
            trust = [trust]
        trusted: list[str] = []
        for t in trust:
            if not isinstance(t, str) or not _DOTTED.match(t):
                raise TypeError(f"trust: {t!r} is not a module prefix such as 'mypkg.models'")
            if t.split(".")[0] in FORBIDDEN_TRUST:
                raise ValueError(f"trust: {t!r} would allow arbitrary code, not model classes; name the package "
                                 "that defines your layers instead")
            trusted.append(t)
        self.trusted: tuple[str, ...] = tuple(trusted)
        self.class_prefixes: tuple[str, ...] = DEFAULT_CLASS_PREFIXES + self.trusted
        self.directory = Path(directory).resolve() if directory is not None else None
        _build_functions()

    # ---------------------------------------------------------------- resolution
    def _refuse(self, spec: str, where: str, what: str) -> LoadError:
        mod = spec.split(":")[0]
        return LoadError(
            f"{where}: {what} {spec!r} is not in the load allowlist (classes from {', '.join(self.class_prefixes)}); "
            f"its module {mod!r} was not imported. If you trust that package, load with "
            f"dmscale.load(path, trust=[{mod!r}])"
        )

    def import_module(self, mod: str, where: str) -> types.ModuleType:
        """Import an allowed module, refusing packages that live inside the directory being loaded."""
        m = sys.modules.get(mod)
        if isinstance(m, types.ModuleType):
            return m
        root = mod.split(".")[0]
        if root not in sys.modules and self.directory is not None:
            try:
                spec = importlib.util.find_spec(root)
            except (ImportError, ValueError):
                spec = None
            locations = list(getattr(spec, "submodule_search_locations", None) or []) if spec else []
            origins = [getattr(spec, "origin", None)] + locations if spec else []
            if any(_is_under(o, self.directory) for o in origins):
                raise LoadError(f"{where}: package {root!r} would be imported from inside the directory being "
                                f"loaded ({str(self.directory)!r}); refusing to import it")
        try:
            return importlib.import_module(mod)
        except ImportError as exc:
            raise LoadError(f"{where}: cannot import module {mod!r} (is the package installed?): {exc}") from None

    def resolve(self, spec: Any, where: str, what: str = "class") -> Any:
        """The object named exactly ``module:qualname`` in an allowed module (module namespace, then nested classes)."""
        mod, qual = split_path(spec, where)
        if not module_allowed(mod, self.class_prefixes):
            raise self._refuse(spec, where, what)
        obj: Any = self.import_module(mod, where)
        parts = qual.split(".")
        for i, part in enumerate(parts):
            d = vars(obj)
            if part not in d:
                raise LoadError(f"{where}: {what} {spec!r}: module {mod!r} defines no {'.'.join(parts[:i + 1])!r}")
            obj = d[part]
            if i < len(parts) - 1 and not isinstance(obj, type):
                raise LoadError(f"{where}: {what} {spec!r} walks through {type(obj).__name__} "
                                f"{'.'.join(parts[:i + 1])!r}; only nested classes may be named")
        if getattr(obj, "__module__", None) != mod or getattr(obj, "__qualname__", None) != qual:
            raise LoadError(f"{where}: {what} {spec!r} is an alias of {getattr(obj, '__module__', '?')}:"
                            f"{getattr(obj, '__qualname__', '?')}, not an object defined under that exact name")
        return obj

    def module_class(self, spec: Any, where: str) -> type[nn.Module]:
        """A ``torch.nn.Module`` subclass from an allowed module."""
        obj = self.resolve(spec, where, "class")
        if not (isinstance(obj, type) and issubclass(obj, nn.Module)):
            raise LoadError(f"{where}: {spec!r} is not a subclass of torch.nn.Module; refusing to instantiate it")
        return obj

    def enum_class(self, spec: Any, where: str) -> type:
        """An ``enum.Enum`` subclass from an allowed module."""
        import enum

        obj = self.resolve(spec, where, "enum")
        if not (isinstance(obj, type) and issubclass(obj, enum.Enum)):
            raise LoadError(f"{where}: {spec!r} is not an Enum class")
        return obj

    def config_class(self, spec: Any, where: str, bases: tuple[type, ...]) -> type:
        """A Hugging Face config class (``transformers.models...`` or one of the generic config classes)."""
        mod, qual = split_path(spec, where)
        if not module_allowed(mod, self.class_prefixes) and spec not in _HF_CONFIG_CLASSES:
            raise self._refuse(spec, where, "config class")
        if spec in _HF_CONFIG_CLASSES:
            obj: Any = self.import_module(mod, where)
            for part in qual.split("."):
                obj = vars(obj).get(part)
                if obj is None:
                    raise LoadError(f"{where}: config class {spec!r} not found")
        else:
            obj = self.resolve(spec, where, "config class")
        if not (bases and isinstance(obj, type) and issubclass(obj, bases)):
            raise LoadError(f"{where}: {spec!r} is not a Hugging Face config class; refusing to build it")
        return obj

    def function(self, spec: Any, where: str) -> Callable[..., Any]:
        """A function or class an attribute may hold: the explicit list, allowed module classes, trusted packages."""
        split_path(spec, where)
        fn = _functions_cache.get(spec)
        if fn is not None:
            return fn
        mod, _ = spec.split(":")
        if module_allowed(mod, self.trusted):
            obj = self.resolve(spec, where, "function")
            if isinstance(obj, (types.FunctionType, types.BuiltinFunctionType, type)):
                return obj
            raise LoadError(f"{where}: {spec!r} is a {type(obj).__name__}, not a function or class")
        if module_allowed(mod, self.class_prefixes):
            try:
                obj = self.resolve(spec, where, "class")
            except LoadError:
                obj = None
            if isinstance(obj, type) and issubclass(obj, nn.Module):
                return obj  # a layer class held as a value (e.g. norm_layer=nn.BatchNorm2d)
        raise LoadError(
            f"{where}: function {spec!r} is not in the allowlist of functions a saved model may hold "
            f"(activations such as torch.nn.functional:gelu; see dmscale.serialization.allowlist.FUNCTIONS). "
            f"If you trust its package, load with dmscale.load(path, trust=[{mod!r}])"
        )
