"""Tests for corpora, tokenizers and the memory-mapped token stream."""

import json
import os

import numpy as np
import pytest
import torch

from layerlab.data import (
    EMBEDDED,
    ByteTokenizer,
    HFTokenizer,
    TokenData,
    build_tokenizer,
    embedded_documents,
    iter_documents,
    load_tokenizer,
    train_bpe,
)
from layerlab.errors import LayerlabError

SAMPLES = ["hello world", "héllo wörld ✓\n\tx", "  two  spaces . and\r\n crlf", "emoji 😀 ñ 日本語", ""]


@pytest.fixture(scope="module")
def bpe() -> HFTokenizer:
    return train_bpe(embedded_documents()[:15], 300)


def _auto_tokenizer(directory):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(directory))


# --- corpus -----------------------------------------------------------------------------------------


def test_embedded_corpus_is_deterministic_and_large():
    docs = embedded_documents()
    assert docs == embedded_documents()
    assert len(docs) > 50
    assert all(isinstance(d, bytes) and d for d in docs)
    assert sum(len(d) for d in docs) > 400_000
    assert list(iter_documents(None)) == docs
    assert list(iter_documents(EMBEDDED)) == docs


def test_embedded_split_sizes_and_val_is_tail(tmp_path):
    data = TokenData.prepare(None, ByteTokenizer(), tmp_path)
    assert len(data.train) + len(data.val) == data.n_tokens
    assert len(data.val) == int(data.n_tokens * 0.1)
    assert np.array_equal(data.val, data.tokens[-len(data.val) :])
    assert np.array_equal(data.train, data.tokens[: len(data.train)])
    docs = embedded_documents()
    assert data.n_bytes == sum(len(d) for d in docs)
    # The byte tokenizer adds exactly one eos per document.
    assert data.n_tokens == data.n_bytes + len(docs)
    assert data.bytes_per_token == pytest.approx(data.n_bytes / data.n_tokens)


# --- byte tokenizer ---------------------------------------------------------------------------------


def test_byte_tokenizer_round_trip():
    tok = ByteTokenizer()
    assert tok.vocab_size == 257 and tok.eos_id == 256 and tok.name == "byte"
    for text in SAMPLES:
        ids = tok.encode(text)
        assert ids.tolist() == list(text.encode("utf-8"))
        assert tok.decode(ids) == text
    assert tok.decode([*tok.encode("ab").tolist(), tok.eos_id]) == "ab"
    assert tok.decode(torch.tensor([104, 105])) == "hi"


def test_byte_tokenizer_non_utf8_bytes():
    tok = ByteTokenizer()
    raw = b"\xff\xfe abc"
    ids = tok.encode(raw)
    assert ids.tolist() == [0xFF, 0xFE, 32, 97, 98, 99]
    assert tok.decode(ids) == "\ufffd\ufffd abc"


def test_byte_tokenizer_hf_parity(tmp_path):
    tok = ByteTokenizer()
    tok.save(tmp_path)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        assert (tmp_path / name).exists()
    hf = _auto_tokenizer(tmp_path)
    assert hf.eos_token == "<|endoftext|>" and hf.eos_token_id == 256
    for text in [*SAMPLES, "\x00\x01\x7f control", "literal <|endoftext|> stays text"]:
        ids = hf.encode(text)
        assert ids == tok.encode(text).tolist(), text
        assert hf.decode(ids) == text
    assert hf.decode([104, 105, 256], skip_special_tokens=True) == "hi"
    restored = load_tokenizer(tmp_path)
    assert isinstance(restored, ByteTokenizer)


def test_byte_table_matches_bytelevel_alphabet():
    from tokenizers.pre_tokenizers import ByteLevel

    from layerlab.tokenizer import _bytes_to_unicode

    table = _bytes_to_unicode()
    assert sorted(table) == list(range(256))
    assert set(table.values()) == set(ByteLevel.alphabet())
    assert table[ord("A")] == "A" and table[ord(" ")] == "\u0120"


# --- bpe --------------------------------------------------------------------------------------------


def test_bpe_train_round_trip_and_determinism(bpe):
    assert bpe.vocab_size == 300
    assert bpe.name == "bpe:300"
    assert bpe.decode([bpe.eos_id]) == ""
    for text in SAMPLES:
        assert bpe.decode(bpe.encode(text)) == text
    # Merges make common text shorter than its bytes.
    text = "the return statement of the function"
    assert len(bpe.encode(text)) < len(text.encode("utf-8"))
    again = train_bpe(embedded_documents()[:15], 300)
    assert again.fingerprint == bpe.fingerprint


def test_bpe_hf_parity_and_load(tmp_path, bpe):
    bpe.save(tmp_path)
    hf = _auto_tokenizer(tmp_path)
    for text in [*SAMPLES, "def f(x):\n    return x  # ok", "literal <|endoftext|> stays text"]:
        ids = hf.encode(text)
        assert ids == bpe.encode(text).tolist(), text
        assert hf.decode(ids) == text
    restored = load_tokenizer(tmp_path)
    assert isinstance(restored, HFTokenizer)
    assert restored.name == "bpe:300"
    assert restored.fingerprint == bpe.fingerprint
    assert restored.encode("héllo").tolist() == bpe.encode("héllo").tolist()


def test_bpe_encode_bytes_replaces_bad_utf8(bpe):
    assert bpe.decode(bpe.encode(b"\xff abc")) == "\ufffd abc"


def test_bpe_vocab_size_limits():
    with pytest.raises(LayerlabError, match="too small"):
        train_bpe([b"abc"], 100)
    with pytest.raises(LayerlabError, match="too large"):
        train_bpe([b"abc"], 70_000)


def test_build_tokenizer_specs():
    assert isinstance(build_tokenizer("byte", lambda: []), ByteTokenizer)
    tok = build_tokenizer("bpe:260", lambda: embedded_documents()[:3])
    assert tok.vocab_size == 260
    for spec in ("bpe", "bpe:x", "wordpiece", "bpe:-5"):
        with pytest.raises(LayerlabError, match="valid: byte, bpe:N"):
            build_tokenizer(spec, lambda: [])


def test_load_tokenizer_missing(tmp_path):
    with pytest.raises(LayerlabError, match="tokenizer.json is missing"):
        load_tokenizer(tmp_path)


# --- documents --------------------------------------------------------------------------------------


def _write_parquet(path, texts):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    pq.write_table(pa.table({"text": texts, "id": list(range(len(texts)))}), path, row_group_size=2)


def test_iter_documents_files_and_directory(tmp_path):
    (tmp_path / "b.txt").write_bytes(b"raw \xff text")
    lines = [json.dumps({"text": "first"}), "", json.dumps({"text": "sécond", "extra": 1})]
    (tmp_path / "a.jsonl").write_text("\n".join(lines) + "\n")
    sub = tmp_path / "sub"
    sub.mkdir()
    _write_parquet(sub / "c.parquet", ["p1", "p2", None, "p3 ✓"])
    (tmp_path / "notes.md").write_text("ignored")

    assert list(iter_documents(tmp_path / "b.txt")) == [b"raw \xff text"]
    assert list(iter_documents(str(tmp_path / "a.jsonl"))) == [b"first", "sécond".encode()]
    assert list(iter_documents(sub / "c.parquet")) == [b"p1", b"p2", "p3 ✓".encode()]
    # Directory: recursive, sorted by path (a.jsonl, b.txt, sub/c.parquet), other files skipped.
    assert list(iter_documents(tmp_path)) == [
        b"first",
        "sécond".encode(),
        b"raw \xff text",
        b"p1",
        b"p2",
        "p3 ✓".encode(),
    ]


def test_iter_documents_errors(tmp_path):
    with pytest.raises(LayerlabError, match="does not exist"):
        list(iter_documents(tmp_path / "nope.txt"))
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.md").write_text("x")
    with pytest.raises(LayerlabError, match="no data files"):
        list(iter_documents(empty))
    csv = tmp_path / "data.csv"
    csv.write_text("a,b")
    with pytest.raises(LayerlabError, match=r"unsupported data file .*\.txt, \.jsonl, \.parquet"):
        list(iter_documents(csv))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{not json\n')
    with pytest.raises(LayerlabError, match=r"bad\.jsonl:2: line is not valid JSON"):
        list(iter_documents(bad))
    notext = tmp_path / "notext.jsonl"
    notext.write_text('{"body": "x"}\n')
    with pytest.raises(LayerlabError, match=r"notext\.jsonl:1: .*\"text\" string field"):
        list(iter_documents(notext))
    nocol = tmp_path / "nocol.parquet"
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": ["x"]}), nocol)
    with pytest.raises(LayerlabError, match='no "text" column'):
        list(iter_documents(nocol))


# --- token data -------------------------------------------------------------------------------------


@pytest.fixture
def small_corpus(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_bytes(bytes(range(256)) * 40)
    return path


def test_prepare_reuses_cache(tmp_path, small_corpus):
    cache = tmp_path / "cache"
    first = TokenData.prepare(small_corpus, ByteTokenizer(), cache)
    bins = list(cache.glob("tokens-*.bin"))
    assert len(bins) == 1 and first.path == bins[0]
    assert not list(cache.glob("*.tmp"))
    mtime = os.stat(first.path).st_mtime_ns
    meta = json.loads(first.path.with_suffix(".json").read_text())
    assert meta == {"n_tokens": 256 * 40 + 1, "n_bytes": 256 * 40, "tokenizer": "byte"}
    second = TokenData.prepare(small_corpus, ByteTokenizer(), cache)
    assert second.path == first.path
    assert os.stat(second.path).st_mtime_ns == mtime
    assert second.n_tokens == first.n_tokens
    assert isinstance(second.train, np.memmap) and second.train.dtype == np.uint16
    assert second.tokens[-1] == ByteTokenizer.eos_id
    # A different tokenizer gets its own cache file.
    TokenData.prepare(small_corpus, train_bpe([small_corpus.read_bytes()], 270), cache)
    assert len(list(cache.glob("tokens-*.bin"))) == 2


def test_prepare_invalidated_by_edit(tmp_path, small_corpus):
    cache = tmp_path / "cache"
    first = TokenData.prepare(small_corpus, ByteTokenizer(), cache)
    small_corpus.write_bytes(b"different and longer " * 600)
    second = TokenData.prepare(small_corpus, ByteTokenizer(), cache)
    assert second.path != first.path
    assert second.n_bytes == 21 * 600


def test_get_batch_shapes_shift_and_determinism(tmp_path, small_corpus):
    data = TokenData.prepare(small_corpus, ByteTokenizer(), tmp_path / "cache")
    x, y = data.get_batch("train", 4, 16, torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (4, 16)
    assert x.dtype == y.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    # The corpus counts up byte by byte, so each target is its input plus one (mod 256).
    assert torch.equal(y, (x + 1) % 256)
    x2, y2 = data.get_batch("train", 4, 16, torch.Generator().manual_seed(0))
    assert torch.equal(x, x2) and torch.equal(y, y2)
    xv, _ = data.get_batch("val", 2, 8, torch.Generator().manual_seed(1))
    assert xv.shape == (2, 8)
    with pytest.raises(LayerlabError, match="unknown split"):
        data.get_batch("test", 1, 8, torch.Generator())


def test_check_length_on_tiny_data(tmp_path):
    tiny = tmp_path / "tiny.txt"
    tiny.write_bytes(b"x" * 1200)
    data = TokenData.prepare(tiny, ByteTokenizer(), tmp_path / "cache")
    assert len(data.val) == 120
    data.check_length(64)
    with pytest.raises(LayerlabError, match="validation split has 120 tokens, need at least 257 .* 256"):
        data.check_length(256)
    with pytest.raises(LayerlabError, match="data too short"):
        data.get_batch("train", 1, 256, torch.Generator())


def test_empty_data_raises(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")
    cache = tmp_path / "cache"
    with pytest.raises(LayerlabError, match="empty"):
        TokenData.prepare(empty, ByteTokenizer(), cache)
    assert not list(cache.glob("*"))
    blank = tmp_path / "blank.jsonl"
    blank.write_text(json.dumps({"text": ""}) + "\n")
    with pytest.raises(LayerlabError, match="empty"):
        TokenData.prepare(blank, ByteTokenizer(), cache)


def test_iter_eval_batches_deterministic(tmp_path, small_corpus):
    data = TokenData.prepare(small_corpus, ByteTokenizer(), tmp_path / "cache")
    batches = list(data.iter_eval_batches(4, 32, None))
    again = list(data.iter_eval_batches(4, 32, None))
    assert len(batches) == len(again) > 1
    for (x, y), (x2, y2) in zip(batches, again):
        assert torch.equal(x, x2) and torch.equal(y, y2)
    xs = torch.cat([x for x, _ in batches])
    assert xs.shape[0] == (len(data.val) - 1) // 32
    # Windows are consecutive and non-overlapping over the validation split.
    flat = xs.reshape(-1).numpy()
    assert np.array_equal(flat, data.val[: len(flat)].astype(np.int64))
    assert len(list(data.iter_eval_batches(4, 32, max_batches=1))) == 1


def test_head_documents_stops_at_the_fraction(tmp_path):
    from layerlab.data import head_documents

    (tmp_path / "a.txt").write_bytes(b"x" * 60)
    (tmp_path / "b.txt").write_bytes(b"y" * 40)
    docs = list(head_documents(tmp_path, 0.9))
    assert docs == [b"x" * 60, b"y" * 30]
    assert sum(map(len, head_documents(None, 0.9))) == int(sum(map(len, iter_documents(None))) * 0.9)


def test_head_and_tail_documents_split_the_bytes(tmp_path):
    from layerlab.data import head_documents, tail_documents

    (tmp_path / "a.txt").write_bytes(b"x" * 50)
    (tmp_path / "b.txt").write_bytes(b"y" * 50)
    head, tail = b"".join(head_documents(tmp_path, 0.9)), b"".join(tail_documents(tmp_path, 0.1))
    assert head == b"x" * 50 + b"y" * 40 and tail == b"y" * 10


def test_reported_losses_read_the_validation_tail_of_user_data(tmp_path):
    """Commands train or calibrate on the first 90% of --data; perplexities come from the rest."""
    from layerlab.data import measure_ids

    path = tmp_path / "t.txt"
    path.write_text("a" * 900 + "b" * 100)
    from transformers import AutoTokenizer

    ByteTokenizer().save(tmp_path / "tok")
    tok = AutoTokenizer.from_pretrained(tmp_path / "tok")
    validation = tok.decode(measure_ids(tok, str(path), 1000, split="validation"), skip_special_tokens=True)
    assert set(validation) == {"b"}
    assert tok.decode(measure_ids(tok, str(path), 1000)).startswith("a")  # analyze reads it all
