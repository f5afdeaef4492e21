"""Corpora, tokenizers and the memory-mapped token stream that training reads from."""

from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import torch

from layerlab.errors import LayerlabError
from layerlab.io import cache_dir, current_umask
from layerlab.tokenizer import (  # noqa: F401  (re-exported: data is where corpora and their tokenizers meet)
    EOS_TOKEN,
    ByteTokenizer,
    HFTokenizer,
    build_tokenizer,
    load_tokenizer,
    stream_tokenizer,
    token_dtype,
    train_bpe,
)

EMBEDDED = "embedded"
SUPPORTED_SUFFIXES = (".txt", ".jsonl", ".parquet")
VAL_FRACTION = 0.1  # the last 10% of a corpus' token stream is its validation split
# Bumped whenever the on-disk token format changes, so stale caches are never reused.
_CACHE_FORMAT = 1
# Documents are tokenized in groups of about this many bytes: big enough for encode_batch to use
# all cores, small enough that memory stays bounded however large the corpus is.
_ENCODE_GROUP_BYTES = 4 << 20


def embedded_documents() -> list[bytes]:
    """The default corpus: every topic of Python's ``pydoc_data.topics``, sorted by name, utf-8 encoded."""
    try:
        from pydoc_data.topics import topics
    except ImportError as exc:  # some distributions strip pydoc_data out of the standard library
        raise LayerlabError("the embedded corpus needs Python's pydoc_data module, which is missing") from exc
    return [topics[name].encode("utf-8") for name in sorted(topics)]


def _source_files(data: str | Path | None) -> list[Path] | None:
    """The files a data argument names, validated and sorted; None for the embedded corpus."""
    if data is None or (isinstance(data, str) and data == EMBEDDED):
        return None
    path = Path(data)
    if not path.exists():
        raise LayerlabError(f"data path does not exist: {path}")
    supported = ", ".join(SUPPORTED_SUFFIXES)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in SUPPORTED_SUFFIXES)
        if not files:
            raise LayerlabError(f"no data files ({supported}) found under directory {path}")
        return files
    if path.suffix.lower() not in SUPPORTED_SUFFIXES:
        raise LayerlabError(f"unsupported data file {path}: expected one of {supported}, or a directory")
    return [path]


def _jsonl_documents(path: Path) -> Iterator[bytes]:
    with path.open("rb") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError as exc:  # also covers lines that are not valid utf-8
                raise LayerlabError(f"{path}:{lineno}: line is not valid JSON ({exc})") from exc
            text = record.get("text") if isinstance(record, dict) else None
            if not isinstance(text, str):
                raise LayerlabError(f'{path}:{lineno}: JSON line has no "text" string field')
            yield text.encode("utf-8")


def _parquet_documents(path: Path) -> Iterator[bytes]:
    try:
        import pyarrow.parquet as pq
    except ImportError as exc:
        raise LayerlabError(f"reading {path} needs pyarrow: pip install pyarrow") from exc
    parquet = pq.ParquetFile(path)
    if "text" not in parquet.schema_arrow.names:
        raise LayerlabError(f'{path}: parquet file has no "text" column')
    # Record batches keep memory bounded for files far larger than RAM.
    for batch in parquet.iter_batches(batch_size=1024, columns=["text"]):
        for value in batch.column(0).to_pylist():
            if isinstance(value, str | bytes):  # None (a null row) is skipped
                yield value.encode("utf-8") if isinstance(value, str) else value
            elif value is not None:
                raise LayerlabError(f'{path}: "text" column holds {type(value).__name__}, not strings')


def iter_documents(data: str | Path | None) -> Iterator[bytes]:
    """Yield the raw bytes of each document in ``data``: None/"embedded", a file, or a directory of files."""
    files = _source_files(data)
    if files is None:
        yield from embedded_documents()
        return
    for path in files:
        suffix = path.suffix.lower()
        if suffix == ".txt":
            # Raw bytes, never decoded: a stray non-UTF-8 byte must not stop a run.
            yield path.read_bytes()
        elif suffix == ".jsonl":
            yield from _jsonl_documents(path)
        else:
            yield from _parquet_documents(path)


def head_documents(data: str | Path | None, fraction: float) -> Iterator[bytes]:
    """The documents of ``data`` up to the first ``fraction`` of its bytes (the last one cut there).

    A tokenizer trained on these never sees the tail that becomes the validation split (the
    split is by tokens, so the boundary is approximate). Reads the data twice: once to count.
    """
    limit = int(sum(len(d) for d in iter_documents(data)) * fraction)
    for doc in iter_documents(data):
        if limit <= 0:
            return
        yield doc[:limit]
        limit -= len(doc)


def tail_documents(data: str | Path | None, fraction: float) -> Iterator[bytes]:
    """The documents of ``data`` from the last ``fraction`` of its bytes on (the first one cut there):
    the text :func:`head_documents` with ``1 - fraction`` leaves out. Reads the data twice."""
    skip = int(sum(len(d) for d in iter_documents(data)) * (1 - fraction))
    for doc in iter_documents(data):
        if skip >= len(doc):
            skip -= len(doc)
            continue
        yield doc[skip:]
        skip = 0


def _grouped(documents: Iterable[bytes]) -> Iterator[list[bytes]]:
    group: list[bytes] = []
    size = 0
    for doc in documents:
        if not doc:  # an empty document would add a lone eos and nothing to learn from
            continue
        group.append(doc)
        size += len(doc)
        if size >= _ENCODE_GROUP_BYTES:
            yield group
            group, size = [], 0
    if group:
        yield group


class TokenData:
    """Tokens of a corpus in a memory-mapped file, split deterministically: the last ``val_fraction``
    (default 0.1) of the token stream is validation."""

    def __init__(self, path: Path, n_tokens: int, n_bytes: int, dtype, val_fraction: float = VAL_FRACTION):
        if not 0.0 < val_fraction < 1.0:
            raise LayerlabError(f"val_fraction must be between 0 and 1 (exclusive), got {val_fraction}")
        self.path = Path(path)
        self.n_tokens = n_tokens
        self.n_bytes = n_bytes
        self.tokens = np.memmap(self.path, dtype=dtype, mode="r", shape=(n_tokens,))
        n_val = int(n_tokens * val_fraction)
        self.train = self.tokens[: n_tokens - n_val]
        self.val = self.tokens[n_tokens - n_val :]

    @property
    def bytes_per_token(self) -> float:
        """Raw corpus bytes per token, to turn a loss in nats/token into bits per byte."""
        return self.n_bytes / self.n_tokens

    @classmethod
    def prepare(
        cls, data: str | Path | None, tokenizer, cache_dir: Path, val_fraction: float = VAL_FRACTION
    ) -> TokenData:
        """Tokenize ``data`` once into ``cache_dir`` (reused on later calls) and memory-map it."""
        files = _source_files(data)
        if files is None:
            sources: list = [EMBEDDED, sys.version]
        else:
            # Size and mtime stand in for content so that an edited file invalidates the cache.
            sources = [[str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns] for p in files]
        ident = [_CACHE_FORMAT, tokenizer.name, tokenizer.fingerprint, sources]
        key = hashlib.sha256(json.dumps(ident).encode("utf-8")).hexdigest()[:16]
        cache_dir = Path(cache_dir)
        bin_path = cache_dir / f"tokens-{key}.bin"
        meta_path = cache_dir / f"tokens-{key}.json"
        dtype = token_dtype(tokenizer.vocab_size)
        itemsize = np.dtype(dtype).itemsize
        # The sidecar is written last, so its presence means the token file is complete.
        if bin_path.exists() and meta_path.exists():
            meta = json.loads(meta_path.read_text())
            if bin_path.stat().st_size == meta["n_tokens"] * itemsize:
                return cls(bin_path, meta["n_tokens"], meta["n_bytes"], dtype, val_fraction)

        cache_dir.mkdir(parents=True, exist_ok=True)
        n_tokens = n_bytes = 0
        eos = np.array([tokenizer.eos_id], dtype=dtype)
        fd, tmp_name = tempfile.mkstemp(prefix=f"tokens-{key}.", suffix=".tmp", dir=cache_dir)
        os.chmod(tmp_name, 0o666 & ~current_umask())  # mkstemp makes 0600: a shared cache must stay readable
        try:
            with os.fdopen(fd, "wb") as out:
                # Written group by group: only one group of documents is ever in memory.
                for group in _grouped(iter_documents(data)):
                    for doc, ids in zip(group, tokenizer.encode_batch(group)):
                        out.write(ids.astype(dtype, copy=False).tobytes())
                        out.write(eos.tobytes())
                        n_tokens += len(ids) + 1
                        n_bytes += len(doc)
            if n_bytes == 0:
                raise LayerlabError(f"data is empty: {data} holds no text")
            os.replace(tmp_name, bin_path)
        finally:
            if os.path.exists(tmp_name):
                os.unlink(tmp_name)
        meta = {"n_tokens": n_tokens, "n_bytes": n_bytes, "tokenizer": tokenizer.name}
        meta_tmp = meta_path.with_name(meta_path.name + ".tmp")
        meta_tmp.write_text(json.dumps(meta) + "\n")
        os.replace(meta_tmp, meta_path)
        return cls(bin_path, n_tokens, n_bytes, dtype, val_fraction)

    def _split(self, split: str) -> np.ndarray:
        splits = {"train": self.train, "val": self.val, "validation": self.val}
        if split not in splits:
            raise LayerlabError(f"unknown split {split!r}; valid: train, val")
        return splits[split]

    def check_length(self, seq_len: int) -> None:
        """Raise if either split is too short to hold one window of ``seq_len`` inputs plus a target."""
        for name, tokens in (("training", self.train), ("validation", self.val)):
            if len(tokens) < seq_len + 1:
                raise LayerlabError(
                    f"data too short: {name} split has {len(tokens)} tokens, need at least {seq_len + 1} "
                    f"for one context window of {seq_len}; give more data or a smaller --context"
                )

    @staticmethod
    def _windows(
        tokens: np.ndarray, starts: Iterable[int], seq_len: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        rows = np.stack([tokens[s : s + seq_len + 1] for s in starts]).astype(np.int64)
        return torch.from_numpy(rows[:, :-1].copy()), torch.from_numpy(rows[:, 1:].copy())

    def get_batch(
        self, split: str, batch_size: int, seq_len: int, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``batch_size`` random windows (x, y = x shifted by one) from ``split``, as int64 CPU tensors."""
        tokens = self._split(split)
        self.check_length(seq_len)
        starts = torch.randint(0, len(tokens) - seq_len, (batch_size,), generator=generator)
        return self._windows(tokens, starts.tolist(), seq_len)

    def iter_eval_batches(
        self, batch_size: int, seq_len: int, max_batches: int | None = None
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Consecutive non-overlapping windows over the validation split, the same on every call."""
        self.check_length(seq_len)
        n_windows = (len(self.val) - 1) // seq_len
        starts = [i * seq_len for i in range(n_windows)]
        for b, first in enumerate(range(0, n_windows, batch_size)):
            if max_batches is not None and b >= max_batches:
                return
            yield self._windows(self.val, starts[first : first + batch_size], seq_len)


SPLITS = ("validation", "train", "all")


def default_split(data: str | Path | None) -> str:
    """``validation`` for the embedded corpus (layerlab trains on the rest); all of a user's own text."""
    return "validation" if data is None or data == EMBEDDED else "all"


def split_ids(tokenizer, data: str | Path | None = None, split: str = "validation") -> np.ndarray:
    """Token ids of one split of ``data`` (default: the embedded corpus), exactly as training sees them:
    every document's ids followed by eos, the last ``VAL_FRACTION`` of that stream being ``validation``,
    the rest ``train``; ``all`` is the whole stream. Tokenized once per tokenizer and corpus, then cached."""
    if split not in SPLITS:
        raise LayerlabError(f"unknown split {split!r}; valid: {', '.join(SPLITS)}")
    tokens = TokenData.prepare(data, stream_tokenizer(tokenizer), cache_dir())
    return {"validation": tokens.val, "train": tokens.train, "all": tokens.tokens}[split]


def describe_slice(data: str | Path | None, split: str, used: int, available: int) -> str:
    """How a figure's text is named wherever it is printed, e.g. ``embedded validation split, all 46,557
    tokens`` or ``corpus.txt (all), first 8,192 of 120,000 tokens``."""
    source = "embedded" if data is None or data == EMBEDDED else str(data)
    part = f"{source} {split} split" if split != "all" else f"{source} (all)"
    amount = f"all {available:,} tokens" if used >= available else f"first {used:,} of {available:,} tokens"
    return f"{part}, {amount}"


DEFAULT_SEQ_LEN = 256  # tokens per measuring window of a causal LM, unless its context is shorter
ENCODER_SEQ_LEN = 128  # ... and of an encoder, [CLS] and [SEP] included


def window_length(config, causal: bool = True, seq_len: int | None = None) -> int:
    """``seq_len`` if given, else the default measuring window for a model with this Hugging Face ``config``:
    :data:`DEFAULT_SEQ_LEN` tokens (:data:`ENCODER_SEQ_LEN` for encoders), never past its context."""
    if seq_len:
        return seq_len
    context = getattr(config, "max_position_embeddings", None) or DEFAULT_SEQ_LEN
    return min(DEFAULT_SEQ_LEN if causal else ENCODER_SEQ_LEN, context)


def measure_ids(tokenizer, data: str | Path | None, tokens: int, split: str | None = None) -> list[int]:
    """The first ``2 * tokens`` token ids of ``split`` of ``data`` (:func:`split_ids`; by default
    :func:`default_split`: the embedded corpus' validation split, or all of a user's text), the text a
    measurement reads. ``split="validation"`` is what the compressors' perplexities read, so that the text
    they calibrate or fine-tune on, the first 90%, is never the text they are judged on."""
    return split_ids(tokenizer, data, split or default_split(data))[: 2 * tokens].tolist()


def batches(tokenizer, ids: list[int], tokens: int, seq_len: int, batch_size: int,
            causal: bool = True) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(input_ids, attention_mask) batches of consecutive ``seq_len`` windows holding ``tokens`` real tokens
    in all, each (B, seq_len).

    Encoders (``causal`` False) get [CLS] ... [SEP] around each window; a short last window is
    right-padded, which the measures skip through the mask.
    """
    special = [] if causal else [tokenizer.cls_token_id, tokenizer.sep_token_id]
    if any(s is None for s in special):
        special = []
    body = seq_len - len(special)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    rows, masks, used = [], [], 0
    for start in range(0, len(ids), body):
        window = ids[start:start + body][: max(tokens - used - len(special), 1)]
        if len(window) < 2:
            break
        row = [special[0], *window, special[1]] if special else window
        used += len(row)
        masks.append([1] * len(row) + [0] * (seq_len - len(row)))
        rows.append(row + [pad] * (seq_len - len(row)))
        if len(rows) == batch_size or used >= tokens:
            yield torch.tensor(rows), torch.tensor(masks)
            rows, masks = [], []
        if used >= tokens:
            return
    if rows:
        yield torch.tensor(rows), torch.tensor(masks)
