"""Checkpoints of a sharded (FSDP2) search with ``torch.distributed.checkpoint``, loaded without running code.

``save_sharded_checkpoint(path, model, optimizer, dms)`` writes one directory that every rank
contributes its shards to (``__<rank>_0.distcp``), plus DCP's ``.metadata`` and ``dms.json``
(the search's step, schedule flags and counters; its ratios and importance are tensors in the
shards). The directory is written next to ``path`` under a temporary name and swapped in when
complete, so a crash leaves the previous checkpoint intact; only a directory dmscale created
(marker ``sharded-checkpoint``) is ever replaced. ``path`` must be on a filesystem all ranks see.

``load_sharded_checkpoint`` is collective too. It reads DCP's pickled ``.metadata`` with an
unpickler that only builds DCP's own metadata classes (a file naming anything else is refused
before anything is built), loads non-tensor values with ``torch.load(weights_only=True)``, and
checks the search's group list before any tensor is loaded. Both work without a process group.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import pickle
import re
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
import torch.nn as nn

from dmscale.serialization.atomic import read_json_file, read_regular_file
from dmscale.serialization.checkpoint import CheckpointError
from dmscale.serialization.dirs import atomic_directory, dir_kind

if TYPE_CHECKING:
    from dmscale.search import DMS

__all__ = ["save_sharded_checkpoint", "load_sharded_checkpoint", "KIND"]

KIND = "sharded-checkpoint"
_DMS_FILE = "dms.json"
_METADATA = ".metadata"
_SHARD = re.compile(r"^__\d+_\d+\.distcp$")

# what DCP's .metadata pickle may build: its own dataclasses, torch sizes / dtypes / layouts, paths
_ALLOWED = {
    ("torch.distributed.checkpoint.metadata", n) for n in (
        "Metadata", "MetadataIndex", "StorageMeta", "TensorProperties", "TensorStorageMetadata",
        "ChunkStorageMetadata", "BytesStorageMetadata", "_MEM_FORMAT_ENCODING")
} | {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("pathlib", "PosixPath"), ("pathlib", "WindowsPath"), ("pathlib", "PurePosixPath"),
    ("pathlib", "PureWindowsPath"), ("pathlib", "Path"),
    ("collections", "OrderedDict"),
}


class _MetadataUnpickler(pickle.Unpickler):
    """Builds DCP metadata only: any other global (a function to call, a class to run) is refused."""

    def find_class(self, module: str, name: str) -> Any:  # noqa: D102
        if (module, name) in _ALLOWED:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"refused to load '{module}.{name}': not part of a checkpoint's metadata")


def _read_metadata(p: Path) -> Any:
    """DCP's ``.metadata`` through :class:`_MetadataUnpickler` (raises CheckpointError naming the file)."""
    from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

    raw = read_regular_file(p, what="checkpoint metadata", exc=CheckpointError)
    try:
        md = _MetadataUnpickler(io.BytesIO(bytes(raw))).load()
    except Exception as exc:
        raise CheckpointError(f"checkpoint metadata {str(p)!r} is corrupted or not a dmscale sharded "
                              f"checkpoint: {type(exc).__name__}: {str(exc)[:300]}") from exc
    if not isinstance(md, Metadata):
        raise CheckpointError(f"checkpoint metadata {str(p)!r} does not hold DCP metadata")
    if getattr(md, "storage_meta", None) is None:
        md.storage_meta = StorageMeta()
    return md


def _reader_classes() -> tuple[type, type]:
    """A FileSystemReader whose metadata is read safely and a planner that never unpickles code."""
    from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader

    class SafeReader(FileSystemReader):
        def read_metadata(self, *args: Any, **kwargs: Any) -> Any:  # noqa: D102
            rank = kwargs.get("rank")
            md = _read_metadata(Path(self.path) / (_METADATA if rank is None else f"__{rank}{_METADATA}"))
            md.storage_meta.load_id = self.load_id
            return md

    class SafePlanner(DefaultLoadPlanner):
        def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:  # noqa: D102
            obj = torch.load(value, weights_only=True)  # DCP itself uses weights_only=False here
            if self.flatten_state_dict:
                from torch.distributed.checkpoint._traverse import set_element  # as DCP's own planner

                set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
            else:
                self.state_dict[read_item.dest_index.fqn] = obj

    return SafeReader, SafePlanner


def _initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def _rank_world() -> tuple[int, int]:
    if _initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _barrier() -> None:
    if _initialized():
        dist.barrier()


def _container(model: nn.Module, dms: "DMS | None") -> nn.Module:
    """One module holding the model and the search space, so one optimizer over both maps to names."""
    mods: dict[str, nn.Module] = {"model": model}
    if dms is not None:
        mods["dms"] = dms.space
    return nn.ModuleDict(mods)


def _state(model: nn.Module, optimizer: torch.optim.Optimizer | None, dms: "DMS | None",
           rank_state: dict[str, torch.Tensor] | None) -> tuple[nn.Module, dict[str, Any]]:
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

    box = _container(model, dms)
    if optimizer is not None:
        msd, osd = get_state_dict(box, optimizer)
        state: dict[str, Any] = {"model": msd, "optim": osd}
    else:
        state = {"model": get_model_state_dict(box)}
    rank, _ = _rank_world()
    if rank_state:
        state[f"rank{rank}"] = dict(rank_state)
    return box, state


def _dms_meta(dms: "DMS") -> dict[str, Any]:
    meta = {k: v for k, v in dms.state_dict().items() if k != "space"}
    json.dumps(meta)  # only plain values: fails here (not half-way through a save) otherwise
    return meta


def save_sharded_checkpoint(path: str | os.PathLike[str], model: nn.Module,
                            optimizer: torch.optim.Optimizer | None = None, dms: "DMS | None" = None, *,
                            extra: dict[str, Any] | None = None,
                            rank_state: dict[str, torch.Tensor] | None = None) -> Path:
    """Write model (sharded), optimizer, DMS state, JSON ``extra`` and per-rank tensors (e.g. RNG) to ``path``.

    Collective: every rank calls it with its own shards (``rank_state`` is this rank's own,
    e.g. ``{"rng": torch.get_rng_state()}``). Build the optimizer over ``dms.weight_parameters()``
    and ``dms.structure_parameters()`` (one optimizer; both groups are saved).
    """
    import torch.distributed.checkpoint as dcp

    target = Path(path).absolute()
    rank, world = _rank_world()
    _, state = _state(model, optimizer, dms, rank_state)
    meta = {"format": 1, "world_size": world, "extra": extra or {}, "dms": _dms_meta(dms) if dms is not None else None}
    text = json.dumps(meta)
    with contextlib.ExitStack() as stack:
        tmp, failed = None, None
        if rank == 0:
            try:
                old = [n for n in os.listdir(target) if _SHARD.match(n)] if target.is_dir() else []
                names = {_METADATA, _DMS_FILE, *old, *(f"__{r}_0.distcp" for r in range(world))}
                tmp = stack.enter_context(atomic_directory(target, KIND, names))
            except Exception as exc:
                failed = exc
        if world > 1:  # every rank learns the temp dir (or that rank 0 could not make one)
            box = [str(tmp) if tmp is not None else None]
            dist.broadcast_object_list(box, src=0)
            if box[0] is None:
                if failed is not None:
                    raise failed
                raise CheckpointError(f"rank 0 could not create the sharded checkpoint {str(target)!r} (see its error)")
            tmp = Path(box[0])
        if failed is not None:
            raise failed
        assert tmp is not None
        writer = dcp.FileSystemWriter(str(tmp), single_file_per_rank=True, thread_count=1)
        with warnings.catch_warnings():  # without a process group DCP warns that it saves from one process
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.save(state, storage_writer=writer, no_dist=not _initialized())
        _barrier()
        if rank == 0:
            (tmp / _DMS_FILE).write_text(text)
    _barrier()  # the swap is done before anyone goes on (and may load it)
    return target


def load_sharded_checkpoint(path: str | os.PathLike[str], model: nn.Module,
                            optimizer: torch.optim.Optimizer | None = None, dms: "DMS | None" = None, *,
                            rank_state: dict[str, torch.Tensor] | None = None) -> dict[str, Any]:
    """Load what :func:`save_sharded_checkpoint` wrote into the (sharded) model, optimizer and DMS.

    Collective. ``rank_state``: tensors shaped like the ones saved (e.g. ``{"rng":
    torch.get_rng_state()}``), filled in place with this rank's saved values. Returns
    ``{"extra": ..., "rank_state": ..., "world_size": ...}``. A directory dmscale did not write, a
    checkpoint of another search (different groups) or a tampered metadata file raises
    :class:`~dmscale.serialization.CheckpointError` naming the path.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_state_dict

    p = Path(path)
    if not p.is_dir():
        raise FileNotFoundError(f"sharded checkpoint not found: {p}")
    if dir_kind(p) != KIND:
        raise CheckpointError(f"{str(p)!r} is not a dmscale sharded checkpoint (no '{KIND}' marker)")
    meta = read_json_file(p / _DMS_FILE, what="sharded checkpoint", exc=CheckpointError)
    saved = meta.get("dms")
    if dms is not None:
        names = [g.name for g in dms.groups]
        if not isinstance(saved, dict) or list(saved.get("groups", [])) != names:
            n = len(saved.get("groups", [])) if isinstance(saved, dict) else 0
            raise CheckpointError(f"sharded checkpoint {str(p)!r} holds the search of another model: saved {n} "
                                  f"groups, this DMS has {len(names)}")
    _read_metadata(p / _METADATA)  # refuse a tampered file here, with its name, before DCP reads it
    box, state = _state(model, optimizer, dms, rank_state)
    reader_cls, planner_cls = _reader_classes()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load(state, storage_reader=reader_cls(str(p)), planner=planner_cls(), no_dist=not _initialized())
    except CheckpointError:
        raise
    except Exception as exc:
        raise CheckpointError(f"sharded checkpoint {str(p)!r} does not match this model/optimizer or is "
                              f"corrupted: {type(exc).__name__}: {str(exc)[:400]}") from exc
    if optimizer is not None:
        set_state_dict(box, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    else:
        set_model_state_dict(box, state["model"])
    if dms is not None:
        dms.load_state_dict({**saved, "space": {k: v.detach().clone() for k, v in dms.space.state_dict().items()}})
    rank, _ = _rank_world()
    out_rank = state.get(f"rank{rank}", {})  # loaded in place into the caller's rank_state tensors
    return {"extra": meta.get("extra", {}), "rank_state": out_rank, "world_size": meta.get("world_size")}
