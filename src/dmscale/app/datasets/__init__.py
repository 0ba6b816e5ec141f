"""Data sources for dmscale's command line, pipelines, tests and demo (offline-first).

One resolver, :func:`load_data`, takes what a user names on the command line (``--data``):

==========================  ======================================================  ===============
``spec``                    what it loads                                           returns
==========================  ======================================================  ===============
``auto``, ``digits``,       the built-in image sets (:mod:`.images`; ``auto`` =     :class:`ImageData`
``mnist5k``,                best available, and it says which and why)
``fashion-mnist``,
``cifar10``
a directory                 an image folder, one subfolder per class (:mod:`.folder`) :class:`ImageData`
``*.npz``                   named numpy arrays (:mod:`.arrays`)                      :class:`ImageData`
``tiny``, ``shakespeare``,  text for language models, tokenized with a Hugging       :class:`TextData`
``*.txt`` / ``*.md`` file   Face tokenizer or bytes (:mod:`.text`)
==========================  ======================================================  ===============

A prefix forces the kind: ``folder:PATH``, ``npz:PATH``, ``text:PATH`` (a built-in name that is
also a local path is read as the built-in unless prefixed or written with a ``/``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping, Sequence

from dmscale.app.datasets.arrays import NPZ_KEYS, load_npz
from dmscale.app.datasets.base import ImageData, cache_dir, safe_extract
from dmscale.app.datasets.folder import IMAGE_EXTENSIONS, is_image_folder, load_image_folder
from dmscale.app.datasets.images import (AUTO_ORDER, DATASET_NAMES, FASHION_MNIST_HOWTO, _normalize_name,
                                         available_datasets, download_file, download_fashion_mnist,
                                         load_cifar10, load_dataset, load_digits, load_fashion_mnist,
                                         load_mnist5k, read_cifar10_binary, read_idx)
from dmscale.app.datasets.text import (SHAKESPEARE_HELDOUT_PLAYS, TEXT_CORPORA, TINY_HELDOUT_SECTIONS, ByteTokenizer,
                                       TextCorpus, TextData, encode_text, load_text, load_text_corpus,
                                       make_lm_batches, read_text_file, resolve_tokenizer, split_heldout)

__all__ = [
    "load_data", "data_kind", "availability_report",
    "ImageData", "load_dataset", "available_datasets", "read_idx", "read_cifar10_binary", "load_fashion_mnist",
    "load_cifar10", "load_digits", "load_mnist5k", "download_file", "download_fashion_mnist", "safe_extract",
    "cache_dir", "DATASET_NAMES", "AUTO_ORDER", "FASHION_MNIST_HOWTO",
    "load_image_folder", "is_image_folder", "IMAGE_EXTENSIONS", "load_npz", "NPZ_KEYS",
    "TextCorpus", "load_text_corpus", "ByteTokenizer", "make_lm_batches", "TextData", "load_text",
    "read_text_file", "split_heldout", "encode_text", "resolve_tokenizer", "TEXT_CORPORA",
    "SHAKESPEARE_HELDOUT_PLAYS", "TINY_HELDOUT_SECTIONS",
]

TEXT_SUFFIXES: tuple[str, ...] = (".txt", ".text", ".md", ".rst")
KINDS: tuple[str, ...] = ("builtin", "folder", "npz", "text")


def data_kind(spec: str | os.PathLike, kind: str | None = None) -> tuple[str, str]:
    """(kind, spec without its prefix) for a ``--data`` value, reading nothing but the file system entry.

    kind is one of ``builtin`` (image set), ``folder``, ``npz``, ``text``. Raises FileNotFoundError
    for a path that does not exist, ValueError for a file whose kind cannot be told.
    """
    s = os.fspath(spec)
    for k in ("folder", "npz", "text"):
        if s.startswith(k + ":"):
            if kind not in (None, k):
                raise ValueError(f"data {s!r}: prefix {k!r} contradicts kind={kind!r}")
            return k, s[len(k) + 1:]
    if kind is not None:
        if kind not in KINDS:
            raise ValueError(f"data kind must be one of {KINDS}, got {kind!r}")
        return kind, s
    name = _normalize_name(s)
    is_pathlike = os.sep in s or "/" in s or s.startswith(".")
    if not is_pathlike and (name == "auto" or name in DATASET_NAMES):
        return "builtin", s
    if not is_pathlike and name in TEXT_CORPORA:
        return "text", s
    p = Path(s).expanduser()
    if not p.exists():
        raise FileNotFoundError(
            f"data {s!r}: no such file or directory, and not a built-in name (image sets: "
            f"{', '.join(('auto',) + DATASET_NAMES)}; text: {', '.join(TEXT_CORPORA)}). Give an image folder "
            "(one subfolder per class), an .npz file or a UTF-8 .txt file")
    if p.is_dir():
        return "folder", s
    suffix = p.suffix.lower()
    if suffix == ".npz":
        return "npz", s
    if suffix in TEXT_SUFFIXES:
        return "text", s
    raise ValueError(f"data {s!r}: cannot tell what kind of data a {suffix or 'suffix-less'} file holds; "
                     f"name it .npz or {'/'.join(TEXT_SUFFIXES)}, or prefix it: npz:{s} or text:{s}")


def load_data(spec: str | os.PathLike, *, kind: str | None = None, root: str | os.PathLike | None = None,
              download: bool = False, tokenizer: Any = None, heldout_fraction: float = 0.1,
              size: int | Sequence[int] | None = None, channels: int | None = None,
              keys: Mapping[str, str] | None = None, layout: str = "auto", test_fraction: float = 0.2,
              val_fraction: float = 0.0, seed: int = 0, limit_train: int | None = None,
              limit_test: int | None = None) -> ImageData | TextData:
    """Load what ``spec`` names: a built-in set, an image folder, an ``.npz`` file or text (see the module doc).

    Image options (``size``, ``channels``, ``test_fraction``) apply to folders, ``keys``/``layout`` to
    ``.npz`` files, ``tokenizer``/``heldout_fraction`` to text; ``root``/``download`` to built-in sets;
    ``val_fraction``, ``seed``, ``limit_train``, ``limit_test`` to every image source. The returned
    object's ``selection`` says what was chosen and why.
    """
    k, s = data_kind(spec, kind)
    common = dict(val_fraction=val_fraction, seed=seed, limit_train=limit_train, limit_test=limit_test)
    if k == "builtin":
        return load_dataset(s, root=root, download=download, **common)
    if k == "text":
        return load_text(s, tokenizer, heldout_fraction=heldout_fraction, root=root, download=download)
    if k == "folder":
        ds = load_image_folder(s, size=size, channels=channels, test_fraction=test_fraction, **common)
    else:
        ds = load_npz(s, keys=keys, layout=layout, test_fraction=test_fraction, **common)
    ds.selection = f"requested {k} {s!r}"
    return ds


def availability_report(root: str | os.PathLike | None = None) -> str:
    """Lines saying which built-in image sets this machine has, and how to get Fashion-MNIST if it is missing."""
    avail = available_datasets(root)
    lines = ["datasets on this machine: " + ", ".join(f"{k} ({'yes' if ok else 'no'})" for k, (ok, _) in avail.items())]
    if not avail["fashion-mnist"][0]:
        lines.append("  fashion-mnist is not installed (a fresh machine does not have it); the demo uses the best "
                     "set it has. To get Fashion-MNIST: " + FASHION_MNIST_HOWTO)
    return "\n".join(lines)
