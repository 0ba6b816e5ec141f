"""What every data source shares: :class:`ImageData`, the normalising builder, seeded splits, the
cache directory and safe tar extraction."""

from __future__ import annotations

import os
import re
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

__all__ = ["ImageData", "cache_dir", "safe_extract"]

# Test split is fixed (same test images whatever ``seed`` is) so results stay comparable across runs.
_SPLIT_SEED = 0
_TEST_FRACTION = 0.2


def cache_dir(*parts: str) -> Path:
    """Return dmscale's cache directory (``$DMSCALE_CACHE`` or ``~/.cache/dmscale``) joined with parts."""
    base = os.environ.get("DMSCALE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "dmscale")
    return Path(base).joinpath(*parts)


# --------------------------------------------------------------------------------------------
# Container
# --------------------------------------------------------------------------------------------

@dataclass
class ImageData:
    """A normalized image-classification dataset: train/test (and optional val) TensorDatasets."""

    name: str
    num_classes: int
    input_shape: tuple[int, ...]  # one example: (C, H, W) for images, (D,) for feature vectors
    train: TensorDataset
    test: TensorDataset
    source: str
    val: TensorDataset | None = None
    classes: tuple[str, ...] = ()
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()
    selection: str = ""  # how this dataset was chosen ('auto' explains its fallback here)
    extra: dict = field(default_factory=dict)

    def loaders(self, batch_size: int = 128, seed: int = 0, num_workers: int = 0,
                drop_last: bool = False) -> tuple[DataLoader, DataLoader]:
        """Return (train_loader, test_loader); train shuffling is reproducible via a seeded Generator."""
        gen = torch.Generator()
        gen.manual_seed(int(seed))
        train = DataLoader(self.train, batch_size=batch_size, shuffle=True, generator=gen,
                           num_workers=num_workers, drop_last=drop_last)
        test = DataLoader(self.test, batch_size=batch_size, shuffle=False, num_workers=num_workers)
        return train, test

    def val_loader(self, batch_size: int = 256, num_workers: int = 0) -> DataLoader:
        """Return an unshuffled loader over the validation split (raises if none was requested)."""
        if self.val is None:
            raise ValueError(f"{self.name}: no validation split; pass val_fraction>0 to load_dataset")
        return DataLoader(self.val, batch_size=batch_size, shuffle=False, num_workers=num_workers)

    def __repr__(self) -> str:
        """Short summary (sizes, shape, source) instead of dumping tensors."""
        nval = 0 if self.val is None else len(self.val)
        return (f"ImageData(name={self.name!r}, classes={self.num_classes}, shape={self.input_shape}, "
                f"train={len(self.train)}, val={nval}, test={len(self.test)}, source={self.source!r})")


# --------------------------------------------------------------------------------------------
# Shared array helpers
# --------------------------------------------------------------------------------------------

def _stratified_split(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split indices into (keep, taken) with ``fraction`` of every class taken, reproducibly."""
    rng = np.random.default_rng(seed)
    taken: list[np.ndarray] = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        idx = idx[rng.permutation(len(idx))]
        k = int(round(len(idx) * fraction))
        taken.append(idx[:k])
    taken_idx = np.sort(np.concatenate(taken)) if taken else np.zeros(0, dtype=np.int64)
    mask = np.ones(len(labels), dtype=bool)
    mask[taken_idx] = False
    return np.flatnonzero(mask), taken_idx


def _subsample(n: int, limit: int | None, seed: int) -> np.ndarray | None:
    """Indices of a seeded random subset of size ``limit`` (sorted), or None for 'keep everything'."""
    if limit is None or limit >= n:
        return None
    if limit <= 0:
        raise ValueError(f"limit must be positive, got {limit}")
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n, size=int(limit), replace=False))


def _build(name: str, x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, y_test: np.ndarray,
           *, scale: float, source: str, classes: Sequence[str], num_classes: int,
           val_fraction: float = 0.0, seed: int = 0, limit_train: int | None = None,
           limit_test: int | None = None) -> ImageData:
    """Subsample, carve validation, scale to [0,1], normalize by train mean/std and wrap tensors."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if x_train.ndim not in (2, 4) or x_test.ndim != x_train.ndim or x_train.shape[1:] != x_test.shape[1:]:
        raise ValueError(f"{name}: expected NCHW images or (N, D) features of one shape, got train "
                         f"{x_train.shape} / test {x_test.shape}")
    if len(x_train) == 0 or len(x_test) == 0:
        raise ValueError(f"{name}: empty split (train {len(x_train)}, test {len(x_test)} examples)")
    for split, x, y in (("train", x_train, y_train), ("test", x_test, y_test)):
        if len(y) != len(x):
            raise ValueError(f"{name}: {split} has {len(x)} examples but {len(y)} labels")
        if len(y) and (int(y.min()) < 0 or int(y.max()) >= num_classes):
            raise ValueError(f"{name}: {split} label {int(y.min()) if int(y.min()) < 0 else int(y.max())} "
                             f"out of range 0..{num_classes - 1}")
    sel = _subsample(len(x_train), limit_train, seed)
    if sel is not None:
        x_train, y_train = x_train[sel], y_train[sel]
    sel = _subsample(len(x_test), limit_test, seed + 1)
    if sel is not None:
        x_test, y_test = x_test[sel], y_test[sel]
    x_val = y_val = None
    if val_fraction > 0:
        keep, taken = _stratified_split(y_train, val_fraction, seed)
        x_val, y_val = x_train[taken], y_train[taken]
        x_train, y_train = x_train[keep], y_train[keep]

    xt = torch.from_numpy(np.ascontiguousarray(x_train, dtype=np.float32)).div_(scale)
    dims = (0,) + tuple(range(2, xt.dim()))  # per channel (images) or per feature (vectors)
    if len(xt) > 1:
        var, mean = torch.var_mean(xt, dim=dims)  # float32 reductions: no float64 copy of the data
    else:
        mean, var = xt.mean(dim=dims), torch.ones(xt.shape[1])
    std = var.sqrt().clamp_min(1e-8)
    view = (1, -1) + (1,) * (xt.dim() - 2)
    m4 = mean.to(torch.float32).view(*view)
    s4 = std.to(torch.float32).view(*view)

    def prep(x: np.ndarray) -> torch.Tensor:
        """Scale and normalize a uint8/float array with the train statistics."""
        return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).div_(scale).sub_(m4).div_(s4)

    def lab(y: np.ndarray) -> torch.Tensor:
        """Labels as int64 tensor."""
        return torch.from_numpy(np.ascontiguousarray(y, dtype=np.int64))

    train = TensorDataset(xt.sub_(m4).div_(s4), lab(y_train))
    test = TensorDataset(prep(x_test), lab(y_test))
    val = TensorDataset(prep(x_val), lab(y_val)) if x_val is not None else None
    return ImageData(name=name, num_classes=num_classes, input_shape=tuple(int(v) for v in x_train.shape[1:]),
                     train=train, test=test, val=val, source=source, classes=tuple(classes),
                     mean=tuple(float(v) for v in mean), std=tuple(float(v) for v in std))


# --------------------------------------------------------------------------------------------
# Safe tar extraction
# --------------------------------------------------------------------------------------------

def _check_member(m: tarfile.TarInfo, dest: Path) -> None:
    """Reject absolute paths, '..' components, links and special files (tar path traversal)."""
    name = m.name
    if name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name) or os.path.isabs(name):
        raise ValueError(f"unsafe tar member (absolute path): {name!r}")
    parts = re.split(r"[\\/]+", name)
    if ".." in parts:
        raise ValueError(f"unsafe tar member (parent directory): {name!r}")
    if m.issym() or m.islnk():
        raise ValueError(f"unsafe tar member (link): {name!r}")
    if not (m.isfile() or m.isdir()):
        raise ValueError(f"unsafe tar member (special file): {name!r}")
    target = (dest / name).resolve()
    if target != dest and dest not in target.parents:
        raise ValueError(f"unsafe tar member (escapes {dest}): {name!r}")


def safe_extract(tar_path: str | os.PathLike, dest: str | os.PathLike,
                 select: Callable[[str], bool] | None = None) -> list[Path]:
    """Extract (selected) regular files/dirs of a tarball under dest, refusing path traversal."""
    dest = Path(dest).resolve()
    dest.mkdir(parents=True, exist_ok=True)
    out: list[Path] = []
    with tarfile.open(tar_path, "r:*") as tf:
        members = tf.getmembers()
        for m in members:  # validate everything before writing anything
            _check_member(m, dest)
        chosen = [m for m in members if select is None or m.isdir() or select(m.name)]
        for m in chosen:
            target = dest / m.name
            if m.isdir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            fobj = tf.extractfile(m)
            assert fobj is not None
            with fobj, open(target, "wb") as f:
                f.write(fobj.read())
            out.append(target)
    return out
