"""An image folder with one subfolder per class, read with Pillow + numpy (no torchvision).

Two layouts are accepted::

    root/cat/001.png  root/dog/xyz.jpg ...             a fixed stratified train/test split is made
    root/train/cat/... root/test/cat/...                the given split is used (``val/`` or
                                                        ``validation/`` may stand for ``test/``)

Every image is brought to one size and one channel count: ``size`` (an int or ``(height, width)``)
resizes all images bilinearly; without it all images must share a size, or the most common size is
used and the others are resized (the source line says how many). ``channels`` 1 converts to
grayscale, 3 to RGB; without it the set is grayscale when every image is, else RGB (alpha is
dropped). 16-bit grayscale is scaled to 8 bits. Pixels are scaled to [0, 1] and normalized with the
training set's per-channel mean and std, like the built-in sets.
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path
from typing import Sequence

import numpy as np

from dmscale.app.datasets.base import _SPLIT_SEED, ImageData, _build, _stratified_split

__all__ = ["load_image_folder", "IMAGE_EXTENSIONS", "is_image_folder"]

IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp",
                                     ".ppm", ".pgm", ".pbm")
_TRAIN_NAMES = ("train", "training")
_TEST_NAMES = ("test", "val", "valid", "validation")
_GRAY_MODES = {"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "I;16N"}


def _pil():
    try:
        from PIL import Image, UnidentifiedImageError
    except ImportError as e:  # pragma: no cover - pillow is a declared extra
        raise ImportError("reading an image folder needs Pillow: pip install 'dmscale[data]'") from e
    return Image, UnidentifiedImageError


def _subdirs(d: Path) -> list[Path]:
    return sorted(p for p in d.iterdir() if p.is_dir() and not p.name.startswith("."))


def _images_under(d: Path) -> tuple[list[Path], int]:
    """Image files under d (recursive, sorted, hidden entries skipped) and the count of other files."""
    found: list[Path] = []
    other = 0
    for cur, dirs, files in os.walk(d):
        dirs[:] = sorted(x for x in dirs if not x.startswith("."))
        for f in sorted(files):
            if f.startswith("."):
                continue
            if f.lower().endswith(IMAGE_EXTENSIONS):
                found.append(Path(cur) / f)
            else:
                other += 1
    return found, other


def _split_dirs(root: Path) -> tuple[Path, Path] | None:
    """(train, test) directories when root uses the train/ + test/ layout, else None."""
    names = {p.name.lower(): p for p in _subdirs(root)}
    train = next((names[n] for n in _TRAIN_NAMES if n in names), None)
    test = next((names[n] for n in _TEST_NAMES if n in names), None)
    if train is None or test is None or not _subdirs(train):
        return None
    return train, test


def is_image_folder(path: str | os.PathLike) -> bool:
    """Whether path is a directory with at least one class subfolder (cheap: reads no image)."""
    p = Path(path)
    return p.is_dir() and bool(_subdirs(p))


def _scan_classes(d: Path, what: str) -> dict[str, list[Path]]:
    """Class name -> image files for the class subfolders of d; errors name empty or missing folders."""
    classes = _subdirs(d)
    loose = [p for p in d.iterdir() if p.is_file() and p.name.lower().endswith(IMAGE_EXTENSIONS)]
    if not classes:
        extra = f" (it holds {len(loose)} image files directly)" if loose else ""
        raise FileNotFoundError(f"{what} {d}: no class subfolders{extra}; expected one subfolder per class, "
                                f"e.g. {d}/cat/1.png and {d}/dog/2.png")
    if loose:
        raise ValueError(f"{what} {d}: {len(loose)} image files lie directly in it (e.g. {loose[0].name}); "
                         "every image must be inside its class subfolder")
    out: dict[str, list[Path]] = {}
    for c in classes:
        files, other = _images_under(c)
        if not files:
            what_else = f" ({other} other files)" if other else " (it is empty)"
            raise FileNotFoundError(f"class folder {c} has no image files{what_else}; looked for "
                                    f"{', '.join(IMAGE_EXTENSIONS)}. Add images or remove the folder")
        out[c.name] = files
    return out


def _open_header(path: Path):
    """Open an image lazily (header only); a file Pillow cannot identify is an error naming it."""
    Image, Unidentified = _pil()
    try:
        with Image.open(path) as img:
            return img.size[::-1], img.mode  # (height, width), mode
    except (Unidentified, OSError, ValueError, SyntaxError) as e:
        raise ValueError(f"{path}: not a readable image ({type(e).__name__}: {e})") from e


def _read(path: Path, hw: tuple[int, int], channels: int) -> np.ndarray:
    """Decode one image to a uint8 (channels, H, W) array at size hw."""
    Image, Unidentified = _pil()
    try:
        with Image.open(path) as img:
            img.load()
            mode = img.mode
            if mode == "F":
                raise ValueError("32-bit float images are not supported; save them as 8/16-bit PNG or use an .npz")
            if mode.startswith("I"):  # 16-bit (or 32-bit integer) grayscale -> 8 bit
                a = np.asarray(img, dtype=np.float64)
                top = 65535.0 if (mode.startswith("I;16") or a.max(initial=0) > 255) else 255.0
                img = Image.fromarray(np.clip(np.rint(a * (255.0 / top)), 0, 255).astype(np.uint8))
            img = img.convert("L" if channels == 1 else "RGB")
            if img.size[::-1] != tuple(hw):
                img = img.resize((hw[1], hw[0]), Image.BILINEAR)
            a = np.asarray(img, dtype=np.uint8)
    except (Unidentified, OSError, SyntaxError) as e:
        raise ValueError(f"{path}: cannot decode image ({type(e).__name__}: {e})") from e
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from e
    return a[None] if a.ndim == 2 else a.transpose(2, 0, 1)


def _norm_size(size: int | Sequence[int] | None) -> tuple[int, int] | None:
    if size is None:
        return None
    hw = (int(size), int(size)) if isinstance(size, (int, np.integer)) else tuple(int(v) for v in size)
    if len(hw) != 2 or min(hw) < 1:
        raise ValueError(f"size must be a positive int or (height, width), got {size!r}")
    return hw  # type: ignore[return-value]


def load_image_folder(root: str | os.PathLike, *, size: int | Sequence[int] | None = None,
                      channels: int | None = None, test_fraction: float = 0.2, val_fraction: float = 0.0,
                      seed: int = 0, limit_train: int | None = None, limit_test: int | None = None,
                      name: str | None = None) -> ImageData:
    """Load ``root/<class>/*.png`` (or ``root/train|test/<class>/...``) as :class:`ImageData`.

    Args:
        root: the folder.
        size: resize every image to this (int or (height, width)); default: the common size.
        channels: 1 (grayscale) or 3 (RGB); default: 1 when every image is grayscale, else 3.
        test_fraction: held-out fraction per class for the one-folder layout (fixed split).
        val_fraction: fraction of the training images carved out as a validation split.
        seed: seed of the validation split and of the subsamples.
        limit_train: seeded subsample of the training images (None: all).
        limit_test: seeded subsample of the test images (None: all).
        name: dataset name (default: the folder's name).

    Raises:
        FileNotFoundError: root missing, no class subfolders, or a class folder without images.
        ValueError: an unreadable image (named), bad options, or too few images for a test split.
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist or is not a directory")
    if channels not in (None, 1, 3):
        raise ValueError(f"channels must be 1, 3 or None, got {channels!r}")
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    hw = _norm_size(size)
    split = _split_dirs(root)
    if split is not None:
        train_map = _scan_classes(split[0], "train folder")
        test_dirs = _subdirs(split[1])
        unknown = [d.name for d in test_dirs if d.name not in train_map]
        if unknown:
            raise ValueError(f"test folder {split[1]}: classes {unknown} have no folder in {split[0]} "
                             f"(train classes: {sorted(train_map)})")
        test_map = _scan_classes(split[1], "test folder")
        classes = sorted(train_map)
        train_files = [(f, classes.index(c)) for c in classes for f in train_map[c]]
        test_files = [(f, classes.index(c)) for c in classes for f in test_map.get(c, [])]
        layout = f"{split[0].name}/ + {split[1].name}/ folders"
    else:
        cmap = _scan_classes(root, "image folder")
        classes = sorted(cmap)
        files = [(f, i) for i, c in enumerate(classes) for f in cmap[c]]
        labels = np.array([y for _, y in files], dtype=np.int64)
        tr, te = _stratified_split(labels, test_fraction, _SPLIT_SEED)
        if len(te) == 0 or len(tr) == 0:
            raise ValueError(f"image folder {root}: {len(files)} images are too few to hold out "
                             f"test_fraction={test_fraction} of each class; add images or use "
                             f"{root}/train/<class>/ and {root}/test/<class>/ folders")
        train_files = [files[i] for i in tr]
        test_files = [files[i] for i in te]
        layout = f"one folder per class, fixed {1 - test_fraction:.0%}/{test_fraction:.0%} split"
    everything = train_files + test_files
    heads = [_open_header(f) for f, _ in everything]
    sizes = Counter(s for s, _ in heads)
    resized = 0
    if hw is None:
        hw = sizes.most_common(1)[0][0]
        resized = sum(n for s, n in sizes.items() if s != hw)
    else:
        resized = sum(n for s, n in sizes.items() if s != hw)
    if channels is None:
        channels = 1 if all(m in _GRAY_MODES for _, m in heads) else 3
    x = np.stack([_read(f, hw, channels) for f, _ in everything])
    y = np.array([c for _, c in everything], dtype=np.int64)
    n = len(train_files)
    note = f"; {resized} of {len(everything)} images resized to {hw[0]}x{hw[1]}" if resized else ""
    src = (f"{root}/ (image folder, {layout}, {len(classes)} classes, {len(everything)} images, "
           f"{channels} channel{'s' if channels > 1 else ''}{note})")
    return _build(name or root.name, x[:n], y[:n], x[n:], y[n:], scale=255.0, source=src, classes=classes,
                  num_classes=len(classes), val_fraction=val_fraction, seed=seed, limit_train=limit_train,
                  limit_test=limit_test)
