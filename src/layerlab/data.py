"""Corpora, tokenizers and the memory-mapped token stream that training reads from."""

from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np
import torch

from layerlab.errors import LayerlabError
from layerlab.io import cache_dir, current_umask

EMBEDDED = "embedded"
EOS_TOKEN = "<|endoftext|>"
SUPPORTED_SUFFIXES = (".txt", ".jsonl", ".parquet")
VAL_FRACTION = 0.1  # the last 10% of a corpus' token stream is its validation split
# Bumped whenever the on-disk token format changes, so stale caches are never reused.
_CACHE_FORMAT = 1
# Documents are tokenized in groups of about this many bytes: big enough for encode_batch to use
# all cores, small enough that memory stays bounded however large the corpus is.
_ENCODE_GROUP_BYTES = 4 << 20
_HF_MAX_LENGTH = int(1e30)  # the value transformers itself uses for "no limit"


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


def token_dtype(vocab_size: int) -> type[np.unsignedinteger]:
    """The smallest unsigned dtype that holds every id of a vocabulary this size."""
    return np.uint16 if vocab_size <= 1 << 16 else np.uint32


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table that ByteLevel pre-tokenizers work in."""
    # Printable Latin-1 bytes stand for themselves; the rest are shifted up past 255 in byte order.
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in keep}
    shifted = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + shifted)
            shifted += 1
    return table


def _write_hf_files(directory: Path, tokenizer, layerlab_name: str) -> None:
    """Save ``tokenizer`` with the config files ``AutoTokenizer.from_pretrained`` needs."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(directory / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": EOS_TOKEN,
        "bos_token": None,
        "add_bos_token": False,
        "add_eos_token": False,
        "model_max_length": _HF_MAX_LENGTH,
        # Without this, decode would rewrite " ." to "." and break round trips.
        "clean_up_tokenization_spaces": False,
        # A literal "<|endoftext|>" in text is text, as in layerlab's own encode; eos is only appended.
        "split_special_tokens": True,
        "layerlab_tokenizer": layerlab_name,
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (directory / "special_tokens_map.json").write_text(json.dumps({"eos_token": EOS_TOKEN}, indent=2) + "\n")


class ByteTokenizer:
    """Byte-level tokenizer: id == byte value (0..255), plus eos ``<|endoftext|>`` = 256."""

    name = "byte"
    vocab_size = 257
    eos_id = 256
    fingerprint = "byte-v1"

    def encode(self, text: str | bytes) -> np.ndarray:
        """Ids of ``text``; bytes are used as they are, str is utf-8 encoded first."""
        raw = text.encode("utf-8") if isinstance(text, str) else bytes(text)
        return np.frombuffer(raw, dtype=np.uint8).astype(np.uint16)

    def encode_batch(self, texts: list[bytes]) -> list[np.ndarray]:
        """``encode`` of each text."""
        return [self.encode(t) for t in texts]

    def decode(self, ids) -> str:
        """Text of ``ids``; eos (and any id past the bytes) is dropped, bad utf-8 becomes U+FFFD."""
        arr = np.asarray(ids).reshape(-1)
        arr = arr[(arr >= 0) & (arr < 256)]
        return arr.astype(np.uint8).tobytes().decode("utf-8", errors="replace")

    def save(self, directory: Path) -> None:
        """Write Hugging Face tokenizer files that reproduce these ids exactly."""
        from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

        # A merge-free BPE over the ByteLevel alphabet is a pure byte lookup.
        vocab = {char: byte for byte, char in _bytes_to_unicode().items()}
        tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
        # No regex split and no prefix space: every byte of the input maps to exactly one id.
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        tokenizer.decoder = decoders.ByteLevel()
        tokenizer.add_special_tokens([AddedToken(EOS_TOKEN, special=True, normalized=False)])
        _write_hf_files(directory, tokenizer, self.name)


class HFTokenizer:
    """A ``tokenizers.Tokenizer`` behind the same interface as ``ByteTokenizer``."""

    def __init__(self, tokenizer, name: str, eos_token: str = EOS_TOKEN):
        eos_id = tokenizer.token_to_id(eos_token)
        if eos_id is None:
            raise LayerlabError(f"tokenizer {name!r} has no end-of-text token {eos_token!r}")
        # Literal special-token text in a document stays text; only prepare() appends eos.
        tokenizer.encode_special_tokens = True
        self.tokenizer = tokenizer
        self.name = name
        self.eos_id = eos_id
        self.vocab_size = tokenizer.get_vocab_size()
        self.fingerprint = hashlib.sha256(tokenizer.to_str().encode("utf-8")).hexdigest()
        self._dtype = token_dtype(self.vocab_size)

    def encode(self, text: str | bytes) -> np.ndarray:
        """Ids of ``text``; bytes are decoded as utf-8 (bad bytes become U+FFFD) first."""
        if not isinstance(text, str):
            text = bytes(text).decode("utf-8", errors="replace")
        return np.asarray(self.tokenizer.encode(text, add_special_tokens=False).ids, dtype=self._dtype)

    def encode_batch(self, texts: list[bytes]) -> list[np.ndarray]:
        """``encode`` of each text, in parallel."""
        strs = [t.decode("utf-8", errors="replace") if isinstance(t, bytes) else t for t in texts]
        # no post-processor tokens ([CLS], <s>): a document is its text, and prepare() appends eos
        encoded = self.tokenizer.encode_batch(strs, add_special_tokens=False)
        return [np.asarray(e.ids, dtype=self._dtype) for e in encoded]

    def decode(self, ids) -> str:
        """Text of ``ids``, special tokens dropped."""
        return self.tokenizer.decode([int(i) for i in np.asarray(ids).reshape(-1)], skip_special_tokens=True)

    def save(self, directory: Path) -> None:
        """Write ``tokenizer.json`` and the config files ``AutoTokenizer`` reads."""
        _write_hf_files(directory, self.tokenizer, self.name)


def train_bpe(documents: Iterable[bytes], vocab_size: int) -> HFTokenizer:
    """Train a byte-level BPE tokenizer of ``vocab_size`` ids (including eos) on ``documents``."""
    if vocab_size < 257:
        raise LayerlabError(f"bpe vocab size {vocab_size} is too small: need at least 257 (256 bytes + eos)")
    if vocab_size > 1 << 16:
        raise LayerlabError(f"bpe vocab size {vocab_size} is too large: at most 65536 so ids fit in 16 bits")
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    texts = (d.decode("utf-8", errors="replace") if isinstance(d, bytes) else d for d in documents)
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return HFTokenizer(tokenizer, f"bpe:{vocab_size}")


def build_tokenizer(
    spec: str, documents_factory: Callable[[], Iterable[bytes]]
) -> ByteTokenizer | HFTokenizer:
    """Make the tokenizer ``spec`` names: "byte", or "bpe:N" trained on ``documents_factory()``."""
    if spec == "byte":
        return ByteTokenizer()
    kind, _, size = spec.partition(":")
    if kind == "bpe" and size.strip().isdigit():
        return train_bpe(documents_factory(), int(size))
    raise LayerlabError(f"unknown tokenizer {spec!r}; valid: byte, bpe:N (N an integer, e.g. bpe:8192)")


def load_tokenizer(directory: Path) -> ByteTokenizer | HFTokenizer:
    """Restore a tokenizer written by ``save`` (or any directory holding a tokenizer.json)."""
    directory = Path(directory)
    config_path = directory / "tokenizer_config.json"
    config = json.loads(config_path.read_text()) if config_path.exists() else {}
    name = config.get("layerlab_tokenizer")
    if name == "byte":
        return ByteTokenizer()
    json_path = directory / "tokenizer.json"
    if not json_path.exists():
        raise LayerlabError(f"no tokenizer found in {directory}: tokenizer.json is missing")
    from tokenizers import Tokenizer

    eos = config.get("eos_token") or EOS_TOKEN
    if isinstance(eos, dict):  # older transformers saved AddedToken dicts here
        eos = eos.get("content", EOS_TOKEN)
    return HFTokenizer(Tokenizer.from_file(str(json_path)), name or f"hf:{directory.name}", eos)


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


def stream_tokenizer(tokenizer) -> ByteTokenizer | HFTokenizer:
    """layerlab's tokenizer interface for ``tokenizer``: one of layerlab's own, or a transformers
    tokenizer (a layerlab byte tokenizer saved in a model directory becomes :class:`ByteTokenizer`
    again, so a run's own token stream, and so its validation split, is the one training used)."""
    if isinstance(tokenizer, ByteTokenizer | HFTokenizer):
        return tokenizer
    if getattr(tokenizer, "init_kwargs", {}).get("layerlab_tokenizer") == "byte":
        return ByteTokenizer()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise LayerlabError(f"{type(tokenizer).__name__} is not a fast (tokenizers-backed) tokenizer")
    eos = tokenizer.eos_token or tokenizer.sep_token  # encoders join documents with their separator
    if eos is None:
        raise LayerlabError("the tokenizer has no end-of-text or separator token to join documents with")
    from tokenizers import Tokenizer

    # a copy: HFTokenizer changes how special-token text is encoded, and the caller's tokenizer stays as it is
    copy = Tokenizer.from_str(backend.to_str())
    copy.no_truncation()  # encoders' tokenizers cut every text at their maximum length, 512 for BERT
    copy.no_padding()
    return HFTokenizer(copy, "hf", eos)


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
