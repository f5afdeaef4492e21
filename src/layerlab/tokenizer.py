"""Tokenizers: layerlab's byte-level one, BPE trained on a corpus, and any transformers tokenizer behind the
same small interface (``encode``, ``encode_batch``, ``decode``, ``eos_id``, ``vocab_size``, ``name``,
``fingerprint``), saved in the Hugging Face files a model directory holds."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

from .errors import EXPECTED_TOKENIZER_FILES, LayerlabError

EOS_TOKEN = "<|endoftext|>"
_HF_MAX_LENGTH = int(1e30)  # the value transformers itself uses for "no limit"


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

    eos = config.get("eos_token") or EOS_TOKEN
    if isinstance(eos, dict):  # older transformers saved AddedToken dicts here
        eos = eos.get("content", EOS_TOKEN)
    return HFTokenizer(Tokenizer.from_file(str(json_path)), name or f"hf:{directory.name}", eos)


def stream_tokenizer(tokenizer) -> ByteTokenizer | HFTokenizer:
    """layerlab's tokenizer interface for ``tokenizer``: one of layerlab's own, or a transformers
    tokenizer (a layerlab byte tokenizer saved in a model directory becomes :class:`ByteTokenizer`
    again, so a run's own token stream, and so its validation split, is the one training used)."""
    if isinstance(tokenizer, ByteTokenizer | HFTokenizer):
        return tokenizer
    if tokenizer is None:  # a model directory without one (``load_model(..., need_tokenizer=False)``)
        raise LayerlabError(f"no tokenizer to read text with: a model directory holds it as {EXPECTED_TOKENIZER_FILES}")
    if getattr(tokenizer, "init_kwargs", {}).get("layerlab_tokenizer") == "byte":
        return ByteTokenizer()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise LayerlabError(f"{type(tokenizer).__name__} is not a fast (tokenizers-backed) tokenizer")
    eos = tokenizer.eos_token or tokenizer.sep_token  # encoders join documents with their separator
    if eos is None:
        raise LayerlabError("the tokenizer has no end-of-text or separator token to join documents with")

    # a copy: HFTokenizer changes how special-token text is encoded, and the caller's tokenizer stays as it is
    copy = Tokenizer.from_str(backend.to_str())
    copy.no_truncation()  # encoders' tokenizers cut every text at their maximum length, 512 for BERT
    copy.no_padding()
    return HFTokenizer(copy, "hf", eos)
