"""Classification data from a ``.npz`` file of named numpy arrays (read with ``allow_pickle=False``).

Keys (rename them with ``keys={"x_train": "images", ...}``):

* ``x_train``, ``y_train``, ``x_test``, ``y_test``: the given split; or
* ``x``, ``y``: one set, split 80/20 per class with a fixed seed (``test_fraction``);
* ``classes`` (optional): class names, a string array.

Inputs are ``(N, C, H, W)`` images, ``(N, H, W, C)`` images (detected when the last axis is 1, 3 or 4
and the second is not; force with ``layout``), ``(N, H, W)`` grayscale images or ``(N, D)`` feature
vectors; labels are integer class indices ``(N,)``. Inputs are normalized per channel (per feature)
with the training set's mean and std.
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path
from typing import Mapping

import numpy as np

from dmscale.app.datasets.base import _SPLIT_SEED, ImageData, _build, _stratified_split

__all__ = ["load_npz", "NPZ_KEYS"]

NPZ_KEYS: tuple[str, ...] = ("x_train", "y_train", "x_test", "y_test", "x", "y", "classes")


def _open(path: Path) -> dict[str, np.ndarray]:
    if not path.is_file():
        raise FileNotFoundError(f"array file {path} does not exist")
    try:
        z = np.load(path, allow_pickle=False)
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as e:
        raise ValueError(f"{path}: not a readable .npz file of numeric arrays ({type(e).__name__}: {e})") from e
    if not isinstance(z, np.lib.npyio.NpzFile):
        raise ValueError(f"{path}: a single .npy array, not an .npz archive of named arrays; save with "
                         "np.savez(path, x_train=..., y_train=..., x_test=..., y_test=...)")
    out = {}
    with z:
        for k in z.files:
            try:
                out[k] = z[k]
            except ValueError as e:
                raise ValueError(f"{path}: array {k!r} holds Python objects (pickled), which dmscale never "
                                 "loads; save numeric arrays (and class names as a string array)") from e
            except (zipfile.BadZipFile, OSError, EOFError) as e:
                raise ValueError(f"{path}: array {k!r} cannot be read ({type(e).__name__}: {e})") from e
    return out


def _inputs(x: np.ndarray, key: str, path: Path, layout: str) -> tuple[np.ndarray, str]:
    """Inputs as NCHW (images) or (N, D) (features); returns the array and a note on the layout."""
    if x.dtype.kind not in "biuf":
        raise ValueError(f"{path}: {key!r} has dtype {x.dtype}; inputs must be numeric")
    if x.dtype.kind == "f" and not np.isfinite(x).all():
        raise ValueError(f"{path}: {key!r} contains NaN or infinite values")
    if x.ndim == 2:
        return x, "features"
    if x.ndim == 3:
        return x[:, None], "NHW"
    if x.ndim != 4:
        raise ValueError(f"{path}: {key!r} has shape {x.shape}; expected (N, C, H, W), (N, H, W, C), (N, H, W) "
                         "or (N, D)")
    if layout == "auto":
        layout = "nhwc" if x.shape[-1] in (1, 3, 4) and x.shape[1] not in (1, 3, 4) else "nchw"
    if layout == "nhwc":
        return np.ascontiguousarray(x.transpose(0, 3, 1, 2)), "NHWC"
    if layout != "nchw":
        raise ValueError(f"layout must be 'auto', 'nchw' or 'nhwc', got {layout!r}")
    return x, "NCHW"


def _labels(y: np.ndarray, key: str, path: Path, n: int) -> np.ndarray:
    if y.ndim == 2 and y.shape[1] > 1:
        raise ValueError(f"{path}: {key!r} has shape {y.shape} (one-hot?); labels must be class indices (N,), "
                         "e.g. y.argmax(1)")
    y = y.reshape(-1) if y.ndim == 2 else y
    if y.ndim != 1:
        raise ValueError(f"{path}: {key!r} has shape {y.shape}; labels must be class indices of shape (N,)")
    if y.dtype.kind not in "biu":
        if y.dtype.kind == "f" and np.isfinite(y).all() and (y == np.round(y)).all():
            y = y.astype(np.int64)
        else:
            raise ValueError(f"{path}: {key!r} has dtype {y.dtype}; labels must be integer class indices")
    if len(y) != n:
        raise ValueError(f"{path}: {key!r} has {len(y)} labels but the inputs have {n} examples")
    if len(y) and int(y.min()) < 0:
        raise ValueError(f"{path}: {key!r} has a negative label {int(y.min())}")
    return y.astype(np.int64)


def load_npz(path: str | os.PathLike, *, keys: Mapping[str, str] | None = None, layout: str = "auto",
             test_fraction: float = 0.2, val_fraction: float = 0.0, seed: int = 0,
             limit_train: int | None = None, limit_test: int | None = None, name: str | None = None) -> ImageData:
    """Load a classification set from an ``.npz`` file (see the module docstring for the keys).

    Raises:
        FileNotFoundError: no such file.
        KeyError: required arrays missing (the message lists the expected and the present keys).
        ValueError: not an npz, object (pickled) arrays, bad shapes, non-integer or out-of-range labels.
    """
    path = Path(path).expanduser()
    names = {k: k for k in NPZ_KEYS}
    if keys:
        bad = sorted(set(keys) - set(NPZ_KEYS))
        if bad:
            raise ValueError(f"keys: unknown roles {bad}; roles are {list(NPZ_KEYS)}")
        names.update(keys)
    arrs = _open(path)
    present = sorted(arrs)
    split = [names[k] for k in ("x_train", "y_train", "x_test", "y_test")]
    whole = [names["x"], names["y"]]
    if all(k in arrs for k in split):
        xtr, ntr = _inputs(arrs[split[0]], split[0], path, layout)
        xte, _ = _inputs(arrs[split[2]], split[2], path, layout)
        ytr = _labels(arrs[split[1]], split[1], path, len(xtr))
        yte = _labels(arrs[split[3]], split[3], path, len(xte))
        how = "given train/test split"
    elif all(k in arrs for k in whole):
        x, ntr = _inputs(arrs[whole[0]], whole[0], path, layout)
        y = _labels(arrs[whole[1]], whole[1], path, len(x))
        if not 0.0 < test_fraction < 1.0:
            raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
        tr, te = _stratified_split(y, test_fraction, _SPLIT_SEED)
        if len(tr) == 0 or len(te) == 0:
            raise ValueError(f"{path}: {len(y)} examples are too few to hold out test_fraction={test_fraction} "
                             "of each class; store x_train/y_train/x_test/y_test instead")
        xtr, ytr, xte, yte = x[tr], y[tr], x[te], y[te]
        how = f"fixed {1 - test_fraction:.0%}/{test_fraction:.0%} split of {whole[0]!r}"
    else:
        missing_split = [k for k in split if k not in arrs]
        missing_whole = [k for k in whole if k not in arrs]
        raise KeyError(f"{path}: missing arrays {missing_split} (or {missing_whole} for one set to split); "
                       f"the file has {present}. Rename with keys={{'x_train': 'your_name', ...}}")
    n_cls = int(max(ytr.max(initial=-1), yte.max(initial=-1))) + 1
    classes: tuple[str, ...] = tuple(str(i) for i in range(n_cls))
    if names["classes"] in arrs:
        c = arrs[names["classes"]]
        if c.ndim != 1 or c.dtype.kind not in "USO":
            raise ValueError(f"{path}: {names['classes']!r} must be a 1-d string array of class names, "
                             f"got {c.dtype} {c.shape}")
        if len(c) < n_cls:
            raise ValueError(f"{path}: {len(c)} class names in {names['classes']!r} but labels go up to {n_cls - 1}")
        classes = tuple(str(v) for v in c)
        n_cls = len(classes)
    scale = 255.0 if xtr.dtype == np.uint8 else 1.0
    src = f"{path} (npz arrays, {how}, inputs {ntr} {tuple(xtr.shape[1:])}, {n_cls} classes)"
    return _build(name or path.stem, xtr, ytr, xte, yte, scale=scale, source=src, classes=classes,
                  num_classes=n_cls, val_fraction=val_fraction, seed=seed, limit_train=limit_train,
                  limit_test=limit_test)
