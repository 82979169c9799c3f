"""Tokenizers for ``python -m experiments.data prepare``: byte-level (default, no dependencies) and BPE.

Byte-level: ids 0..255 are the raw UTF-8 bytes and id 256 is ``<|endoftext|>``, appended after every
document (GPT-2 convention, Radford et al. 2019), so every string round-trips exactly. The model vocabulary is
padded up to a multiple (``padded_vocab_size``, default 64 -> 320) because matmul-friendly vocabulary sizes
are faster on accelerators (the nanoGPT trick of 50257 -> 50304); the padding ids never occur in the data.

BPE: byte-level BPE (Sennrich et al. 2016, arXiv:1508.07909; the byte-level variant of GPT-2) from the
Hugging Face ``tokenizers`` library, which is an optional extra (``pip install -e ".[bpe]"``). It is either
trained on the input documents or loaded from a ``tokenizer.json``.

Note: this module is ``experiments.tokenizers``; ``import tokenizers`` inside it still means the library
because imports are absolute.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np

EOS_TEXT = "<|endoftext|>"


def padded_vocab_size(n: int, multiple: int) -> int:
    """Smallest multiple of ``multiple`` that is >= n (``multiple`` <= 1 means no padding)."""
    if multiple <= 1:
        return n
    return -(-n // multiple) * multiple


class ByteTokenizer:
    """UTF-8 bytes plus one end-of-document token."""

    kind = "byte"
    eos_id = 256
    n_tokens = 257  # ids actually used: 256 bytes + <|endoftext|>

    def encode(self, text: str | bytes) -> np.ndarray:
        data = text.encode("utf-8") if isinstance(text, str) else text
        return np.frombuffer(data, dtype=np.uint8).astype(np.uint32)

    def decode(self, ids: Iterable[int]) -> str:
        ids = np.asarray(list(ids) if not isinstance(ids, np.ndarray) else ids)
        docs = [np.asarray(d, dtype=np.uint8).tobytes() for d in np.split(ids, np.flatnonzero(ids >= 256))]
        # Splitting at special ids keeps them as the first element of each later piece; drop them.
        parts = [docs[0]] + [d[1:] for d in docs[1:]]
        return EOS_TEXT.join(p.decode("utf-8", errors="replace") for p in parts)

    def to_metadata(self) -> dict:
        return {"type": self.kind, "eos_id": self.eos_id, "n_tokens": self.n_tokens}


def _require_tokenizers():
    try:
        import tokenizers
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            "--tokenizer bpe needs the Hugging Face `tokenizers` library, which is not installed. "
            'Install the optional extra: pip install -e ".[bpe]"  (or: pip install tokenizers)'
        ) from e
    return tokenizers


class BPETokenizer:
    """Byte-level BPE through the ``tokenizers`` library."""

    kind = "bpe"

    def __init__(self, tok):
        # Text that merely spells a special token ("<|endoftext|>" inside a document) is encoded as text:
        # the preparer appends the end-of-text id itself, so a literal one must not become a false boundary.
        tok.encode_special_tokens = True
        self._tok = tok
        eos = tok.token_to_id(EOS_TEXT)
        if eos is None:
            raise ValueError(f"BPE tokenizer has no {EOS_TEXT!r} token; add it as a special token")
        self.eos_id = int(eos)
        self.n_tokens = int(tok.get_vocab_size(with_added_tokens=True))

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int) -> BPETokenizer:
        tk = _require_tokenizers()
        tok = tk.Tokenizer(tk.models.BPE())
        tok.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = tk.decoders.ByteLevel()
        trainer = tk.trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=[EOS_TEXT],
            initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tok.train_from_iterator(texts, trainer=trainer)
        return cls(tok)

    @classmethod
    def from_file(cls, path: str | Path) -> BPETokenizer:
        tk = _require_tokenizers()
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer file not found: {path}")
        try:
            tok = tk.Tokenizer.from_file(str(path))
        except Exception as e:  # the library raises a bare Exception for a malformed file
            raise ValueError(f"{path} is not a tokenizers JSON file: {e}") from e
        return cls(tok)

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self._tok.encode(text).ids, dtype=np.uint32)

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        return [np.asarray(e.ids, dtype=np.uint32) for e in self._tok.encode_batch(texts)]

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def save(self, path: str | Path) -> None:
        self._tok.save(str(path))

    def to_metadata(self) -> dict:
        return {"type": self.kind, "eos_id": self.eos_id, "n_tokens": self.n_tokens, "file": "tokenizer.json"}
