"""The weights file: safetensors written by the ``safetensors`` package, read back by a strict parser.

Reading loads the file's bytes once (a regular file only), checks their SHA-256 against
``structure.json`` and parses exactly those bytes, so the bytes checked are the bytes used (no
re-open between the check and the parse). Every tensor is then copied into memory that torch
allocated itself (64-byte aligned, owned, contiguous), never left as a view of the file: tensors
memory-mapped at the file's unaligned offsets may take other kernel paths than freshly allocated
ones (reported to shift outputs by about 1e-9), while a copy is indistinguishable from the tensor
that was saved.
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
from typing import Any

import torch

from dmscale.serialization.errors import LoadError

__all__ = ["DTYPES", "parse_safetensors", "sha256_bytes", "strict_json_loads"]

_MAX_HEADER = 100 * 1024 * 1024

DTYPES: dict[str, torch.dtype] = {
    name: getattr(torch, attr)
    for name, attr in (("F64", "float64"), ("F32", "float32"), ("F16", "float16"), ("BF16", "bfloat16"),
                       ("I64", "int64"), ("I32", "int32"), ("I16", "int16"), ("I8", "int8"), ("U8", "uint8"),
                       ("BOOL", "bool"), ("U16", "uint16"), ("U32", "uint32"), ("U64", "uint64"),
                       ("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2"),
                       ("F8_E4M3FNUZ", "float8_e4m3fnuz"), ("F8_E5M2FNUZ", "float8_e5m2fnuz"), ("C64", "complex64"))
    if isinstance(getattr(torch, attr, None), torch.dtype)
}


def sha256_bytes(data: bytes | bytearray | memoryview) -> str:
    """Hex SHA-256 of a buffer."""
    return hashlib.sha256(data).hexdigest()


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _finite_float(text: str) -> float:
    v = float(text)
    if not math.isfinite(v):
        raise ValueError(f"number {text} is out of range")
    return v


def strict_json_loads(text: str) -> Any:
    """``json.loads`` that refuses ``NaN``/``Infinity`` literals and numbers that overflow to infinity."""
    return json.loads(text, parse_constant=_refuse_constant, parse_float=_finite_float)


def parse_safetensors(buf: bytearray, *, where: str, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Parse a safetensors file held in ``buf``; every tensor is a fresh, owned copy on ``device``.

    Raises :class:`LoadError` naming ``where`` for any malformed header, dtype, shape or offset
    (overlapping, out of range, holes, sizes that do not match the shape).
    """
    if len(buf) < 8:
        raise LoadError(f"{where}: truncated safetensors file ({len(buf)} bytes, no header)")
    n = int.from_bytes(buf[:8], "little")
    if n > len(buf) - 8 or n > _MAX_HEADER:
        raise LoadError(f"{where}: invalid safetensors header length {n} (file has {len(buf)} bytes)")
    try:
        header = strict_json_loads(bytes(buf[8:8 + n]).decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise LoadError(f"{where}: safetensors header is not valid JSON: {exc}") from None
    if not isinstance(header, dict):
        raise LoadError(f"{where}: safetensors header is not a JSON object")
    meta = header.pop("__metadata__", None)
    if meta is not None and not (isinstance(meta, dict) and all(isinstance(v, str) for v in meta.values())):
        raise LoadError(f"{where}: safetensors __metadata__ must map strings to strings")
    start = 8 + n
    data_len = len(buf) - start
    spans: list[tuple[int, int, str]] = []
    plan: list[tuple[str, torch.dtype, list[int], int, int]] = []
    for key, info in header.items():
        if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
            raise LoadError(f"{where}: tensor {key!r}: entry must have exactly dtype, shape and data_offsets")
        dt = DTYPES.get(info["dtype"]) if isinstance(info["dtype"], str) else None
        if dt is None:
            raise LoadError(f"{where}: tensor {key!r}: unsupported dtype {info['dtype']!r}")
        shape, offs = info["shape"], info["data_offsets"]
        if not (isinstance(shape, list) and all(type(s) is int and s >= 0 for s in shape)):
            raise LoadError(f"{where}: tensor {key!r}: invalid shape {shape!r:.80}")
        if not (isinstance(offs, list) and len(offs) == 2 and all(type(o) is int for o in offs)
                and 0 <= offs[0] <= offs[1] <= data_len):
            raise LoadError(f"{where}: tensor {key!r}: data_offsets {offs!r:.80} outside the data ({data_len} bytes)")
        numel = math.prod(shape)
        itemsize = torch.empty((), dtype=dt).element_size()
        if (offs[1] - offs[0]) != numel * itemsize:
            raise LoadError(f"{where}: tensor {key!r}: {offs[1] - offs[0]} bytes do not hold shape {shape} of {dt}")
        spans.append((offs[0], offs[1], key))
        plan.append((key, dt, shape, offs[0], numel))
    spans.sort()
    pos = 0
    for b, e, key in spans:
        if b != pos:
            what = "overlaps the previous tensor" if b < pos else "leaves a gap before it"
            raise LoadError(f"{where}: tensor {key!r} {what} (offset {b}, expected {pos})")
        pos = e
    if pos != data_len:
        raise LoadError(f"{where}: {data_len - pos} bytes after the last tensor are not described by the header")
    out: dict[str, torch.Tensor] = {}
    for key, dt, shape, b, numel in plan:
        if numel == 0:
            t = torch.empty(shape, dtype=dt)
        else:
            t = torch.frombuffer(buf, dtype=dt, count=numel, offset=start + b).reshape(shape)
            if sys.byteorder == "big":  # pragma: no cover - safetensors is little-endian
                t = torch.from_numpy(t.numpy().byteswap(inplace=False))
            if dt == torch.bool and bool((t.view(torch.uint8) > 1).any()):
                raise LoadError(f"{where}: tensor {key!r}: bool tensor holds bytes other than 0 and 1")
        # a fresh allocation (64-byte aligned by torch's allocator), never a view of the file buffer
        out[key] = t.to(device=device, copy=True)
    return out
