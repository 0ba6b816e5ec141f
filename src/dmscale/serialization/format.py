"""Save/load exported (physically smaller) models without running code from the files loaded.

A saved model is a directory with three files:

* ``structure.json`` -- the module tree: for every module its class (``module:qualname``), its
  plain ``__dict__`` attributes (ints, floats, strings, tuples, dtypes, allowlisted functions and
  ``functools.partial`` of them, Hugging Face configs, ...), its parameter/buffer names (pointing
  into the tensor table), its ordered children; the tensor table (shape/dtype of every tensor);
  the SHA-256 and size of the weights file; and a SHA-256 of the whole structure (``checksum``),
  so the structure and the weights are checksummed together.
* ``model.safetensors`` -- every tensor stored once (tied/shared tensors are restored shared).
* ``.dmscale`` -- the marker that says dmscale created the directory (``save`` replaces nothing else).

:func:`load` never unpickles, evaluates or imports anything the file chooses: classes come only
from allowlisted packages (:mod:`dmscale.serialization.allowlist`, plus ``trust=``), resolved by
exact qualified name; functions only from an explicit list; no method or hook is restored from
the file; every size attribute is re-derived from the weights (:mod:`dmscale.serialization.sizes`).
Every refused or broken directory raises :class:`dmscale.LoadError`. See ``SECURITY.md``.
"""

from __future__ import annotations

import enum
import functools
import hashlib
import json
import math
import os
import re
import sys
import types
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dmscale.serialization.allowlist import Allowlist, ref_name
from dmscale.serialization.atomic import atomic_write_bytes, atomic_write_text, read_regular_file
from dmscale.serialization.dirs import atomic_directory
from dmscale.serialization.errors import LoadError, ModelNotFoundError
from dmscale.serialization.sizes import check_sizes, rebuild_transient, transient_attrs
from dmscale.serialization.weights import parse_safetensors, sha256_bytes, strict_json_loads

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "STRUCTURE_FILE",
    "WEIGHTS_FILE",
    "LoadError",
    "save",
    "load",
    "read_structure",
    "structure_checksum",
    "file_digest",
    "atomic_write_bytes",
    "atomic_write_text",
    "atomic_directory",
]

FORMAT_NAME = "dmscale.module"
FORMAT_VERSION = 2  # 2: structure checksum, $partial, marker file; 1 (no checksum) loads only with verify=False
STRUCTURE_FILE = "structure.json"
WEIGHTS_FILE = "model.safetensors"
MODEL_ENTRIES = frozenset({STRUCTURE_FILE, WEIGHTS_FILE})
MAX_STRUCTURE_BYTES = 512 * 1024 * 1024

# ``nn.Module.__init__`` state that is rebuilt by ``nn.Module.__init__`` itself (not saved as attributes).
_MODULE_INTERNALS = frozenset(nn.Module().__dict__) - {"training"}
_HOOK_KEYS_FORWARD = frozenset(
    k for k in _MODULE_INTERNALS if "hook" in k and ("forward" in k or "backward" in k)
)
_METHOD_TYPES = (types.FunctionType, staticmethod, classmethod, types.BuiltinFunctionType,
                 types.MethodDescriptorType, types.WrapperDescriptorType, types.MethodType)
# value tags whose payload is plain data (allowed inside functools.partial arguments)
_PLAIN_TAGS = frozenset({"$tuple", "$set", "$frozenset", "$dict", "$odict", "$float", "$dtype", "$size", "$device",
                         "$enum"})
_DTYPES_BY_NAME = {k: v for k, v in vars(torch).items() if isinstance(v, torch.dtype)}
# attention / experts implementation names a Hugging Face config may carry: registered names, never a Hub repo
_IMPL_NAME = re.compile(r"^[A-Za-z0-9_|]{1,64}$")


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
    """``"float32"`` -> ``torch.float32`` (only names of real torch dtypes; no attribute lookup)."""
    dt = _DTYPES_BY_NAME.get(name) if isinstance(name, str) else None
    if dt is None:
        raise LoadError(f"{where}: unknown dtype {name!r:.80}")
    return dt


def _class_method_named(cls: type, name: str) -> bool:
    """Whether ``name`` is a method (function, static/class method, builtin) on ``cls`` or a base class."""
    for base in cls.__mro__:
        v = base.__dict__.get(name)
        if v is not None:
            return isinstance(v, _METHOD_TYPES)
    return False


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
            return {"$enum": ref_name(type(v), where), "member": v.name}
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
        if type(v) is functools.partial:
            return {"$partial": self.encode_partial(v, where)}
        if isinstance(v, (types.FunctionType, types.BuiltinFunctionType, type)) or type(v).__name__ in (
            "method_descriptor", "wrapper_descriptor", "builtin_function_or_method",
        ):
            return {"$ref": ref_name(v, where)}
        raise TypeError(
            f"{where}: cannot save attribute of type {type(v).__module__}.{type(v).__qualname__} ({v!r:.80}); "
            "supported: None/bool/int/float/str, list/tuple/set/dict of these, torch.dtype/Size/device, tensors, "
            "submodules of the tree, module-level functions/classes, functools.partial of a function with plain "
            "arguments, enums, Hugging Face configs"
        )

    def encode_partial(self, p: functools.partial, where: str) -> dict[str, Any]:
        """``functools.partial(fn, *args, **kw)`` with a nameable ``fn`` and plain-data arguments."""
        if vars(p):
            raise TypeError(f"{where}: cannot save a functools.partial that carries its own attributes")
        if not isinstance(p.func, (types.FunctionType, types.BuiltinFunctionType, type)):
            raise TypeError(f"{where}: cannot save functools.partial of {p.func!r:.80} (only of a function)")
        args = [self.encode(a, f"{where}.args[{i}]") for i, a in enumerate(p.args)]
        kw = {k: self.encode(x, f"{where}.keywords[{k!r}]") for k, x in p.keywords.items()}
        for val in (args, kw):
            bad = _first_non_plain(val)
            if bad is not None:
                raise TypeError(f"{where}: functools.partial arguments must be plain data, not {bad}")
        return {"func": ref_name(p.func, where), "args": args, "keywords": kw}

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
        self.objects.append({"class": ref_name(type(cfg), where), "kind": "hf_config", "data": data,
                             "private": private})
        return idx

    # -- modules ---------------------------------------------------------------------------------
    def walk(self, m: nn.Module, path: str) -> dict[str, Any]:
        """Describe module ``m`` at ``path`` (children recursively; attributes filled in later)."""
        self.module_paths[id(m)] = path
        self.keepalive.append(m)
        cls = type(m)
        where = f"module {path or '<root>'!r} ({cls.__qualname__})"
        if "<locals>" in cls.__qualname__:
            raise TypeError(f"{where}: class {cls.__module__}:{cls.__qualname__} is defined inside a function; "
                            "define it at module level")
        try:
            spec = ref_name(cls, where)
        except TypeError:
            hint = ""
            params = getattr(m, "parametrizations", None)
            if isinstance(params, nn.ModuleDict) and len(params):
                names = ", ".join(repr(k) for k in params)
                hint = (f"; it is parametrized ({names}: e.g. weight_norm): bake the parametrization in with "
                        f"torch.nn.utils.parametrize.remove_parametrizations(module, name) before saving")
            raise TypeError(
                f"{where}: class {cls.__module__}:{cls.__qualname__} does not import back to the same class "
                "(dynamically created classes, e.g. from torch.nn.utils.parametrize, cannot be saved)" + hint
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
            "class": spec,
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
        skip = transient_attrs(m)
        where = f"module {path or '<root>'!r} ({type(m).__qualname__})"
        for k, v in m.__dict__.items():
            if k in _MODULE_INTERNALS or k == "training" or k == "_compiled_call_impl" or k in skip:
                continue
            if _class_method_named(type(m), k):
                raise TypeError(f"{where} attribute {k!r}: replaces the method {k!r} of the class; a saved model "
                                "cannot carry code (remove the monkey-patch before saving)")
            self.attr_key = prefix + k
            attrs[k] = self.encode(v, f"{where} attribute {k!r}")
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


def _first_non_plain(v: Any) -> str | None:
    """Description of the first non-plain-data tag inside an encoded value (None if all plain)."""
    if isinstance(v, list):
        for x in v:
            r = _first_non_plain(x)
            if r is not None:
                return r
    elif isinstance(v, dict):
        tags = [k for k in v if isinstance(k, str) and k.startswith("$")]
        if tags and tags[0] not in _PLAIN_TAGS:
            return f"a {tags[0][1:]} value"
        for x in v.values():
            r = _first_non_plain(x)
            if r is not None:
                return r
    return None


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


def file_digest(path: Path, algorithm: str = "sha256") -> str:
    """Streaming hex digest of a file (SHA-256 for our saves; MD5 where a publisher lists MD5 sums)."""
    h = hashlib.new(algorithm)
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def structure_checksum(structure: dict[str, Any]) -> str:
    """SHA-256 of a structure's canonical JSON (sorted keys, no spaces), without its own ``checksum`` field.

    The structure records the weights file's SHA-256, so this one value covers structure and weights.
    """
    body = {k: v for k, v in structure.items() if k != "checksum"}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
    return hashlib.sha256(text.encode("ascii")).hexdigest()


def _is_legacy_save(path: Path) -> bool:
    """A directory an older dmscale saved (no marker): structure.json declaring the dmscale format."""
    try:
        data = json.loads(read_regular_file(path / STRUCTURE_FILE, what="structure", max_bytes=MAX_STRUCTURE_BYTES))
    except (OSError, ValueError, RecursionError):
        return False
    return isinstance(data, dict) and data.get("format") == FORMAT_NAME


def save(model: nn.Module, path: str | os.PathLike[str], meta: dict[str, Any] | None = None) -> Path:
    """Save ``model`` (module tree + weights) to directory ``path`` atomically so it loads without its constructor.

    Raises ``TypeError`` naming the module and attribute if anything cannot be represented.
    ``path`` may be new, an empty directory, or an earlier save (marked by dmscale) that holds only
    dmscale's files; anything else -- a directory with the user's own files, a file, a symlink, a
    FIFO -- is refused with :class:`~dmscale.serialization.errors.ForeignDirectoryError` and left
    untouched. A crash leaves the complete old or the complete new model.
    """
    from safetensors.torch import save as st_save

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
    blob = st_save(tensors, metadata={"format": "pt", "dmscale_format": FORMAT_NAME})
    structure: dict[str, Any] = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "dmscale_version": _dmscale_version(),
        "torch_version": torch.__version__,
        "root_class": tree["class"],
        "num_parameters": sum(
            t.numel() for k, t in saver.tensors.items() if saver.tensor_table[k]["kind"] == "parameter"
        ),
        "weights": {"file": WEIGHTS_FILE, "sha256": sha256_bytes(blob), "bytes": len(blob)},
        "tensors": saver.tensor_table,
        "objects": saver.objects,
        "module": tree,
        "meta": meta if meta is not None else {},
    }
    if saver.objects and "transformers" in sys.modules:
        structure["transformers_version"] = getattr(sys.modules["transformers"], "__version__", "unknown")
    structure["checksum"] = {"sha256": structure_checksum(structure)}
    text = json.dumps(structure, indent=1, allow_nan=False) + "\n"

    with atomic_directory(path, "model", MODEL_ENTRIES, legacy=_is_legacy_save) as tmp:
        with open(tmp / WEIGHTS_FILE, "wb") as fh:
            fh.write(blob)
        (tmp / STRUCTURE_FILE).write_text(text, "utf-8")
    return Path(path)


# --------------------------------------------------------------------------------------------------
# Load
# --------------------------------------------------------------------------------------------------


def _structure_file(path: str | os.PathLike[str]) -> Path:
    p = Path(path)
    return p / STRUCTURE_FILE if p.is_dir() or not p.suffix else p


def read_structure(path: str | os.PathLike[str], *, verify: bool = True) -> dict[str, Any]:
    """Parse and validate ``structure.json`` of a saved model (``path`` is the directory or the JSON file).

    With ``verify`` (default) the structure's own checksum must match (format 2). Raises
    :class:`~dmscale.LoadError` (``ModelNotFoundError`` if the file is missing).
    """
    file = _structure_file(path)
    raw = read_regular_file(file, what="structure file", max_bytes=MAX_STRUCTURE_BYTES, exc=LoadError,
                            missing=ModelNotFoundError)
    try:
        data = strict_json_loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise LoadError(f"{str(file)!r} is not valid JSON: {str(exc)[:200]}") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT_NAME:
        got = data.get("format") if isinstance(data, dict) else type(data).__name__
        raise LoadError(f"{str(file)!r} is not a dmscale model structure (format {got!r:.60}, expected {FORMAT_NAME!r})")
    version = data.get("format_version")
    if type(version) is not int or version not in (1, FORMAT_VERSION):
        raise LoadError(
            f"{str(file)!r} has unsupported format_version {version!r:.40}; this dmscale "
            f"({_dmscale_version()}) reads versions 1 and {FORMAT_VERSION}. Upgrade dmscale to load it."
        )
    for key, typ in (("module", dict), ("tensors", dict), ("weights", dict), ("objects", list)):
        if not isinstance(data.get(key), typ):
            raise LoadError(f"{str(file)!r}: missing or invalid {key!r} section")
    if verify:
        if version < 2:
            raise LoadError(f"{str(file)!r} was written by an older dmscale (format 1) and has no structure checksum; "
                            "load it with verify=False if you trust it, then save it again")
        ck = data.get("checksum")
        want = ck.get("sha256") if isinstance(ck, dict) else None
        try:
            have = structure_checksum(data)
        except (ValueError, TypeError, RecursionError) as exc:
            raise LoadError(f"{str(file)!r}: cannot checksum the structure: {exc}") from None
        if have != want:
            raise LoadError(f"{str(file)!r} was modified or is corrupted: its SHA-256 checksum {have} does not match "
                            f"the {want!r:.70} recorded in it (the structure is checksummed together with the weights)")
    return data


def _load_weights(directory: Path, structure: dict[str, Any], device: str | torch.device,
                  verify: bool) -> dict[str, torch.Tensor]:
    """Read the weights file once, check its size and SHA-256, parse it, check every tensor against the structure."""
    info = structure["weights"]
    name = info.get("file")
    if not isinstance(name, str) or "/" in name or "\\" in name or name in ("", ".", "..") or "\x00" in name:
        raise LoadError(f"invalid weights file name {name!r:.80} in structure.json")
    wpath = directory / name
    buf = read_regular_file(wpath, what="weights file", exc=LoadError, missing=ModelNotFoundError)
    size = len(buf)
    expected_size = info.get("bytes")
    if type(expected_size) is int and size != expected_size:
        kind = "truncated" if size < expected_size else "has extra bytes"
        raise LoadError(f"weights file {str(wpath)!r} is {kind}: {size} bytes, expected {expected_size}")
    if verify:
        digest = sha256_bytes(buf)
        if digest != info.get("sha256"):
            raise LoadError(
                f"weights file {str(wpath)!r} is corrupted or was modified: SHA-256 {digest} "
                f"does not match {info.get('sha256')!r:.70} recorded in structure.json"
            )
    loaded = parse_safetensors(buf, where=f"weights file {str(wpath)!r}", device=device)
    del buf

    table: dict[str, Any] = structure["tensors"]
    missing = sorted(set(table) - set(loaded))
    extra = sorted(set(loaded) - set(table))
    if missing or extra:
        raise LoadError(
            f"weights file {str(wpath)!r} does not match structure.json: missing tensors {missing[:5]}, "
            f"unexpected tensors {extra[:5]}"
        )
    for key, entry in table.items():
        t = loaded[key]
        if not isinstance(entry, dict):
            raise LoadError(f"structure.json: invalid entry for tensor {key!r}")
        shape = entry.get("shape")
        if not isinstance(shape, list) or list(t.shape) != shape:
            raise LoadError(
                f"tensor {key!r}: structure.json says shape {shape!r:.80} but {name} holds shape {list(t.shape)}"
            )
        dtype = _dtype_from_name(entry.get("dtype"), f"structure.json: tensor {key!r}")
        if t.dtype != dtype:
            raise LoadError(f"tensor {key!r}: structure.json says dtype {dtype} but {name} holds {t.dtype}")
        if entry.get("kind", "tensor") not in ("parameter", "tensor") or type(entry.get("requires_grad", False)) is not bool:
            raise LoadError(f"structure.json: tensor {key!r}: invalid kind/requires_grad")
        if entry.get("requires_grad") and not (t.is_floating_point() or t.is_complex()):
            raise LoadError(f"structure.json: tensor {key!r}: requires_grad on a {t.dtype} tensor")
    return loaded


def _check_name(name: Any, where: str, what: str) -> str:
    if not isinstance(name, str) or not name or "." in name or (name.startswith("__") and name.endswith("__")):
        raise LoadError(f"{where}: invalid {what} name {name!r:.80}")
    return name


class _Loader:
    """Rebuilds the module tree from a validated structure and loaded tensors, under an :class:`Allowlist`."""

    def __init__(self, structure: dict[str, Any], tensors: dict[str, torch.Tensor],
                 allow: Allowlist | None = None, file: str = "structure.json") -> None:
        self.structure = structure
        self.raw = tensors
        self.allow = allow if allow is not None else Allowlist()
        self.file = file
        self.tensors: dict[str, torch.Tensor] = {}
        self.modules: dict[str, nn.Module] = {}
        self.objects: dict[int, Any] = {}
        self.building: set[int] = set()

    def tensor(self, key: Any, where: str) -> torch.Tensor:
        """The (single, shared) tensor object for ``key``."""
        if not isinstance(key, str) or key not in self.raw:
            raise LoadError(f"{where}: unknown tensor key {key!r:.80}")
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
        where = f"{self.file}: module {path or '<root>'!r}"
        if not isinstance(node, dict):
            raise LoadError(f"{where}: invalid module entry")
        cls = self.allow.module_class(node.get("class"), where)
        m = cls.__new__(cls)
        nn.Module.__init__(m)
        self.modules[path] = m
        prefix = f"{path}." if path else ""
        params, buffers, children = (node.get(k) or {} for k in ("parameters", "buffers", "children"))
        for section, val in (("parameters", params), ("buffers", buffers), ("children", children)):
            if not isinstance(val, dict):
                raise LoadError(f"{where}: {section!r} must be an object")
        seen: set[str] = set()
        for name, key in params.items():
            _check_name(name, where, "parameter")
            seen.add(name)
            if key is None:
                m._parameters[name] = None
                continue
            p = self.tensor(key, f"{where} parameter {name!r}")
            if not isinstance(p, nn.Parameter):
                raise LoadError(f"{where}: parameter {name!r} refers to non-parameter tensor {key!r}")
            m._parameters[name] = p
        for name, entry in buffers.items():
            _check_name(name, where, "buffer")
            if name in seen:
                raise LoadError(f"{where}: {name!r} is both a parameter and a buffer")
            seen.add(name)
            if entry is None:
                m._buffers[name] = None
                continue
            if not isinstance(entry, dict) or type(entry.get("persistent", True)) is not bool:
                raise LoadError(f"{where}: invalid buffer entry {name!r}")
            m._buffers[name] = self.tensor(entry.get("key"), f"{where} buffer {name!r}")
            if not entry.get("persistent", True):
                m._non_persistent_buffers_set.add(name)
        for name, child in children.items():
            _check_name(name, where, "child module")
            if name in seen:
                raise LoadError(f"{where}: {name!r} is both a tensor and a child module")
            seen.add(name)
            if child is None:
                m._modules[name] = None
            elif isinstance(child, dict) and "alias" in child:
                target = child["alias"]
                if not isinstance(target, str) or target not in self.modules:
                    raise LoadError(f"{where}: child {name!r} aliases unknown module path {target!r:.80}")
                if target == "" or target == path or path.startswith(target + "."):
                    raise LoadError(f"{where}: child {name!r} aliases its own ancestor {target or '<root>'!r} (a cycle)")
                m._modules[name] = self.modules[target]
            else:
                m._modules[name] = self.build(child, prefix + name)
        return m

    def restore_attributes(self, node: dict[str, Any], path: str) -> None:
        """Set ``__dict__`` attributes and training flags on every module (after all modules exist)."""
        m = self.modules[path]
        where = f"{self.file}: module {path or '<root>'!r}"
        attrs = node.get("attributes") or {}
        if not isinstance(attrs, dict):
            raise LoadError(f"{where}: invalid attributes")
        taken = set(m._parameters) | set(m._buffers) | set(m._modules)
        skip = transient_attrs(m)
        for k, v in attrs.items():
            if k in _MODULE_INTERNALS or k == "training" or k in skip or (k.startswith("__") and k.endswith("__")):
                raise LoadError(f"{where}: attribute {k!r:.80} is reserved")
            if k in taken:
                raise LoadError(f"{where}: attribute {k!r} shadows a parameter, buffer or child module")
            if _class_method_named(type(m), k):
                raise LoadError(f"{where}: attribute {k!r} would replace the method {type(m).__name__}.{k}; "
                                "a saved model cannot carry code")
            m.__dict__[k] = self.decode(v, f"{where} attribute {k!r}")
        training = node.get("training", False)
        if type(training) is not bool:
            raise LoadError(f"{where}: 'training' must be true or false")
        m.__dict__["training"] = training
        prefix = f"{path}." if path else ""
        for name, child in (node.get("children") or {}).items():
            if isinstance(child, dict) and "alias" not in child:
                self.restore_attributes(child, prefix + name)

    def _tag_value(self, v: dict[str, Any], tag: str, where: str, extra: tuple[str, ...] = ()) -> Any:
        if set(v) != {tag, *extra}:
            raise LoadError(f"{where}: malformed {tag} value: keys {sorted(v)[:6]} (expected {[tag, *extra]})")
        return v[tag]

    def _list(self, val: Any, tag: str, where: str) -> list[Any]:
        if not isinstance(val, list):
            raise LoadError(f"{where}: malformed {tag} value: expected a list, got {type(val).__name__}")
        return val

    def decode(self, v: Any, where: str) -> Any:
        """Inverse of ``_Saver.encode``; every tag and payload is checked, anything else is a :class:`LoadError`."""
        if v is None or isinstance(v, (bool, int, float, str)):
            return v
        if isinstance(v, list):
            return [self.decode(x, where) for x in v]
        if not isinstance(v, dict):  # pragma: no cover - JSON has no other types
            raise LoadError(f"{where}: invalid value {v!r:.80}")
        tags = [k for k in v if k.startswith("$")]
        if not tags:
            return {k: self.decode(x, where) for k, x in v.items()}
        tag = tags[0]
        if tag == "$enum":
            val = self._tag_value(v, tag, where, ("member",))
        else:
            val = self._tag_value(v, tag, where)
        if tag == "$tuple":
            return tuple(self.decode(x, where) for x in self._list(val, tag, where))
        if tag in ("$set", "$frozenset"):
            items = [self.decode(x, where) for x in self._list(val, tag, where)]
            try:
                return set(items) if tag == "$set" else frozenset(items)
            except TypeError:
                raise LoadError(f"{where}: malformed {tag} value: unhashable item") from None
        if tag in ("$dict", "$odict"):
            pairs = []
            for pair in self._list(val, tag, where):
                if not (isinstance(pair, list) and len(pair) == 2):
                    raise LoadError(f"{where}: malformed {tag} value: expected [key, value] pairs")
                pairs.append((self.decode(pair[0], where), self.decode(pair[1], where)))
            try:
                if tag == "$dict":
                    return dict(pairs)
                from collections import OrderedDict

                return OrderedDict(pairs)
            except TypeError:
                raise LoadError(f"{where}: malformed {tag} value: unhashable key") from None
        if tag == "$float":
            if val not in ("nan", "inf", "-inf"):
                raise LoadError(f"{where}: invalid $float {val!r:.40}")
            return float(val)
        if tag == "$dtype":
            return _dtype_from_name(val, where)
        if tag == "$size":
            if not (isinstance(val, list) and all(type(x) is int and x >= 0 for x in val)):
                raise LoadError(f"{where}: malformed $size value {val!r:.80}")
            return torch.Size(val)
        if tag == "$device":
            if not isinstance(val, str):
                raise LoadError(f"{where}: malformed $device value {val!r:.80}")
            try:
                return torch.device(val)
            except (RuntimeError, ValueError):
                raise LoadError(f"{where}: invalid device {val!r:.80}") from None
        if tag == "$module":
            if not isinstance(val, str) or val not in self.modules:
                raise LoadError(f"{where}: refers to unknown module path {val!r:.80}")
            return self.modules[val]
        if tag == "$tensor":
            return self.tensor(val, where)
        if tag == "$object":
            return self.object(val, where)
        if tag == "$ref":
            return self.allow.function(val, where)
        if tag == "$partial":
            return self.partial(val, where)
        if tag == "$enum":
            cls = self.allow.enum_class(val, where)
            member = v.get("member")
            if not isinstance(member, str) or member not in cls.__members__:
                raise LoadError(f"{where}: {val!r} has no member {member!r:.60}")
            return cls[member]
        raise LoadError(f"{where}: unknown value tag {tag!r:.40} (written by a newer dmscale?)")

    def partial(self, val: Any, where: str) -> functools.partial:
        """``functools.partial`` of an allowlisted function with plain-data arguments."""
        if not (isinstance(val, dict) and set(val) == {"func", "args", "keywords"}):
            raise LoadError(f"{where}: malformed $partial value (expected func, args, keywords)")
        fn = self.allow.function(val["func"], where)
        args, kw = val["args"], val["keywords"]
        if not isinstance(args, list) or not isinstance(kw, dict):
            raise LoadError(f"{where}: malformed $partial value (args must be a list, keywords an object)")
        bad = _first_non_plain([args, kw])
        if bad is not None:
            raise LoadError(f"{where}: $partial arguments must be plain data, not {bad}")
        kw = self.decode(kw, where)
        if not (isinstance(kw, dict) and all(isinstance(k, str) for k in kw)):
            raise LoadError(f"{where}: malformed $partial value (keywords must map names to values)")
        return functools.partial(fn, *self.decode(args, where), **kw)

    def object(self, idx: Any, where: str) -> Any:
        """Rebuild (once) a shared Hugging Face config from ``objects[idx]``."""
        objs = self.structure["objects"]
        if type(idx) is not int or not 0 <= idx < len(objs):
            raise LoadError(f"{where}: invalid object index {idx!r:.40}")
        if idx in self.objects:
            return self.objects[idx]
        if idx in self.building:
            raise LoadError(f"{where}: object {idx} contains itself")
        entry = objs[idx]
        if not isinstance(entry, dict) or entry.get("kind") != "hf_config":
            raise LoadError(f"{where}: object {idx} is not a Hugging Face config entry")
        bases = _hf_config_bases()
        if not bases and isinstance(entry.get("class"), str) and entry["class"].startswith("transformers."):
            self.allow.import_module("transformers", where)  # allowlisted; never from inside the directory
            bases = _hf_config_bases()
        cls = self.allow.config_class(entry.get("class"), where, bases)
        self.building.add(idx)
        try:
            data = self.decode(entry.get("data"), where)
            if not isinstance(data, dict):
                raise LoadError(f"{where}: object {idx}: config data must be an object")
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    cfg = cls.from_dict(data)
            except Exception as exc:  # the config class validates its data (HF raises many exception types)
                raise LoadError(f"{where}: object {idx} ({cls.__name__}): the config data is invalid: "
                                f"{type(exc).__name__}: {str(exc)[:200]}") from None
            private = entry.get("private") or {}
            if not isinstance(private, dict):
                raise LoadError(f"{where}: object {idx}: 'private' must be an object")
            for k, x in private.items():
                if not (k.startswith("_") and not k.startswith("__")):
                    raise LoadError(f"{where}: object {idx}: private attribute {k!r:.60} must start with one '_'")
                if _class_method_named(type(cfg), k):
                    raise LoadError(f"{where}: object {idx}: attribute {k!r} would replace a method")
                cfg.__dict__[k] = self.decode(x, f"{where}.{k}")
            for k, x in vars(cfg).items():  # e.g. _attn_implementation_internal
                if "implementation" in k and x is not None and not (isinstance(x, str) and _IMPL_NAME.match(x)):
                    raise LoadError(f"{where}: object {idx} ({cls.__name__}): {k}={x!r:.80} is not a built-in "
                                    "implementation name (a Hub kernel repository would download code)")
        finally:
            self.building.discard(idx)
        self.objects[idx] = cfg
        return cfg


def _model_dir(path: str | os.PathLike[str]) -> Path:
    directory = Path(path)
    if not directory.exists():
        hint = ""
        if directory.parent.is_dir():
            leftovers = sorted(directory.parent.glob(f".{directory.name}.old-*"))
            if leftovers:
                hint = f"; an interrupted save left the previous version at {str(leftovers[-1])!r}"
        raise ModelNotFoundError(f"no saved dmscale model at {str(directory)!r}{hint}")
    if not directory.is_dir():
        directory = directory.parent
    return directory


def load(path: str | os.PathLike[str], *, device: str | torch.device = "cpu", verify: bool = True,
         trust: list[str] | tuple[str, ...] | str | None = None) -> nn.Module:
    """Rebuild a model saved by :func:`save` (same classes, sizes, weights, ties, training flag) without its constructor.

    Loading never runs code chosen by the files: classes only from ``torch.nn``, ``transformers.models``
    (and HF activations / ``Conv1D``), ``dmscale``, plus the module prefixes in ``trust`` (e.g.
    ``trust=["mypkg.models"]`` for your own layers); functions only from an explicit allowlist; size
    attributes re-derived from the weights. Tensors are fresh copies, so the loaded model computes
    bit-identically to the saved one.

    ``verify`` checks the SHA-256 of the structure and of the weights (needed for format 1 files,
    which have no structure checksum, to be loaded at all with ``verify=False``).

    Raises :class:`dmscale.LoadError` for every refused or broken directory (``ModelNotFoundError``,
    also a ``FileNotFoundError``, if nothing is there).
    """
    directory = _model_dir(path)
    allow = Allowlist(trust, directory=directory)
    try:
        return _load(directory, torch.device(device), verify, allow)
    except LoadError:
        raise
    except MemoryError:
        raise
    except Exception as exc:  # a crafted file must never surface as another exception type
        raise LoadError(f"{str(directory)!r}: cannot load this model: {type(exc).__name__}: {str(exc)[:300]}") from exc


def _load(directory: Path, device: torch.device, verify: bool, allow: Allowlist) -> nn.Module:
    structure = read_structure(directory, verify=verify)
    tensors = _load_weights(directory, structure, device, verify)
    loader = _Loader(structure, tensors, allow, file=str(directory / STRUCTURE_FILE))
    root = loader.build(structure["module"], "")
    loader.restore_attributes(structure["module"], "")
    for m in loader.modules.values():
        rebuild_transient(m)
    unused = set(tensors) - set(loader.tensors)
    if unused:
        raise LoadError(f"structure.json lists tensors no module uses: {sorted(unused)[:5]}")
    n = sum(p.numel() for p in {id(p): p for p in root.parameters()}.values())
    expected = structure.get("num_parameters")
    if expected is not None and (type(expected) is not int or expected != n):
        raise LoadError(f"structure.json says num_parameters={expected!r:.40} but the weights hold {n} parameters")
    check_sizes(root, str(directory / STRUCTURE_FILE))
    return root
