"""The byte-level tokenizer: lossless for any text, no download (the default of the LLM recipes and eval)."""

from __future__ import annotations

from typing import Iterable

import numpy as np
import torch

__all__ = ["ByteTokenizer"]


class ByteTokenizer:
    """UTF-8 byte-level tokenizer (vocab 256): lossless for any text, needs no hub download."""

    vocab_size: int = 256

    def encode(self, text: str) -> list[int]:
        """Text -> list of byte ids in [0, 256)."""
        return list(text.encode("utf-8"))

    def encode_tensor(self, text: str) -> torch.Tensor:
        """Text -> 1-d LongTensor of byte ids (fast path for whole corpora)."""
        return torch.from_numpy(np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int64))

    def decode(self, ids: Iterable[int] | torch.Tensor) -> str:
        """Byte ids -> text (invalid UTF-8 sequences, e.g. from sampling, become U+FFFD)."""
        if isinstance(ids, torch.Tensor):
            ids = ids.reshape(-1).tolist()
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")

    def __call__(self, text: str) -> list[int]:
        """Alias of encode."""
        return self.encode(text)
