"""Token datasets: flat ``.bin`` token streams read through ``np.memmap``, stateless batches, and the CLI.

On disk a dataset is a directory with one ``<split>.bin`` per split (a flat little-endian ``uint16`` or
``uint32`` array of token ids, no header) and ``metadata.json``::

    {"format": "scalelab-tokens", "format_version": 1, "vocab_size": 320, "dtype": "uint16",
     "n_tokens": {"train": 990000, "val": 10000}, "max_token_id": {"train": 256, "val": 256},
     "tokenizer": {"type": "byte" | "bpe" | "synthetic", ...}, "source": "<description>",
     "entropy_rate": 2.1555 | null, "unigram_entropy": 4.37, "bigram_entropy": 3.37 | null, ...}

Batches are a pure function of ``(seed, step, split)``: window offsets come from
``np.random.default_rng([seed, step, split_id])``, so resuming at step s needs no iterator state and two runs
with one seed see identical batches (the approach of e.g. nanoGPT's random-window loader, made stateless).
For multi-host training every host computes the same global offsets and keeps its own contiguous block of
rows.

CLI::

    python -m experiments.data synthetic --out data/synthetic [--vocab-size 256 --train-tokens 2000000 ...]
    python -m experiments.data prepare --input a.txt b.txt --out data/mytext [--tokenizer byte|bpe]
    python -m experiments.data info data/mytext
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import warnings
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from experiments.files import write_text_atomic
from experiments.synthetic import MarkovSource, MarkovSourceConfig, config_dict, describe
from experiments.tokenizers import BPETokenizer, ByteTokenizer, padded_vocab_size

FORMAT = "scalelab-tokens"
FORMAT_VERSION = 1
METADATA = "metadata.json"
_DTYPES = {"uint16": np.uint16, "uint32": np.uint32}
_SPLIT_IDS = {"train": 0, "val": 1}
_CHUNK = 1 << 24  # tokens per chunk when scanning or copying files


class DataError(ValueError):
    """Bad or inconsistent token data; the message names the offending file."""


def split_id(split: str) -> int:
    """Stable integer per split name, part of the batch RNG key (train=0, val=1, others by CRC32)."""
    return _SPLIT_IDS.get(split, zlib.crc32(split.encode()) + 2)


def token_dtype(vocab_size: int) -> str:
    return "uint16" if vocab_size <= 2**16 else "uint32"


# ---- reading -----------------------------------------------------------------------------------
@dataclass
class TokenDataset:
    """A token dataset directory opened read-only. Use ``TokenDataset.open(directory)``."""

    directory: Path
    metadata: dict = field(repr=False)
    _tokens: dict[str, np.memmap] = field(repr=False)

    @classmethod
    def open(cls, directory: str | os.PathLike, *, verify_tokens: bool = True) -> TokenDataset:
        """Open and validate ``directory``; ``verify_tokens`` scans every split for ids >= vocab_size."""
        directory = Path(directory)
        meta_path = directory / METADATA
        if not meta_path.is_file():
            raise DataError(f"missing metadata file {meta_path} (is {directory} a prepared token dataset?)")
        try:
            meta = json.loads(meta_path.read_text())
        except json.JSONDecodeError as e:
            raise DataError(f"{meta_path} is not valid JSON: {e}") from e
        if not isinstance(meta, dict):
            raise DataError(f"{meta_path}: expected a JSON object, got {type(meta).__name__}")
        for key in ("vocab_size", "dtype", "n_tokens"):
            if key not in meta:
                raise DataError(f"{meta_path} lacks required key {key!r}")
        vocab, dtype_name = meta["vocab_size"], meta["dtype"]
        if not isinstance(vocab, int) or vocab < 1:
            raise DataError(f"{meta_path}: vocab_size must be a positive integer, got {vocab!r}")
        if dtype_name not in _DTYPES:
            raise DataError(f"{meta_path}: dtype must be one of {sorted(_DTYPES)}, got {dtype_name!r}")
        dtype = np.dtype(_DTYPES[dtype_name])
        if vocab > np.iinfo(dtype).max + 1:
            raise DataError(f"{meta_path}: vocab_size {vocab} does not fit dtype {dtype_name}")
        if not isinstance(meta["n_tokens"], dict) or not meta["n_tokens"]:
            raise DataError(f"{meta_path}: n_tokens must map split names to token counts")
        tokens = {}
        for split, n in meta["n_tokens"].items():
            path = directory / f"{split}.bin"
            if not isinstance(n, int) or n < 0:
                raise DataError(f"{meta_path}: n_tokens[{split!r}] must be a non-negative integer, got {n!r}")
            if not path.is_file():
                raise DataError(f"split {split!r}: token file {path} is missing")
            size = path.stat().st_size
            if size == 0:
                raise DataError(f"token file {path} is empty")
            if size % dtype.itemsize or size // dtype.itemsize != n:
                raise DataError(
                    f"token file {path} has {size} bytes but {meta_path} says {n} tokens of dtype "
                    f"{dtype_name} ({n * dtype.itemsize} bytes): wrong dtype in metadata, or a truncated or "
                    "foreign file"
                )
            mm = np.memmap(path, dtype=dtype, mode="r")
            if verify_tokens:
                _check_ids(mm, vocab, path)
            tokens[split] = mm
        return cls(directory, meta, tokens)

    # -- metadata accessors
    @property
    def vocab_size(self) -> int:
        return int(self.metadata["vocab_size"])

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.metadata["dtype"])

    @property
    def splits(self) -> list[str]:
        return list(self._tokens)

    @property
    def entropy_rate(self) -> float | None:
        """Exact entropy rate in nats/token (the irreducible loss) for synthetic data, else None."""
        return self.metadata.get("entropy_rate")

    @property
    def unigram_entropy(self) -> float | None:
        """Unigram entropy in nats/token: the loss of the best context-free model (exact for synthetic
        data, the plug-in estimate from the train split for text)."""
        return self.metadata.get("unigram_entropy")

    @property
    def bigram_entropy(self) -> float | None:
        return self.metadata.get("bigram_entropy")

    def n_tokens(self, split: str) -> int:
        return len(self.tokens(split))

    def tokens(self, split: str) -> np.memmap:
        if split not in self._tokens:
            raise KeyError(f"unknown split {split!r} in {self.directory}; available: {self.splits}")
        return self._tokens[split]

    def _path(self, split: str) -> Path:
        return self.directory / f"{split}.bin"

    # -- batches
    def window_offsets(self, split: str, seed: int, step: int, batch_size: int, seq_len: int) -> np.ndarray:
        """Start offsets [batch_size] of the global batch's windows; pure in (seed, step, split)."""
        n = self.n_tokens(split)
        check_batch_args(seed, step, batch_size, seq_len)
        if seq_len + 1 > n:
            raise DataError(
                f"split {split!r} ({self._path(split)}) has {n} tokens, "
                f"fewer than seq_len + 1 = {seq_len + 1}"
            )
        rng = np.random.default_rng([seed, step, split_id(split)])
        return rng.integers(0, n - seq_len, size=batch_size)  # last valid start is n - (seq_len + 1)

    def batch(
        self,
        split: str,
        seed: int,
        step: int,
        batch_size: int,
        seq_len: int,
        *,
        process_index: int = 0,
        process_count: int = 1,
    ) -> np.ndarray:
        """int32 [batch_size // process_count, seq_len + 1] windows (inputs = [:, :-1], targets = [:, 1:]).

        ``batch_size`` is the GLOBAL batch; with ``process_count > 1`` this host gets rows
        ``[process_index * b, (process_index + 1) * b)`` with ``b = batch_size // process_count``.
        """
        offsets = self.window_offsets(split, seed, step, batch_size, seq_len)
        return self._gather(split, host_rows(offsets, process_index, process_count), seq_len)

    def n_windows(self, split: str, seq_len: int) -> int:
        """Distinct windows of ``seq_len`` + 1 tokens that ``sequential_batch`` cycles through (each window's
        last token is the next one's first)."""
        return (self.n_tokens(split) - 1) // seq_len

    def sequential_batch(
        self,
        split: str,
        index: int,
        batch_size: int,
        seq_len: int,
        *,
        process_index: int = 0,
        process_count: int = 1,
    ) -> np.ndarray:
        """Deterministic, seed-free eval batch: non-overlapping windows starting at (index * batch_size + b) *
        seq_len, wrapping around the split. Same shape and host slicing as ``batch``."""
        n = self.n_tokens(split)
        if seq_len + 1 > n:
            raise DataError(
                f"split {split!r} ({self._path(split)}) has {n} tokens, "
                f"fewer than seq_len + 1 = {seq_len + 1}"
            )
        n_windows = self.n_windows(split, seq_len)
        offsets = ((index * batch_size + np.arange(batch_size)) % n_windows) * seq_len
        return self._gather(split, host_rows(offsets, process_index, process_count), seq_len)

    def _gather(self, split: str, offsets: np.ndarray, seq_len: int) -> np.ndarray:
        mm = self.tokens(split)
        # Slice per row: contiguous reads are much cheaper on a memmap than one fancy-indexed gather.
        out = np.stack([mm[o : o + seq_len + 1] for o in offsets]).astype(np.int32)
        if out.size and int(out.max()) >= self.vocab_size:
            row, col = np.unravel_index(int(out.argmax()), out.shape)
            raise DataError(
                f"token id {int(out.max())} >= vocab_size {self.vocab_size} at position "
                f"{int(offsets[row]) + int(col)} of {self._path(split)}"
            )
        return out


def check_batch_args(seed: int, step: int, batch_size: int, seq_len: int) -> None:
    """The arguments every batch source (file windows, the synthetic stream) takes, checked alike."""
    if seq_len < 1 or batch_size < 1:
        raise ValueError(f"batch_size and seq_len must be >= 1, got {batch_size}, {seq_len}")
    if seed < 0 or step < 0:
        raise ValueError(f"seed and step must be >= 0, got seed={seed}, step={step}")


def host_rows(offsets: np.ndarray, process_index: int, process_count: int) -> np.ndarray:
    b = len(offsets)
    if process_count < 1 or not 0 <= process_index < process_count:
        raise ValueError(f"need 0 <= process_index < process_count, got {process_index}, {process_count}")
    if b % process_count:
        raise ValueError(f"global batch_size {b} is not divisible by process_count {process_count}")
    per = b // process_count
    return offsets[process_index * per : (process_index + 1) * per]


def _check_ids(mm: np.ndarray, vocab_size: int, path: Path) -> int:
    """Max token id of ``mm``, scanned in chunks; raises DataError naming ``path`` if any id >= vocab_size."""
    top = 0
    for lo in range(0, len(mm), _CHUNK):
        chunk = np.asarray(mm[lo : lo + _CHUNK])
        m = int(chunk.max())
        if m >= vocab_size:
            pos = lo + int(np.argmax(chunk >= vocab_size))
            raise DataError(f"token id {int(mm[pos])} >= vocab_size {vocab_size} at position {pos} of {path}")
        top = max(top, m)
    return top


# ---- writing -----------------------------------------------------------------------------------
def _start_writing(out_dir: Path) -> None:
    """Create ``out_dir`` and drop any old metadata first: metadata.json is written last, so an interrupted
    write leaves a directory that fails to open with a clear error, not stale metadata over new files."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / METADATA).unlink(missing_ok=True)


def _write_metadata(out_dir: Path, meta: dict) -> None:
    write_text_atomic(out_dir / METADATA, json.dumps(meta, indent=2, sort_keys=False) + "\n")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def write_split(out_dir: str | os.PathLike, split: str, tokens: np.ndarray, vocab_size: int) -> dict:
    """Write ``tokens`` as ``<out_dir>/<split>.bin``; returns its per-split metadata entries."""
    out_dir = Path(out_dir)
    tokens = np.asarray(tokens)
    if tokens.size == 0:
        raise DataError(f"refusing to write an empty split {split!r} to {out_dir}")
    if tokens.min() < 0 or tokens.max() >= vocab_size:
        raise DataError(f"split {split!r}: token ids must be in [0, {vocab_size}), got max {tokens.max()}")
    path = out_dir / f"{split}.bin"
    tokens.astype(token_dtype(vocab_size)).tofile(path)
    return {"n_tokens": int(tokens.size), "max_token_id": int(tokens.max()), "sha256": _sha256(path)}


def prepare_synthetic(
    out_dir: str | os.PathLike,
    *,
    vocab_size: int = 256,
    n_train_tokens: int = 2_000_000,
    n_val_tokens: int = 200_000,
    seed: int = 0,
    order: int = 2,
    weights: Sequence[float] | None = None,
    successors: Sequence[int] | None = None,
    buckets: Sequence[int | None] | None = None,
    zipf_exponent: float = 1.0,
    dirichlet_alpha: float = 0.5,
    chain_length: int = 8192,
    overwrite: bool = False,
    source: MarkovSourceConfig | None = None,
    progress: bool | None = None,
) -> dict:
    """Generate the synthetic corpus (see ``experiments.synthetic``) into ``out_dir``; returns its metadata.

    If ``out_dir`` already holds a dataset made with the same arguments it is reused (generation is
    deterministic, so this is only a cache); a different dataset there is an error unless ``overwrite``.
    ``weights``/``successors``/``buckets`` default to the ``MarkovSourceConfig`` defaults for ``order`` 2 and
    to (0.1, 0.9/k, ...), 4 successors, no hashing for other orders. ``source``, if given, is a complete
    ``MarkovSourceConfig`` that replaces all of the generator arguments (vocab_size ... seed).
    """
    out_dir = Path(out_dir)
    if source is not None:
        return prepare_synthetic(
            out_dir,
            n_train_tokens=n_train_tokens,
            n_val_tokens=n_val_tokens,
            chain_length=chain_length,
            overwrite=overwrite,
            progress=progress,
            **config_dict(source),
        )
    if order < 1:  # before the default weights divide by it
        raise ValueError(f"order must be >= 1, got {order}")
    defaults = MarkovSourceConfig()
    if weights is None:
        weights = defaults.weights if order == defaults.order else (0.1,) + (0.9 / order,) * order
    if successors is None:
        successors = defaults.successors if order == defaults.order else (4,) * order
    if buckets is None:
        buckets = (None,) * order
    cfg = MarkovSourceConfig(
        vocab_size=vocab_size,
        order=order,
        weights=tuple(float(w) for w in weights),
        successors=tuple(int(s) for s in successors),
        buckets=tuple(None if b is None else int(b) for b in buckets),
        zipf_exponent=float(zipf_exponent),
        dirichlet_alpha=float(dirichlet_alpha),
        seed=int(seed),
    )
    cfg.validate()
    generator = {**config_dict(cfg), "chain_length": int(chain_length)}
    sizes = {"train": int(n_train_tokens), "val": int(n_val_tokens)}
    for split, n in sizes.items():
        if n < 1:
            raise ValueError(f"n_{split}_tokens must be >= 1, got {n}")

    meta_path = out_dir / METADATA
    if meta_path.is_file() and not overwrite:
        try:
            old = json.loads(meta_path.read_text())
        except json.JSONDecodeError:
            old = {}
        if not (old.get("generator") == json.loads(json.dumps(generator)) and old.get("n_tokens") == sizes):
            raise DataError(
                f"{out_dir} already holds a different dataset ({meta_path}); "
                "pass overwrite=True or choose another out_dir"
            )
        TokenDataset.open(out_dir)  # validates sizes and ids of the cached files
        # ... and their content: a file altered in place keeps its size and id range
        hashes = old.get("sha256") or {}
        changed = [sp for sp, h in hashes.items() if _sha256(out_dir / f"{sp}.bin") != h]
        if not changed:
            return old
        warnings.warn(f"{out_dir}: {changed} differ from the sha256 recorded in {meta_path}; regenerating",
                      RuntimeWarning, stacklevel=2)

    _start_writing(out_dir)
    src = MarkovSource.create(cfg)
    ent = src.entropies()
    split_meta = {}
    for split, n in sizes.items():
        rng = np.random.default_rng(np.random.SeedSequence([cfg.seed, split_id(split), 0xDA7A]))
        show = progress if progress is not None else n >= 10_000_000 and sys.stderr.isatty()
        split_meta[split] = write_split(out_dir, split, src.sample(n, rng, chain_length, show), vocab_size)
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "vocab_size": vocab_size,
        "dtype": token_dtype(vocab_size),
        "n_tokens": {s: m["n_tokens"] for s, m in split_meta.items()},
        "max_token_id": {s: m["max_token_id"] for s, m in split_meta.items()},
        "sha256": {s: m["sha256"] for s, m in split_meta.items()},
        "tokenizer": {"type": "synthetic"},
        "source": describe(cfg),
        "entropy_rate": ent["entropy_rate"],
        "unigram_entropy": ent["unigram_entropy"],
        "bigram_entropy": ent["bigram_entropy"],
        "ngram_entropies": ent["ngram_entropies"],
        "entropy_units": "nats/token",
        "stationary": {"iterations": ent["stationary_iterations"], "l1_residual": ent["stationary_residual"]},
        # Chains are concatenated: this fraction of positions starts a fresh chain instead of continuing.
        "chain_boundary_fraction": (math.ceil(n_train_tokens / chain_length) - 1) / n_train_tokens,
        "generator": generator,
    }
    _write_metadata(out_dir, meta)
    return meta


# ---- text preparation --------------------------------------------------------------------------
def iter_pieces(paths: Sequence[Path], piece_chars: int = 1 << 22) -> Iterator[tuple[Path, str, bool]]:
    """``(path, text, ends_document)`` pieces of the input files, read incrementally so large files never sit
    in memory at once. A ``.jsonl`` file holds one document per line (its "text" field); any other file is one
    document, split into pieces at line boundaries (harmless for byte-level; for BPE it only stops merges
    across a newline, which byte-level pre-tokenisation mostly prevents anyway)."""
    for path in paths:
        try:
            with open(path, encoding="utf-8", errors="strict", newline="") as f:
                if path.suffix == ".jsonl":
                    for lineno, line in enumerate(f, start=1):
                        if not line.strip():
                            continue
                        try:
                            text = json.loads(line)["text"]
                        except (json.JSONDecodeError, KeyError, TypeError) as e:
                            msg = f"{path}:{lineno}: expected a JSON object with a 'text' field"
                            raise DataError(msg) from e
                        if not isinstance(text, str):
                            raise DataError(f"{path}:{lineno}: the 'text' field is not a string")
                        yield path, text, True
                    continue
                buf, size = [], 0
                for line in f:
                    buf.append(line)
                    size += len(line)
                    if size >= piece_chars:
                        yield path, "".join(buf), False
                        buf, size = [], 0
                yield path, "".join(buf), True
        except UnicodeDecodeError as e:
            raise DataError(f"input file {path} is not valid UTF-8: {e}") from e


def _check_inputs(inputs: Sequence[str | os.PathLike]) -> list[Path]:
    paths = [Path(p) for p in inputs]
    if not paths:
        raise DataError("no input files given")
    for p in paths:
        if not p.is_file():
            raise DataError(f"input file not found: {p}")
        if p.stat().st_size == 0:
            raise DataError(f"input file is empty: {p}")
    return paths


def prepare_text(
    inputs: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    *,
    tokenizer: str = "byte",
    vocab_size: int | None = None,
    tokenizer_file: str | os.PathLike | None = None,
    val_fraction: float = 0.01,
    pad_vocab_to: int = 64,
    progress: bool | None = None,
    overwrite: bool = False,
) -> dict:
    """Tokenise text files into ``out_dir`` (train.bin, val.bin, metadata.json); returns the metadata.

    An ``out_dir`` that already holds a dataset is refused unless ``overwrite``; the inputs and the tokenizer
    are checked before anything there is touched.

    Every document is followed by the end-of-text token. The validation split is the final ``val_fraction``
    of the concatenated token stream (contiguous, so train and val windows never overlap).
    ``vocab_size``: BPE target vocabulary when training; for byte-level it must be >= 257 if given. The model
    vocabulary written to the metadata is padded up to a multiple of ``pad_vocab_to``.
    """
    from tqdm.auto import tqdm

    paths = _check_inputs(inputs)
    out_dir = Path(out_dir)
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    if (out_dir / METADATA).is_file() and not overwrite:
        raise DataError(f"{out_dir} already holds a dataset ({out_dir / METADATA}); choose another --out or "
                        "pass --overwrite")
    if out_dir.exists() and not out_dir.is_dir():
        raise DataError(f"--out {out_dir} exists and is not a directory")
    total_bytes = sum(p.stat().st_size for p in paths)
    if progress is None:
        progress = total_bytes > 16 << 20 and sys.stderr.isatty()

    if tokenizer == "byte":
        tok = ByteTokenizer()
        if vocab_size is not None and vocab_size < tok.n_tokens:
            raise ValueError(f"byte-level tokenizer needs vocab_size >= {tok.n_tokens}, got {vocab_size}")
        model_vocab = padded_vocab_size(max(vocab_size or 0, tok.n_tokens), pad_vocab_to)
    elif tokenizer == "bpe":
        if tokenizer_file is not None:
            tok = BPETokenizer.from_file(tokenizer_file)
        else:
            tok = BPETokenizer.train((text for _, text, _ in iter_pieces(paths)), vocab_size or 8192)
        model_vocab = padded_vocab_size(tok.n_tokens, pad_vocab_to)
    else:
        raise ValueError(f"unknown tokenizer {tokenizer!r}; choose 'byte' or 'bpe'")

    _start_writing(out_dir)  # only now: the inputs and the tokenizer are known to be good
    if tokenizer == "bpe":
        tok.save(out_dir / "tokenizer.json")
    dtype = token_dtype(model_vocab)
    all_path = out_dir / "train.bin"
    counts = np.zeros(model_vocab, dtype=np.int64)
    n_total = 0
    eos = np.asarray([tok.eos_id], dtype=dtype)
    with open(all_path, "wb") as f, tqdm(
        total=total_bytes, unit="B", unit_scale=True, desc="tokenising", disable=not progress
    ) as bar:
        for _, text, ends_document in iter_pieces(paths):
            ids = tok.encode(text).astype(dtype)
            if ends_document:
                ids = np.concatenate([ids, eos])
            ids.tofile(f)
            counts += np.bincount(ids, minlength=model_vocab)
            n_total += ids.size
            bar.update(len(text.encode("utf-8")))

    n_val = max(1, round(val_fraction * n_total))
    n_train = n_total - n_val
    if n_train < 1:
        raise DataError(f"inputs {[str(p) for p in paths]} give only {n_total} tokens: too few to split")
    # Move the tail of the stream to val.bin, then cut it off train.bin (no second full copy of the data).
    itemsize = np.dtype(dtype).itemsize
    all_mm = np.memmap(all_path, dtype=dtype, mode="r")
    val_counts = np.zeros(model_vocab, dtype=np.int64)
    with open(out_dir / "val.bin", "wb") as f:
        for lo in range(n_train, n_total, _CHUNK):
            chunk = np.asarray(all_mm[lo : min(n_total, lo + _CHUNK)])
            chunk.tofile(f)
            val_counts += np.bincount(chunk, minlength=model_vocab)
    del all_mm
    os.truncate(all_path, n_train * itemsize)
    train_counts = counts - val_counts
    p = train_counts[train_counts > 0] / n_train
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "vocab_size": model_vocab,
        "dtype": dtype,
        "n_tokens": {"train": n_train, "val": n_total - n_train},
        "max_token_id": {
            "train": int(np.flatnonzero(train_counts).max()),
            "val": int(np.flatnonzero(val_counts).max()),
        },
        "tokenizer": {**tok.to_metadata(), "padded_to_multiple_of": pad_vocab_to},
        "source": "text: " + ", ".join(str(p) for p in paths)
        + (f" (tokenizer from {tokenizer_file})" if tokenizer_file is not None else ""),
        "input_files": [str(p) for p in paths],
        "val_fraction": val_fraction,
        "entropy_rate": None,
        # Plug-in estimate from the train split: the loss of the best context-free model on this data.
        "unigram_entropy": float(-(p * np.log(p)).sum()),
        "unigram_entropy_kind": "empirical (train split)",
        "bigram_entropy": None,
        "entropy_units": "nats/token",
    }
    _write_metadata(out_dir, meta)
    return meta


# ---- CLI ---------------------------------------------------------------------------------------
def _bucket(b: str) -> int | None:
    return None if b.lower() in ("none", "-") else int(b)


def _parse_list(flag: str, text: str | None, parse):
    """A comma-separated flag value, each entry parsed; a bad entry is an error naming the flag."""
    if text is None:
        return None
    try:
        return [parse(x.strip()) for x in text.split(",")]
    except ValueError as e:
        raise ValueError(f"{flag} {text!r}: {e}") from e


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m experiments.data", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)

    p = sub.add_parser("prepare", help="tokenise text files into train/val token streams")
    p.add_argument("--input", nargs="+", required=True, help="text files (.jsonl: one {'text': ...} a line)")
    p.add_argument("--out", required=True)
    p.add_argument("--tokenizer", choices=["byte", "bpe"], default="byte")
    p.add_argument("--vocab-size", type=int, default=None, help="BPE vocabulary to train (default 8192)")
    p.add_argument("--tokenizer-file", default=None, help="load a BPE tokenizer.json instead of training")
    p.add_argument("--val-fraction", type=float, default=0.01)
    p.add_argument("--pad-vocab-to", type=int, default=64, help="round the model vocab up to this multiple")
    p.add_argument("--overwrite", action="store_true", help="replace a dataset already in --out")

    s = sub.add_parser("synthetic", help="generate the synthetic Markov corpus with exact entropy rate")
    s.add_argument("--out", required=True)
    s.add_argument("--vocab-size", type=int, default=256)
    s.add_argument("--train-tokens", type=int, default=2_000_000)
    s.add_argument("--val-tokens", type=int, default=200_000)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--order", type=int, default=2)
    s.add_argument("--weights", default=None, help="comma-separated lambda_0..lambda_k")
    s.add_argument("--successors", default=None, help="comma-separated K_1..K_k")
    s.add_argument("--buckets", default=None, help="comma-separated M_1..M_k ('none' = no hashing)")
    s.add_argument("--zipf-exponent", type=float, default=1.0)
    s.add_argument("--dirichlet-alpha", type=float, default=0.5)
    s.add_argument("--overwrite", action="store_true")

    i = sub.add_parser("info", help="validate a dataset directory and print its metadata")
    i.add_argument("dir")

    args = ap.parse_args(argv)
    try:
        if args.cmd == "prepare":
            meta = prepare_text(
                args.input,
                args.out,
                tokenizer=args.tokenizer,
                vocab_size=args.vocab_size,
                tokenizer_file=args.tokenizer_file,
                val_fraction=args.val_fraction,
                pad_vocab_to=args.pad_vocab_to,
                overwrite=args.overwrite,
            )
        elif args.cmd == "synthetic":
            meta = prepare_synthetic(
                args.out,
                vocab_size=args.vocab_size,
                n_train_tokens=args.train_tokens,
                n_val_tokens=args.val_tokens,
                seed=args.seed,
                order=args.order,
                weights=_parse_list("--weights", args.weights, float),
                successors=_parse_list("--successors", args.successors, int),
                buckets=_parse_list("--buckets", args.buckets, _bucket),
                zipf_exponent=args.zipf_exponent,
                dirichlet_alpha=args.dirichlet_alpha,
                overwrite=args.overwrite,
            )
        else:
            meta = TokenDataset.open(args.dir).metadata
    except (DataError, ImportError, OSError, ValueError, RuntimeError) as e:  # named in the message
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(meta, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
