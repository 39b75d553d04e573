"""dha.data: every format loads, the split is by document, deterministic and disjoint, the cache
returns identical tensors, bad input raises DataError. Files are written by the tests."""

from __future__ import annotations

import hashlib
import json
import os

import pytest
import torch

from dha.data import DataError, TokenSplits, blocks, calibration_blocks, load_tokens, read_documents

DOCS = [f"Document number {i} talks about the cat {i * 7} times.\nIt has a second line {i}." for i in range(40)]


def tiny_tokenizer():
    """A byte-level BPE (every string encodes) with an <eos> token, trained on a few strings."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<eos>"],
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(DOCS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")


@pytest.fixture(autouse=True)
def cache_in_tmp(tmp_path, monkeypatch):
    monkeypatch.setenv("DHA_CACHE", str(tmp_path / "cache"))


def reference_split(docs, fraction):
    """The documented rule, written out independently: sha256 of the UTF-8 text, first 8 bytes."""
    held = [d for d in docs if int(hashlib.sha256(d.encode()).hexdigest()[:16], 16) < fraction * 2**64]
    return [d for d in docs if d not in held], held


def reference_stream(docs, tokenizer):
    ids = []
    for d in docs:
        ids += tokenizer.encode(d, add_special_tokens=False) + [tokenizer.eos_token_id]
    return torch.tensor(ids, dtype=torch.int64)


def write_jsonl(path, docs, field="text"):
    with open(path, "w") as f:
        for d in docs:
            f.write(json.dumps({field: d, "id": 1}) + "\n")


# ---- formats ----------------------------------------------------------------------------------


def test_txt_splits_on_blank_lines(tmp_path):
    p = tmp_path / "a.txt"
    p.write_text("first doc\nline two\n\n\nsecond doc\n \nthird doc\n")
    assert read_documents(str(p)) == ["first doc\nline two", "second doc", "third doc"]


def test_txt_directory_one_document_per_file(tmp_path):
    d = tmp_path / "texts"
    d.mkdir()
    (d / "b.txt").write_text("file b\n\nstill b")
    (d / "a.txt").write_text("file a")
    (d / "ignored.md").write_text("not text data")
    assert read_documents(str(d)) == ["file a", "file b\n\nstill b"]


def test_jsonl_and_text_field(tmp_path):
    p = tmp_path / "d.jsonl"
    write_jsonl(p, DOCS[:3], field="body")
    assert read_documents(str(p), text_field="body") == DOCS[:3]
    with pytest.raises(DataError, match="no 'text' field"):
        read_documents(str(p))


def test_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    p = tmp_path / "d.parquet"
    pq.write_table(pa.table({"text": DOCS[:5], "n": list(range(5))}), p)
    assert read_documents(str(p)) == DOCS[:5]
    with pytest.raises(DataError, match="no 'content' column"):
        read_documents(str(p), text_field="content")


def test_saved_dataset_and_dataset_dict(tmp_path):
    import datasets

    datasets.Dataset.from_dict({"text": DOCS[:4]}).save_to_disk(str(tmp_path / "ds"))
    assert read_documents(str(tmp_path / "ds")) == DOCS[:4]
    dd = datasets.DatasetDict(
        {
            "validation": datasets.Dataset.from_dict({"text": DOCS[4:6]}),
            "train": datasets.Dataset.from_dict({"text": DOCS[:4]}),
        }
    )
    dd.save_to_disk(str(tmp_path / "dd"))
    assert read_documents(str(tmp_path / "dd")) == DOCS[:6]  # splits in sorted name order


def test_pydoc_default():
    from pydoc_data.topics import topics

    docs = read_documents(None)
    assert docs == [topics[k] for k in sorted(topics) if topics[k].strip()]
    # Topics every Python 3 ships (the count changes between versions: 79 in 3.11), in key order.
    assert docs.index(topics["assert"]) < docs.index(topics["if"]) < docs.index(topics["while"])
    assert "assert" in topics["assert"] and "while" in topics["while"]


# ---- split, tokens, cache ---------------------------------------------------------------------


def test_split_is_by_document_deterministic_and_disjoint(tmp_path):
    tok = tiny_tokenizer()
    p = tmp_path / "d.jsonl"
    write_jsonl(p, DOCS)
    s = load_tokens(str(p), tok, heldout_fraction=0.25, cache=False)
    train_docs, held_docs = reference_split(DOCS, 0.25)
    assert train_docs and held_docs
    assert (s.train_documents, s.heldout_documents) == (len(train_docs), len(held_docs))
    torch.testing.assert_close(s.train, reference_stream(train_docs, tok), rtol=0, atol=0)
    torch.testing.assert_close(s.heldout, reference_stream(held_docs, tok), rtol=0, atol=0)
    assert s.train.dtype == s.heldout.dtype == torch.int64

    # Adding documents (and reordering) never moves an existing document to the other side.
    more = list(reversed(DOCS)) + [f"A new document {i}." for i in range(30)]
    write_jsonl(p, more)
    s2 = load_tokens(str(p), tok, heldout_fraction=0.25, cache=False)
    _, held2 = reference_split(more, 0.25)
    assert set(held_docs) <= set(held2)
    torch.testing.assert_close(s2.heldout, reference_stream(held2, tok), rtol=0, atol=0)


def test_single_document_falls_back_to_holding_out_the_tail(tmp_path, capsys):
    tok = tiny_tokenizer()
    p = tmp_path / "one.txt"
    p.write_text(DOCS[0])
    s = load_tokens(str(p), tok, heldout_fraction=0.2, cache=False)
    full = reference_stream([DOCS[0]], tok)
    n_held = round(len(full) * 0.2)
    torch.testing.assert_close(torch.cat([s.train, s.heldout]), full, rtol=0, atol=0)
    assert len(s.heldout) == n_held
    assert "too few to split by document" in capsys.readouterr().err


def test_cache_hit_returns_identical_tensors(tmp_path):
    tok = tiny_tokenizer()
    p = tmp_path / "d.txt"
    p.write_text("\n\n".join(DOCS))
    first = load_tokens(str(p), tok)
    files = os.listdir(tmp_path / "cache" / "tokens")
    assert len(files) == 1 and files[0].endswith(".safetensors")

    class Counting:  # the tokenizer must not be called to encode text on a hit
        def __init__(self, inner):
            self.inner = inner

        def __getattr__(self, name):
            return getattr(self.inner, name)

        def __call__(self, *a, **k):
            raise AssertionError("tokenised again despite a cache hit")

    second = load_tokens(str(p), Counting(tok))
    for a, b in ((first.train, second.train), (first.heldout, second.heldout)):
        assert b.dtype == torch.int64
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert (second.train_documents, second.heldout_documents) == (first.train_documents, first.heldout_documents)

    # A different file content, split or field is a different key.
    load_tokens(str(p), tok, heldout_fraction=0.3)
    p.write_text("\n\n".join(DOCS[:-1]))
    load_tokens(str(p), tok)
    assert len(os.listdir(tmp_path / "cache" / "tokens")) == 3

    # A damaged entry is recomputed, not trusted.
    for name in os.listdir(tmp_path / "cache" / "tokens"):
        (tmp_path / "cache" / "tokens" / name).write_bytes(b"garbage")
    p.write_text("\n\n".join(DOCS))
    again = load_tokens(str(p), tok)
    torch.testing.assert_close(again.train, first.train, rtol=0, atol=0)


# ---- bad input --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, content, match",
    [
        ("missing.txt", None, "data not found"),
        ("empty.txt", "\n\n  \n", "holds no text"),
        ("data.csv", "a,b\n", "unknown data format"),
        ("bad.jsonl", '{"text": "ok"}\n{not json\n', r"bad.jsonl:2: not valid JSON"),
        ("num.jsonl", '{"text": 3}\n', "is int, not text"),
        ("latin.txt", b"caf\xe9\n", "not UTF-8"),
        ("broken.parquet", b"PAR1 not really", "cannot read .* as parquet"),
    ],
)
def test_bad_data_raises_data_error(tmp_path, name, content, match):
    p = tmp_path / name
    if isinstance(content, bytes):
        p.write_bytes(content)
    elif content is not None:
        p.write_text(content)
    with pytest.raises(DataError, match=match):
        load_tokens(str(p), tiny_tokenizer())
    assert not os.path.exists(tmp_path / "cache" / "tokens") or not os.listdir(tmp_path / "cache" / "tokens")


def test_bad_directory_and_options(tmp_path):
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(DataError, match="neither a dataset"):
        read_documents(str(tmp_path / "empty_dir"))
    with pytest.raises(DataError, match="heldout fraction"):
        load_tokens(None, tiny_tokenizer(), heldout_fraction=1.0)
    with pytest.raises(DataError, match="no tokenizer"):
        load_tokens(None, None)


def test_blocks():
    stream = torch.arange(23)
    b = blocks(stream, 5)
    assert b.shape == (4, 5)
    assert b[2].tolist() == [10, 11, 12, 13, 14]
    assert blocks(stream, 5, max_blocks=2).tolist() == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]
    with pytest.raises(DataError, match="shorter than one block"):
        blocks(stream, 24)
    with pytest.raises(DataError, match="at least 1"):
        blocks(stream, 0)
    # The positional API others use: (train, heldout, source[, train_documents, heldout_documents]).
    train, heldout = stream[:5], stream[5:]
    s = TokenSplits(train, heldout, "x")
    assert s.train is train and s.heldout is heldout and s.source == "x"
    assert (s.train_documents, s.heldout_documents) == (0, 0)
    assert TokenSplits(train, heldout, "x", 3, 4).heldout_documents == 4


def test_calibration_blocks_one_rule_for_every_method():
    """The DHA search and the baselines cut calibration text by the same rule (dha.data.calibration_blocks)."""
    stream = torch.arange(100)
    assert calibration_blocks(stream, 40, 16).tolist() == [
        list(range(0, 16)),
        list(range(16, 32)),
        list(range(32, 48)),
    ]  # ceil(40/16)
    assert calibration_blocks(stream, 10, 16).tolist() == [list(range(10))]  # the block cut to calib_tokens
    assert calibration_blocks(stream, 1000, 16).shape == (6, 16)  # the stream ends first: 6 whole blocks
    assert calibration_blocks(torch.arange(7), 64, 16).tolist() == [
        list(range(7))
    ]  # a short stream: one block of all of it
    assert calibration_blocks(stream, 1, 16).tolist() == [[0, 1]]  # at least 2 tokens: one prediction
    with pytest.raises(DataError, match="train split is empty"):
        calibration_blocks(torch.arange(0), 64, 16)
    with pytest.raises(DataError, match="shorter than one block"):
        calibration_blocks(torch.arange(1), 64, 16)
