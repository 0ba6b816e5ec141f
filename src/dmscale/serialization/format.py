"""Save/load exported (physically smaller) models without running user construction code.

A saved model is a directory with two files:

* ``structure.json`` -- the module tree: for every module its class (``module:qualname``), its
  plain ``__dict__`` attributes (ints, floats, strings, tuples, dtypes, functions by qualified
  name, Hugging Face configs, ...), its parameter/buffer names (pointing into the tensor table),
  its ordered children; plus the tensor table (shape/dtype of every stored tensor) and the
  SHA-256 and size of the weights file.
* ``model.safetensors`` -- every tensor stored once (tied/shared tensors are stored once and
  restored shared by identity).

Loading imports each class by path, creates it with ``cls.__new__(cls)`` +
``torch.nn.Module.__init__`` and restores ``__dict__``, parameters, buffers and children.  No
``pickle``, no ``eval``, no ``torch.load``; only ``nn.Module`` subclasses are instantiated.
"""

from __future__ import annotations

import contextlib
import ctypes
import enum
import errno
import hashlib
import importlib
import json
import math
import os
import re
import shutil
import sys
import tempfile
import threading
import types
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "STRUCTURE_FILE",
    "WEIGHTS_FILE",
    "save",
    "load",
    "read_structure",
    "atomic_write_bytes",
    "atomic_write_text",
    "atomic_directory",
]

FORMAT_NAME = "dmscale.module"
FORMAT_VERSION = 1
STRUCTURE_FILE = "structure.json"
WEIGHTS_FILE = "model.safetensors"

# ``nn.Module.__init__`` state that is rebuilt by ``nn.Module.__init__`` itself (not saved as attributes).
_MODULE_INTERNALS = frozenset(nn.Module().__dict__) - {"training"}
_HOOK_KEYS_FORWARD = frozenset(
    k for k in _MODULE_INTERNALS if "hook" in k and ("forward" in k or "backward" in k)
)
# Packages whose functions/classes may be referenced by attributes (``{"$ref": ...}``) at load time,
# in addition to the packages that define the model's own module classes.
_TRUSTED_REF_ROOTS = frozenset({"torch", "math", "operator", "transformers", "numpy", "einops", "dmscale"})
_SAFE_BUILTINS = frozenset(
    {"abs", "min", "max", "sum", "len", "round", "int", "float", "bool", "str", "tuple", "list", "dict",
     "set", "frozenset", "range", "slice", "pow", "divmod", "any", "all", "zip", "map", "filter", "sorted",
     "reversed", "enumerate", "isinstance", "getattr", "hasattr", "id", "type", "object"}
)
_DOTTED = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")


# --------------------------------------------------------------------------------------------------
# Atomic filesystem helpers (reused by checkpoints)
# --------------------------------------------------------------------------------------------------

_umask_lock = threading.Lock()
_umask_cache: list[int] = []


def _default_mode(directory: bool = False) -> int:
    """Permission bits a normal ``open``/``mkdir`` would give (tempfile uses 0600/0700)."""
    if not _umask_cache:
        with _umask_lock:
            if not _umask_cache:
                mask = os.umask(0o022)
                os.umask(mask)
                _umask_cache.append(mask)
    return (0o777 if directory else 0o666) & ~_umask_cache[0]


def _fsync_dir(path: Path) -> None:
    """Flush a directory entry to disk so that a rename inside it survives a crash (no-op where unsupported)."""
    flags = getattr(os, "O_DIRECTORY", None)
    if flags is None:  # pragma: no cover - Windows
        return
    try:
        fd = os.open(path, os.O_RDONLY | flags)
    except OSError:  # pragma: no cover
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    """Flush one file's contents to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (temp file in the same dir, fsync, rename) so readers never see half a file."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.tmp-", dir=target.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, _default_mode())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    _fsync_dir(target.parent)
    return target


def atomic_write_text(path: str | os.PathLike[str], text: str, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` atomically (see :func:`atomic_write_bytes`)."""
    return atomic_write_bytes(path, text.encode(encoding))


def _rename_exchange(a: Path, b: Path) -> bool:
    """Atomically swap two existing paths with Linux ``renameat2(RENAME_EXCHANGE)``; False where unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    at_fdcwd, rename_exchange = -100, 2
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EPERM):
        return False
    raise OSError(err, f"renameat2(RENAME_EXCHANGE) failed: {os.strerror(err)}", str(a), None, str(b))


def _replace_directory(new: Path, target: Path) -> None:
    """Move the finished directory ``new`` to ``target``, replacing an existing ``target`` as safely as possible."""
    if not os.path.lexists(target):
        os.rename(new, target)
        _fsync_dir(target.parent)
        return
    if _rename_exchange(new, target):  # one atomic step: target is never missing
        _fsync_dir(target.parent)
        shutil.rmtree(new, ignore_errors=True)  # ``new`` now holds the old contents
        return
    aside = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
    aside.rmdir()
    os.rename(target, aside)
    try:
        os.rename(new, target)
    except BaseException:
        os.rename(aside, target)
        raise
    _fsync_dir(target.parent)
    shutil.rmtree(aside, ignore_errors=True)


@contextlib.contextmanager
def atomic_directory(
    path: str | os.PathLike[str], *, replace_if: Callable[[Path], bool] | None = None
) -> Iterator[Path]:
    """Yield a temp dir next to ``path``; on success fsync it and swap it in, on error delete it (target untouched).

    An existing ``path`` is replaced only if it is an empty directory or ``replace_if(path)`` is
    true; otherwise :class:`FileExistsError` is raised before anything is written.
    """
    target = Path(path).absolute()

    def check_replaceable() -> None:
        if not os.path.lexists(target):
            return
        if target.is_dir() and not target.is_symlink():
            if not any(target.iterdir()) or (replace_if is not None and replace_if(target)):
                return
        raise FileExistsError(
            f"{str(target)!r} exists and is not a directory this writer may replace; remove it or choose another path"
        )

    check_replaceable()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        os.chmod(tmp, _default_mode(directory=True))
        yield tmp
        for root, _dirs, files in os.walk(tmp):
            for name in files:
                _fsync_file(Path(root) / name)
            _fsync_dir(Path(root))
        check_replaceable()
        _replace_directory(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# --------------------------------------------------------------------------------------------------
# Name resolution (safe imports)
# --------------------------------------------------------------------------------------------------


def _class_path(cls: type) -> str:
    """``module:qualname`` of a class or function."""
    return f"{cls.__module__}:{cls.__qualname__}"


def _split_path(spec: Any, where: str) -> tuple[str, str]:
    """Parse and validate ``module:qualname`` (identifiers only; nothing is evaluated)."""
    if not isinstance(spec, str) or spec.count(":") != 1:
        raise ValueError(f"{where}: invalid class/function path {spec!r} (expected 'module:qualname')")
    mod, qual = spec.split(":")
    if not _DOTTED.match(mod) or not _DOTTED.match(qual):
        raise ValueError(f"{where}: invalid class/function path {spec!r} (expected 'module:qualname')")
    return mod, qual


def _import_path(spec: str, where: str) -> Any:
    """Import ``module`` of ``module:qualname`` and walk ``qualname`` with getattr."""
    mod, qual = _split_path(spec, where)
    try:
        obj: Any = importlib.import_module(mod)
    except ImportError as exc:
        raise ImportError(f"{where}: cannot import module {mod!r} for {spec!r} (is the package installed?): {exc}") from exc
    for part in qual.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ImportError(f"{where}: {spec!r} not found (module {mod!r} has no {qual!r})") from None
    return obj


def _resolve_module_class(spec: str, where: str) -> type[nn.Module]:
    """Import a class that must be a ``torch.nn.Module`` subclass; anything else is refused."""
    obj = _import_path(spec, where)
    if not (isinstance(obj, type) and issubclass(obj, nn.Module)):
        raise TypeError(f"{where}: {spec!r} is not a subclass of torch.nn.Module; refusing to instantiate it")
    return obj


def _ref_candidates(obj: Any) -> list[str]:
    """Possible ``module:qualname`` spellings of a function/class/builtin."""
    out: list[str] = []
    mod = getattr(obj, "__module__", None)
    qual = getattr(obj, "__qualname__", None)
    name = getattr(obj, "__name__", None)
    if isinstance(mod, str):
        for q in (qual, name):
            if isinstance(q, str):
                out.append(f"{mod}:{q}")
    owner = getattr(obj, "__objclass__", None)
    if isinstance(owner, type) and isinstance(name, str):
        out.append(f"{owner.__module__}:{owner.__qualname__}.{name}")
    return out


def _ref_of(obj: Any, where: str) -> str:
    """Qualified name that imports back to exactly ``obj``, or TypeError."""
    for spec in _ref_candidates(obj):
        if "<" in spec:
            continue
        try:
            _split_path(spec, where)
            if _import_path(spec, where) is obj:
                return spec
        except (ImportError, ValueError):
            continue
    raise TypeError(
        f"{where}: cannot save {obj!r}: it is not importable by a qualified name "
        "(lambdas, local functions, bound methods and partials are not supported; use a module-level function)"
    )


def _trusted_ref(spec: str, trusted_roots: frozenset[str], where: str) -> Any:
    """Resolve an attribute's function/class reference, only from trusted packages."""
    mod, qual = _split_path(spec, where)
    root = mod.split(".")[0]
    if root == "builtins":
        if qual not in _SAFE_BUILTINS:
            raise ValueError(f"{where}: refusing reference to builtins.{qual}")
    elif root not in trusted_roots:
        raise ValueError(
            f"{where}: refusing reference {spec!r}: package {root!r} is neither a model-class package "
            f"nor one of {sorted(_TRUSTED_REF_ROOTS)}"
        )
    obj = _import_path(spec, where)
    if not callable(obj) or isinstance(obj, types.ModuleType):
        raise ValueError(f"{where}: reference {spec!r} is not a function or class")
    return obj


def _hf_config_bases() -> tuple[type, ...]:
    """Hugging Face config base classes, if transformers is already imported (never imports it)."""
    tf = sys.modules.get("transformers")
    if tf is None:
        return ()
    bases = []
    for name in ("PreTrainedConfig", "PretrainedConfig", "GenerationConfig"):
        try:
            cls = getattr(tf, name)
        except Exception:  # pragma: no cover - lazy-import failures
            continue
        if isinstance(cls, type) and cls not in bases:
            bases.append(cls)
    return tuple(bases)


def _dtype_name(dtype: torch.dtype) -> str:
    """``torch.float32`` -> ``"float32"``."""
    return str(dtype).removeprefix("torch.")


def _dtype_from_name(name: Any, where: str) -> torch.dtype:
    """``"float32"`` -> ``torch.float32`` (validated)."""
    dt = getattr(torch, name, None) if isinstance(name, str) and _DOTTED.match(name) else None
    if not isinstance(dt, torch.dtype):
        raise ValueError(f"{where}: unknown dtype {name!r}")
    return dt


# --------------------------------------------------------------------------------------------------
# Save
# --------------------------------------------------------------------------------------------------


class _Saver:
    """Walks a module tree once and produces the structure dict plus the tensors to write."""

    def __init__(self, root: nn.Module) -> None:
        self.root = root
        self.module_paths: dict[int, str] = {}
        self.tensor_keys: dict[int, str] = {}
        self.tensors: dict[str, torch.Tensor] = {}
        self.tensor_table: dict[str, dict[str, Any]] = {}
        self.objects: list[dict[str, Any]] = []
        self.object_ids: dict[int, int] = {}
        self.keepalive: list[Any] = []
        self.hf_bases = _hf_config_bases()
        self.attr_key = ""  # qualified name of the attribute being encoded (key hint for tensor attributes)

    # -- tensors ---------------------------------------------------------------------------------
    def tensor_key(self, t: torch.Tensor, default_key: str, where: str) -> str:
        """Key of ``t`` in the weights file; each tensor object is stored once."""
        if id(t) in self.tensor_keys:
            return self.tensor_keys[id(t)]
        if type(t) not in (torch.Tensor, nn.Parameter):
            raise TypeError(f"{where}: unsupported tensor type {type(t).__qualname__} (only torch.Tensor / nn.Parameter)")
        if t.is_meta:
            raise TypeError(f"{where}: tensor is on the meta device (no data to save)")
        key = default_key
        while key in self.tensors:
            key += "_"
        self.keepalive.append(t)
        self.tensor_keys[id(t)] = key
        self.tensors[key] = t
        self.tensor_table[key] = {
            "shape": list(t.shape),
            "dtype": _dtype_name(t.dtype),
            "kind": "parameter" if isinstance(t, nn.Parameter) else "tensor",
            "requires_grad": bool(t.requires_grad),
        }
        return key

    # -- attribute values --------------------------------------------------------------------------
    def encode(self, v: Any, where: str) -> Any:
        """JSON form of one attribute value (tagged objects for non-JSON types); TypeError if unsupported."""
        if v is None or type(v) in (bool, str):
            return v
        if isinstance(v, enum.Enum):
            return {"$enum": _ref_of(type(v), where), "member": v.name}
        if type(v) is int:
            return v
        if type(v) is float:
            return v if math.isfinite(v) else {"$float": repr(v)}
        if isinstance(v, (bool, int, float, str)):  # subclasses (e.g. numpy.float64) -> plain value
            base = next(b for b in (bool, int, float, str) if isinstance(v, b))
            return self.encode(base(v), where)
        if type(v).__module__ == "numpy" and hasattr(v, "item") and getattr(v, "ndim", None) == 0:
            return self.encode(v.item(), where)
        if isinstance(v, torch.dtype):
            return {"$dtype": _dtype_name(v)}
        if isinstance(v, torch.Size):
            return {"$size": [int(x) for x in v]}
        if isinstance(v, torch.device):
            return {"$device": str(v)}
        if isinstance(v, list) and type(v) is list:
            return [self.encode(x, f"{where}[{i}]") for i, x in enumerate(v)]
        if type(v) is tuple:
            return {"$tuple": [self.encode(x, f"{where}[{i}]") for i, x in enumerate(v)]}
        if type(v) in (set, frozenset):
            items = [self.encode(x, f"{where}{{...}}") for x in v]
            items.sort(key=lambda x: json.dumps(x, sort_keys=True))
            return {"$frozenset" if type(v) is frozenset else "$set": items}
        if type(v) is dict or type(v).__module__ == "collections" and isinstance(v, dict):
            if type(v) is not dict and type(v).__qualname__ != "OrderedDict":
                raise TypeError(f"{where}: unsupported mapping type {type(v).__qualname__}")
            tag = "$odict" if type(v) is not dict else "$dict"
            if tag == "$dict" and all(isinstance(k, str) and not k.startswith("$") for k in v):
                return {k: self.encode(x, f"{where}[{k!r}]") for k, x in v.items()}
            return {tag: [[self.encode(k, f"{where}<key>"), self.encode(x, f"{where}[{k!r}]")] for k, x in v.items()]}
        if isinstance(v, nn.Module):
            if id(v) not in self.module_paths:
                raise TypeError(
                    f"{where}: refers to a {type(v).__qualname__} module that is not part of the saved module tree"
                )
            return {"$module": self.module_paths[id(v)]}
        if isinstance(v, torch.Tensor):
            return {"$tensor": self.tensor_key(v, f"@attr:{self.attr_key}", where)}
        if self.hf_bases and isinstance(v, self.hf_bases):
            return {"$object": self.encode_config(v, where)}
        if isinstance(v, (types.FunctionType, types.BuiltinFunctionType, type)) or type(v).__name__ in (
            "method_descriptor", "wrapper_descriptor", "builtin_function_or_method",
        ):
            return {"$ref": _ref_of(v, where)}
        raise TypeError(
            f"{where}: cannot save attribute of type {type(v).__module__}.{type(v).__qualname__} ({v!r:.80}); "
            "supported: None/bool/int/float/str, list/tuple/set/dict of these, torch.dtype/Size/device, tensors, "
            "submodules of the tree, module-level functions/classes, enums, Hugging Face configs"
        )

    def encode_config(self, cfg: Any, where: str) -> int:
        """Store a Hugging Face config once (shared by identity) and return its index in ``objects``."""
        if id(cfg) in self.object_ids:
            return self.object_ids[id(cfg)]
        self.keepalive.append(cfg)
        data = self.encode(cfg.to_dict(), f"{where}.to_dict()")
        private: dict[str, Any] = {}
        for k, x in vars(cfg).items():  # e.g. _attn_implementation_internal is not in to_dict()
            if k.startswith("_") and not k.startswith("__"):
                try:
                    private[k] = self.encode(x, f"{where}.{k}")
                except TypeError:
                    continue
        idx = len(self.objects)
        self.object_ids[id(cfg)] = idx
        self.objects.append({"class": _ref_of(type(cfg), where), "kind": "hf_config", "data": data, "private": private})
        return idx

    # -- modules ---------------------------------------------------------------------------------
    def walk(self, m: nn.Module, path: str) -> dict[str, Any]:
        """Describe module ``m`` at ``path`` (children recursively; attributes filled in later)."""
        self.module_paths[id(m)] = path
        self.keepalive.append(m)
        cls = type(m)
        where = f"module {path or '<root>'!r} ({cls.__qualname__})"
        if "<locals>" in cls.__qualname__:
            raise TypeError(f"{where}: class {_class_path(cls)} is defined inside a function; define it at module level")
        try:
            if _import_path(_class_path(cls), where) is not cls:
                raise ImportError
        except (ImportError, ValueError):
            raise TypeError(
                f"{where}: class {_class_path(cls)} does not import back to the same class "
                "(dynamically created classes, e.g. from torch.nn.utils.parametrize, cannot be saved)"
            ) from None
        if "_compiled_call_impl" in m.__dict__ and m.__dict__["_compiled_call_impl"] is not None:
            raise TypeError(f"{where}: module was compiled with .compile(); save the uncompiled module")
        for k in _HOOK_KEYS_FORWARD:
            if m.__dict__.get(k):
                raise TypeError(f"{where}: has {k} registered; hooks cannot be saved and the forward would change")
        for k in _MODULE_INTERNALS - _HOOK_KEYS_FORWARD:
            if "hook" in k and m.__dict__.get(k):
                warnings.warn(f"{where}: dropping {k} (state-dict hooks are not saved)", stacklevel=3)

        prefix = f"{path}." if path else ""
        params: dict[str, Any] = {}
        for name, p in m._parameters.items():
            params[name] = None if p is None else self.tensor_key(p, prefix + name, f"{where} parameter {name!r}")
        buffers: dict[str, Any] = {}
        for name, b in m._buffers.items():
            if b is None:
                buffers[name] = None
            else:
                key = self.tensor_key(b, prefix + name, f"{where} buffer {name!r}")
                buffers[name] = {"key": key, "persistent": name not in m._non_persistent_buffers_set}
        children: dict[str, Any] = {}
        for name, c in m._modules.items():
            if c is None:
                children[name] = None
            elif id(c) in self.module_paths:
                children[name] = {"alias": self.module_paths[id(c)]}
            else:
                children[name] = self.walk(c, prefix + name)
        return {
            "class": _class_path(cls),
            "training": bool(m.training),
            "attributes": None,  # filled by fill_attributes once all module paths are known
            "parameters": params,
            "buffers": buffers,
            "children": children,
        }

    def fill_attributes(self, m: nn.Module, node: dict[str, Any], path: str) -> None:
        """Encode the plain ``__dict__`` attributes of every module (after the tree walk, for $module refs)."""
        attrs: dict[str, Any] = {}
        prefix = f"{path}." if path else ""
        for k, v in m.__dict__.items():
            if k in _MODULE_INTERNALS or k == "training" or k == "_compiled_call_impl":
                continue
            self.attr_key = prefix + k
            attrs[k] = self.encode(v, f"module {path or '<root>'!r} ({type(m).__qualname__}) attribute {k!r}")
        node["attributes"] = attrs
        for name, c in m._modules.items():
            child = node["children"][name]
            if c is not None and "alias" not in child:
                self.fill_attributes(c, child, prefix + name)

    def tensors_for_file(self) -> dict[str, torch.Tensor]:
        """CPU, contiguous, storage-disjoint copies as safetensors requires (views of shared storage are cloned)."""
        out: dict[str, torch.Tensor] = {}
        seen_storage: set[int] = set()
        for key, t in self.tensors.items():
            x = t.detach().to("cpu").contiguous()
            if x.numel() > 0:
                st = x.untyped_storage()
                if st.data_ptr() in seen_storage or st.nbytes() != x.numel() * x.element_size():
                    x = x.clone()
                seen_storage.add(x.untyped_storage().data_ptr())
            out[key] = x
        return out


def _dmscale_version() -> str:
    """Installed dmscale version (lazily, to avoid import cycles with ``dmscale/__init__``)."""
    mod = sys.modules.get("dmscale")
    version = getattr(mod, "__version__", None)
    if isinstance(version, str):
        return version
    try:
        from importlib.metadata import version as _v

        return _v("dmscale")
    except Exception:  # pragma: no cover
        return "unknown"


def _is_dmscale_dir(path: Path) -> bool:
    """True if ``path`` holds an earlier dmscale save (so ``save`` may replace it)."""
    try:
        data = json.loads((path / STRUCTURE_FILE).read_text("utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and data.get("format") == FORMAT_NAME


def file_digest(path: Path, algorithm: str = "sha256") -> str:
    """Streaming hex digest of a file (SHA-256 for our saves; MD5 where a publisher lists MD5 sums)."""
    h = hashlib.new(algorithm)
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _sha256_file(path: Path) -> str:
    """Streaming SHA-256 of a file."""
    return file_digest(path, "sha256")


def save(model: nn.Module, path: str | os.PathLike[str], meta: dict[str, Any] | None = None) -> Path:
    """Save ``model`` (module tree + weights) to directory ``path`` atomically so it loads without its constructor.

    Raises ``TypeError`` naming the module and attribute if anything cannot be represented.
    An existing earlier save (or empty directory) at ``path`` is replaced; other existing paths are refused.
    """
    from safetensors.torch import save_file

    if not isinstance(model, nn.Module):
        raise TypeError(f"save() expects a torch.nn.Module, got {type(model).__qualname__}")
    orig = getattr(model, "_orig_mod", None)  # torch.compile(model) wrapper
    if isinstance(orig, nn.Module) and type(model).__name__ == "OptimizedModule":
        model = orig
    if meta is not None:
        try:
            json.dumps(meta, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise TypeError(f"meta must be a JSON-serialisable dict: {exc}") from exc

    saver = _Saver(model)
    tree = saver.walk(model, "")
    saver.fill_attributes(model, tree, "")
    tensors = saver.tensors_for_file()
    structure: dict[str, Any] = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "dmscale_version": _dmscale_version(),
        "torch_version": torch.__version__,
        "root_class": tree["class"],
        "num_parameters": sum(
            t.numel() for k, t in saver.tensors.items() if saver.tensor_table[k]["kind"] == "parameter"
        ),
        "weights": None,
        "tensors": saver.tensor_table,
        "objects": saver.objects,
        "module": tree,
        "meta": meta if meta is not None else {},
    }
    if saver.objects and "transformers" in sys.modules:
        structure["transformers_version"] = getattr(sys.modules["transformers"], "__version__", "unknown")

    with atomic_directory(path, replace_if=_is_dmscale_dir) as tmp:
        weights_path = tmp / WEIGHTS_FILE
        save_file(tensors, str(weights_path), metadata={"format": "pt", "dmscale_format": FORMAT_NAME})
        structure["weights"] = {
            "file": WEIGHTS_FILE,
            "sha256": _sha256_file(weights_path),
            "bytes": weights_path.stat().st_size,
        }
        (tmp / STRUCTURE_FILE).write_text(json.dumps(structure, indent=1, allow_nan=False) + "\n", "utf-8")
    return Path(path)


# --------------------------------------------------------------------------------------------------
# Load
# --------------------------------------------------------------------------------------------------


def read_structure(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Parse and validate ``structure.json`` of a saved model (``path`` is the directory or the JSON file)."""
    p = Path(path)
    file = p / STRUCTURE_FILE if p.is_dir() or not p.suffix else p
    if not file.exists():
        raise FileNotFoundError(errno.ENOENT, f"no dmscale model structure at {str(file)!r}", str(file))
    try:
        data = json.loads(file.read_text("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{str(file)!r} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict) or data.get("format") != FORMAT_NAME:
        got = data.get("format") if isinstance(data, dict) else type(data).__name__
        raise ValueError(f"{str(file)!r} is not a dmscale model structure (format {got!r}, expected {FORMAT_NAME!r})")
    version = data.get("format_version")
    if version != FORMAT_VERSION:
        raise ValueError(
            f"{str(file)!r} has unsupported format_version {version!r}; this dmscale "
            f"({_dmscale_version()}) reads version {FORMAT_VERSION}. Upgrade dmscale to load it."
        )
    for key, typ in (("module", dict), ("tensors", dict), ("weights", dict), ("objects", list)):
        if not isinstance(data.get(key), typ):
            raise ValueError(f"{str(file)!r}: missing or invalid {key!r} section")
    return data


def _load_weights(directory: Path, structure: dict[str, Any], device: str | torch.device, verify: bool) -> dict[str, torch.Tensor]:
    """Check size/SHA-256 of the weights file, load it, and check every tensor against the structure."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    info = structure["weights"]
    name = info.get("file")
    if not isinstance(name, str) or "/" in name or "\\" in name or name in ("", ".", ".."):
        raise ValueError(f"invalid weights file name {name!r} in structure.json")
    wpath = directory / name
    if not wpath.is_file():
        raise FileNotFoundError(errno.ENOENT, f"weights file missing: {str(wpath)!r}", str(wpath))
    size = wpath.stat().st_size
    expected_size = info.get("bytes")
    if isinstance(expected_size, int) and size != expected_size:
        kind = "truncated" if size < expected_size else "has extra bytes"
        raise ValueError(f"weights file {str(wpath)!r} is {kind}: {size} bytes, expected {expected_size}")
    if verify:
        digest = _sha256_file(wpath)
        if digest != info.get("sha256"):
            raise ValueError(
                f"weights file {str(wpath)!r} is corrupted or was modified: SHA-256 {digest} "
                f"does not match {info.get('sha256')!r} recorded in structure.json"
            )
    try:
        loaded = load_file(str(wpath), device=str(device))
    except (SafetensorError, OSError, RuntimeError, ValueError) as exc:
        raise ValueError(f"cannot read weights file {str(wpath)!r}: {exc}") from exc

    table: dict[str, Any] = structure["tensors"]
    missing = sorted(set(table) - set(loaded))
    extra = sorted(set(loaded) - set(table))
    if missing or extra:
        raise ValueError(
            f"weights file {str(wpath)!r} does not match structure.json: missing tensors {missing[:5]}, "
            f"unexpected tensors {extra[:5]}"
        )
    for key, entry in table.items():
        t = loaded[key]
        if not isinstance(entry, dict):
            raise ValueError(f"structure.json: invalid entry for tensor {key!r}")
        shape = entry.get("shape")
        if not isinstance(shape, list) or list(t.shape) != shape:
            raise ValueError(
                f"tensor {key!r}: structure.json says shape {shape} but {name} holds shape {list(t.shape)}"
            )
        dtype = _dtype_from_name(entry.get("dtype"), f"tensor {key!r}")
        if t.dtype != dtype:
            raise ValueError(f"tensor {key!r}: structure.json says dtype {dtype} but {name} holds {t.dtype}")
    return loaded


class _Loader:
    """Rebuilds the module tree from a validated structure and loaded tensors."""

    def __init__(self, structure: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
        self.structure = structure
        self.raw = tensors
        self.tensors: dict[str, torch.Tensor] = {}
        self.modules: dict[str, nn.Module] = {}
        self.objects: dict[int, Any] = {}
        self.class_cache: dict[str, type[nn.Module]] = {}
        self.trusted_roots: frozenset[str] = _TRUSTED_REF_ROOTS

    def tensor(self, key: Any, where: str) -> torch.Tensor:
        """The (single, shared) tensor object for ``key``."""
        if not isinstance(key, str) or key not in self.raw:
            raise ValueError(f"{where}: unknown tensor key {key!r}")
        if key not in self.tensors:
            entry = self.structure["tensors"][key]
            t = self.raw[key]
            rg = bool(entry.get("requires_grad", False))
            if entry.get("kind") == "parameter":
                t = nn.Parameter(t, requires_grad=rg)
            elif rg:
                t.requires_grad_(True)
            self.tensors[key] = t
        return self.tensors[key]

    def build(self, node: Any, path: str) -> nn.Module:
        """Create the module at ``path`` and its children (attributes restored later)."""
        where = f"module {path or '<root>'!r}"
        if not isinstance(node, dict):
            raise ValueError(f"{where}: invalid module entry")
        spec = node.get("class")
        cls = self.class_cache.get(spec) if isinstance(spec, str) else None
        if cls is None:
            cls = _resolve_module_class(spec, where)
            self.class_cache[spec] = cls
        m = cls.__new__(cls)
        nn.Module.__init__(m)
        self.modules[path] = m
        prefix = f"{path}." if path else ""
        for name, key in (node.get("parameters") or {}).items():
            if key is None:
                m._parameters[name] = None
                continue
            p = self.tensor(key, f"{where} parameter {name!r}")
            if not isinstance(p, nn.Parameter):
                raise ValueError(f"{where}: parameter {name!r} refers to non-parameter tensor {key!r}")
            m._parameters[name] = p
        for name, entry in (node.get("buffers") or {}).items():
            if entry is None:
                m._buffers[name] = None
                continue
            if not isinstance(entry, dict):
                raise ValueError(f"{where}: invalid buffer entry {name!r}")
            m._buffers[name] = self.tensor(entry.get("key"), f"{where} buffer {name!r}")
            if not entry.get("persistent", True):
                m._non_persistent_buffers_set.add(name)
        for name, child in (node.get("children") or {}).items():
            if child is None:
                m._modules[name] = None
            elif isinstance(child, dict) and "alias" in child:
                target = child["alias"]
                if target not in self.modules:
                    raise ValueError(f"{where}: child {name!r} aliases unknown module path {target!r}")
                m._modules[name] = self.modules[target]
            else:
                m._modules[name] = self.build(child, prefix + name)
        return m

    def restore_attributes(self, node: dict[str, Any], path: str) -> None:
        """Set ``__dict__`` attributes and training flags on every module (after all modules exist)."""
        m = self.modules[path]
        where = f"module {path or '<root>'!r}"
        attrs = node.get("attributes") or {}
        if not isinstance(attrs, dict):
            raise ValueError(f"{where}: invalid attributes")
        for k, v in attrs.items():
            if k in _MODULE_INTERNALS:
                raise ValueError(f"{where}: attribute {k!r} is reserved")
            m.__dict__[k] = self.decode(v, f"{where} attribute {k!r}")
        m.__dict__["training"] = bool(node.get("training", False))
        prefix = f"{path}." if path else ""
        for name, child in (node.get("children") or {}).items():
            if isinstance(child, dict) and "alias" not in child:
                self.restore_attributes(child, prefix + name)

    def decode(self, v: Any, where: str) -> Any:
        """Inverse of ``_Saver.encode``."""
        if v is None or isinstance(v, (bool, int, float, str)):
            return v
        if isinstance(v, list):
            return [self.decode(x, where) for x in v]
        if not isinstance(v, dict):
            raise ValueError(f"{where}: invalid value {v!r:.80}")
        tags = [k for k in v if k.startswith("$")]
        if not tags:
            return {k: self.decode(x, where) for k, x in v.items()}
        tag = tags[0]
        val = v[tag]
        if tag == "$tuple":
            return tuple(self.decode(x, where) for x in val)
        if tag in ("$set", "$frozenset"):
            items = [self.decode(x, where) for x in val]
            return set(items) if tag == "$set" else frozenset(items)
        if tag in ("$dict", "$odict"):
            pairs = [(self.decode(k, where), self.decode(x, where)) for k, x in val]
            if tag == "$dict":
                return dict(pairs)
            from collections import OrderedDict

            return OrderedDict(pairs)
        if tag == "$float":
            if val not in ("nan", "inf", "-inf"):
                raise ValueError(f"{where}: invalid float {val!r}")
            return float(val)
        if tag == "$dtype":
            return _dtype_from_name(val, where)
        if tag == "$size":
            return torch.Size([int(x) for x in val])
        if tag == "$device":
            return torch.device(val)
        if tag == "$module":
            if val not in self.modules:
                raise ValueError(f"{where}: refers to unknown module path {val!r}")
            return self.modules[val]
        if tag == "$tensor":
            return self.tensor(val, where)
        if tag == "$object":
            return self.object(val, where)
        if tag == "$ref":
            return _trusted_ref(val, self.trusted_roots, where)
        if tag == "$enum":
            cls = _import_path(val, where)
            if not (isinstance(cls, type) and issubclass(cls, enum.Enum)):
                raise ValueError(f"{where}: {val!r} is not an Enum class")
            try:
                return cls[v.get("member")]
            except KeyError:
                raise ValueError(f"{where}: {val!r} has no member {v.get('member')!r}") from None
        raise ValueError(f"{where}: unknown value tag {tag!r} (written by a newer dmscale?)")

    def object(self, idx: Any, where: str) -> Any:
        """Rebuild (once) a shared Hugging Face config from ``objects[idx]``."""
        objs = self.structure["objects"]
        if not isinstance(idx, int) or not 0 <= idx < len(objs):
            raise ValueError(f"{where}: invalid object index {idx!r}")
        if idx not in self.objects:
            entry = objs[idx]
            spec = entry.get("class")
            cls = _import_path(spec, where)
            bases = _hf_config_bases()
            if entry.get("kind") != "hf_config" or not (isinstance(cls, type) and bases and issubclass(cls, bases)):
                raise TypeError(f"{where}: {spec!r} is not a Hugging Face config class; refusing to build it")
            data = self.decode(entry.get("data"), where)
            cfg = cls.from_dict(data)
            for k, x in (entry.get("private") or {}).items():
                if isinstance(k, str) and k.startswith("_") and not k.startswith("__"):
                    cfg.__dict__[k] = self.decode(x, f"{where}.{k}")
            self.objects[idx] = cfg
        return self.objects[idx]


def _collect_class_roots(node: Any, out: set[str]) -> None:
    """Top-level packages of all module classes in the tree (their functions may be referenced)."""
    if not isinstance(node, dict):
        return
    spec = node.get("class")
    if isinstance(spec, str) and ":" in spec:
        root = spec.split(":")[0].split(".")[0]
        if root != "builtins":
            out.add(root)
    for child in (node.get("children") or {}).values():
        _collect_class_roots(child, out)


def load(path: str | os.PathLike[str], *, device: str | torch.device = "cpu", verify: bool = True) -> nn.Module:
    """Rebuild a model saved by :func:`save` (same classes, sizes, weights, ties, training flag) without its constructor.

    ``verify`` checks the SHA-256 of the weights file (recommended; disable only for huge trusted files).
    """
    directory = Path(path)
    if not directory.exists():
        hint = ""
        if directory.parent.is_dir():
            leftovers = sorted(directory.parent.glob(f".{directory.name}.old-*"))
            if leftovers:
                hint = f"; an interrupted save left the previous version at {str(leftovers[-1])!r}"
        raise FileNotFoundError(errno.ENOENT, f"no saved dmscale model at {str(directory)!r}{hint}", str(directory))
    if directory.is_file():
        directory = directory.parent
    structure = read_structure(directory)
    tensors = _load_weights(directory, structure, device, verify)
    loader = _Loader(structure, tensors)
    roots: set[str] = set()
    _collect_class_roots(structure["module"], roots)
    # Resolve all classes first: every class must be a real nn.Module before any ref package is trusted.
    root = loader.build(structure["module"], "")
    loader.trusted_roots = _TRUSTED_REF_ROOTS | frozenset(roots)
    loader.restore_attributes(structure["module"], "")
    unused = set(tensors) - set(loader.tensors)
    if unused:
        raise ValueError(f"structure.json lists tensors no module uses: {sorted(unused)[:5]}")
    _check_consistency(root, structure)
    return root


def _check_consistency(root: nn.Module, structure: dict[str, Any]) -> None:
    """Refuse a structure whose layer sizes or parameter count disagree with the weights it carries."""
    n = sum(p.numel() for p in {id(p): p for p in root.parameters()}.values())
    expected = structure.get("num_parameters")
    if expected is not None and int(expected) != n:
        raise ValueError(f"structure.json says num_parameters={expected} but the weights hold {n} parameters")
    for name, m in root.named_modules():
        w = getattr(m, "weight", None)
        if not isinstance(w, torch.Tensor):
            continue
        checks: list[tuple[str, int, int]] = []
        if isinstance(m, nn.Linear):
            checks = [("out_features", m.out_features, w.shape[0]), ("in_features", m.in_features, w.shape[1])]
        elif isinstance(m, nn.modules.conv._ConvNd):
            out_dim = 1 if m.transposed else 0
            in_dim = 0 if m.transposed else 1
            checks = [("out_channels", m.out_channels, w.shape[out_dim] * (m.groups if m.transposed else 1)),
                      ("in_channels", m.in_channels, w.shape[in_dim] * (1 if m.transposed else m.groups))]
        elif isinstance(m, nn.modules.batchnorm._BatchNorm):
            checks = [("num_features", m.num_features, w.shape[0])]
        elif isinstance(m, nn.LayerNorm) and m.elementwise_affine:
            checks = [("normalized_shape", tuple(m.normalized_shape), tuple(w.shape))]
        elif isinstance(m, nn.GroupNorm) and m.affine:
            checks = [("num_channels", m.num_channels, w.shape[0])]
        elif isinstance(m, nn.Embedding):
            checks = [("num_embeddings", m.num_embeddings, w.shape[0]), ("embedding_dim", m.embedding_dim, w.shape[1])]
        for attr, have, want in checks:
            if have != want:
                raise ValueError(f"structure.json: module {name or '<root>'!r} ({type(m).__name__}) has {attr}={have} "
                                 f"but its weight has shape {tuple(w.shape)}")
