"""Text data: read documents, split them into train and held-out by document, tokenise once, cache.

DATA names one of:
- `pydoc` (the default): the texts of CPython's `pydoc_data.topics.topics`, the language reference
  topics (79 texts, about 110k SmolLM2 tokens, in Python 3.11), in sorted key order; ships with every Python.
- a `.txt` file: documents are separated by one or more blank lines (so a single file still has
  many documents to split by); a directory holding `.txt` files (and no saved dataset): one
  document per file, files in sorted name order.
- a `.jsonl` file: one JSON object per line, the document in its `text` field (or --text-field).
- a `.parquet` file: one document per row, in the `text` column (or --text-field).
- a directory written by `datasets`' `save_to_disk` (a Dataset, or a DatasetDict whose splits are
  read in sorted split-name order): one document per row, in the `text` column.

Split. Each document goes to held-out when a stable hash of its text falls below
`heldout_fraction` (sha256, so it does not depend on Python's hash seed or on the order or number
of other documents): adding documents never moves an existing one between the splits, and
held-out text is never seen in training or calibration. If the hash puts every document on one
side (one long document, or very few), the last `heldout_fraction` of the token stream is held
out instead, and a warning says so.

Tokens. Each document is tokenised without special tokens and followed by the tokenizer's EOS
token (none when the tokenizer has no EOS), then the documents of a split are concatenated into
one 1-D int64 stream. Streams are cached under `dha.options.cache_dir()/tokens/`, keyed by a
hash of the tokenizer (its full serialisation, or its vocabulary), of the documents read (so the
file's content and --text-field) and of the split settings; the cache file is written to a temp
file and renamed, so a reader never sees half of one.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import re
import sys
from dataclasses import dataclass

import torch

from .atomic import atomic_file
from .errors import UserError
from .options import cache_dir

DEFAULT_DATA = "pydoc"
CACHE_VERSION = 1  # bump when the tokenisation or split rules change: old cache entries are ignored


class DataError(UserError):
    """The data named by the user is missing, empty, unreadable or lacks the text field."""


@dataclass
class TokenSplits:
    train: torch.Tensor  # (N_train,) int64 token stream, documents joined with the tokenizer's EOS
    heldout: torch.Tensor  # (N_heldout,) int64, never used for training or calibration
    source: str  # what the user named
    train_documents: int = 0  # documents on each side (0 when unknown)
    heldout_documents: int = 0


# ---- reading documents ------------------------------------------------------------------------


def check_data(data: str | None) -> str:
    """DATA as named (None: the default), or DataError when it names nothing: a file, a saved
    dataset directory, or 'pydoc'. Cheap, so a verb calls it before loading any model."""
    data = data or DEFAULT_DATA
    if data != DEFAULT_DATA and not os.path.exists(data):
        raise DataError(
            f"data not found: {data} (give a .txt, .jsonl or .parquet file, a saved dataset directory, or 'pydoc')"
        )
    return data


def read_documents(data: str | None, text_field: str = "text") -> list[str]:
    """The documents of DATA (see the module doc), in a deterministic order; empty ones dropped."""
    data = check_data(data)
    if data == DEFAULT_DATA and not os.path.exists(data):
        from pydoc_data.topics import topics

        docs = [topics[k] for k in sorted(topics)]
    elif os.path.isdir(data):
        docs = _read_directory(data, text_field)
    elif data.endswith(".txt"):
        docs = _split_paragraphs(_read_text(data))
    elif data.endswith(".jsonl"):
        docs = _read_jsonl(data, text_field)
    elif data.endswith(".parquet"):
        docs = _read_parquet(data, text_field)
    else:
        raise DataError(
            f"{data}: unknown data format; use .txt, .jsonl, .parquet, a directory saved by datasets, or 'pydoc'"
        )
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise DataError(f"{data} holds no text (no non-empty documents)")
    return docs


def _read_text(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not UTF-8 text: {e}") from None
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror}") from None


def _split_paragraphs(text: str) -> list[str]:
    return [p.strip("\n") for p in re.split(r"\n[ \t]*\n", text)]


def _read_jsonl(path: str, text_field: str) -> list[str]:
    docs = []
    try:
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{number}: not valid JSON ({e.msg})") from None
                if not isinstance(row, dict) or text_field not in row:
                    keys = sorted(row) if isinstance(row, dict) else type(row).__name__
                    raise DataError(
                        f"{path}:{number}: no {text_field!r} field (has {keys}); name the field with --text-field"
                    )
                if not isinstance(row[text_field], str):
                    raise DataError(
                        f"{path}:{number}: field {text_field!r} is {type(row[text_field]).__name__}, not text"
                    )
                docs.append(row[text_field])
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not UTF-8 text: {e}") from None
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror}") from None
    return docs


def _text_column(table_or_dataset, text_field: str, where: str) -> list[str]:
    names = list(table_or_dataset.column_names)
    if text_field not in names:
        raise DataError(f"{where}: no {text_field!r} column (has {names}); name the column with --text-field")
    column = table_or_dataset[text_field]
    values = column.to_pylist() if hasattr(column, "to_pylist") else list(column)
    bad = next((v for v in values if v is not None and not isinstance(v, str)), None)
    if bad is not None:
        raise DataError(f"{where}: column {text_field!r} holds {type(bad).__name__}, not text")
    return [v for v in values if v is not None]


def _read_parquet(path: str, text_field: str) -> list[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        schema = pq.read_schema(path)
        if text_field not in schema.names:
            raise DataError(f"{path}: no {text_field!r} column (has {schema.names}); name the column with --text-field")
        table = pq.read_table(path, columns=[text_field])
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"cannot read {path} as parquet: {str(e).splitlines()[0]}") from None
    return _text_column(table, text_field, path)


def _read_directory(path: str, text_field: str) -> list[str]:
    markers = ("state.json", "dataset_info.json", "dataset_dict.json")
    if any(os.path.exists(os.path.join(path, m)) for m in markers):
        return _read_saved_dataset(path, text_field)
    files = sorted(glob.glob(os.path.join(path, "*.txt")))
    if not files:
        raise DataError(f"{path} is neither a dataset saved by datasets.save_to_disk nor a directory of .txt files")
    return [_read_text(f) for f in files]


def _read_saved_dataset(path: str, text_field: str) -> list[str]:
    import datasets

    try:
        ds = datasets.load_from_disk(path)
    except Exception as e:  # datasets raises several unrelated types for a damaged directory
        raise DataError(
            f"cannot load the saved dataset {path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
        ) from None
    if isinstance(ds, datasets.DatasetDict):
        return [doc for split in sorted(ds) for doc in _text_column(ds[split], text_field, f"{path} [{split}]")]
    return _text_column(ds, text_field, path)


# ---- splitting and tokenising -----------------------------------------------------------------


def is_heldout(document: str, heldout_fraction: float) -> bool:
    """Stable per-document split: the first 8 bytes of sha256(text) as a number in [0, 1)."""
    h = int.from_bytes(hashlib.sha256(document.encode("utf-8")).digest()[:8], "big")
    return h / 2**64 < heldout_fraction


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash of everything that decides the token ids: the full fast-tokenizer serialisation when
    there is one, else the vocabulary and special tokens."""
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode("utf-8"))
    else:
        h.update(type(tokenizer).__name__.encode())
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode("utf-8"))
        h.update(json.dumps(getattr(tokenizer, "special_tokens_map", {}), sort_keys=True, default=str).encode("utf-8"))
    h.update(str(tokenizer.eos_token_id).encode())
    return h.hexdigest()


def _documents_hash(docs: list[str]) -> str:
    h = hashlib.sha256()
    for d in docs:
        b = d.encode("utf-8")
        h.update(len(b).to_bytes(8, "big"))  # length prefix: ["ab", "c"] and ["a", "bc"] differ
        h.update(b)
    return h.hexdigest()


def tokenize_documents(docs: list[str], tokenizer, progress: bool = True, batch: int = 256) -> torch.Tensor:
    """Each document's tokens followed by EOS, concatenated: (N,) int64."""
    from tqdm.auto import tqdm

    eos = tokenizer.eos_token_id
    ids: list[int] = []
    chunks = range(0, len(docs), batch)
    for start in tqdm(
        chunks, desc="tokenising", unit="batch", disable=not progress or len(chunks) < 2, file=sys.stderr
    ):
        # verbose=False: we tokenise whole documents on purpose, longer than the model's context.
        encoded = tokenizer(docs[start : start + batch], add_special_tokens=False, verbose=False)["input_ids"]
        for doc_ids in encoded:
            ids.extend(doc_ids)
            if eos is not None:
                ids.append(eos)
    return torch.tensor(ids, dtype=torch.int64)


def load_tokens(
    data: str | None,
    tokenizer,
    *,
    text_field: str = "text",
    heldout_fraction: float = 0.1,
    cache: bool = True,
) -> TokenSplits:
    """Read DATA, split it by document, tokenise, and cache the two token streams (module doc)."""
    if tokenizer is None:
        raise DataError("the model has no tokenizer, so text cannot be turned into tokens")
    if not 0.0 <= heldout_fraction < 1.0:
        raise DataError(f"heldout fraction must be in [0, 1), got {heldout_fraction}")
    source = data or DEFAULT_DATA
    docs = read_documents(source, text_field)
    key = hashlib.sha256(
        json.dumps(
            {
                "version": CACHE_VERSION,
                "tokenizer": tokenizer_fingerprint(tokenizer),
                "documents": _documents_hash(docs),
                "heldout_fraction": heldout_fraction,
            },
            sort_keys=True,
        ).encode()
    ).hexdigest()[:32]
    path = os.path.join(_token_cache_dir(), f"{key}.safetensors")
    if cache:
        hit = _read_cache(path, source)
        if hit is not None:
            return hit

    heldout_mask = [is_heldout(d, heldout_fraction) for d in docs]
    train_docs = [d for d, h in zip(docs, heldout_mask) if not h]
    heldout_docs = [d for d, h in zip(docs, heldout_mask) if h]
    if heldout_fraction > 0 and (not train_docs or not heldout_docs):
        # Too few documents for a split by document: hold out the end of the stream instead.
        stream = tokenize_documents(docs, tokenizer)
        cut = len(stream) - max(1, int(round(len(stream) * heldout_fraction)))
        print(
            f"dha: warning: {source} has {len(docs)} document(s), too few to split by document; "
            f"holding out its last {len(stream) - cut} tokens instead",
            file=sys.stderr,
        )
        splits = TokenSplits(stream[:cut].clone(), stream[cut:].clone(), source, len(docs), 0)
    else:
        splits = TokenSplits(
            tokenize_documents(train_docs, tokenizer),
            tokenize_documents(heldout_docs, tokenizer),
            source,
            len(train_docs),
            len(heldout_docs),
        )
    if len(splits.train) == 0 and len(splits.heldout) == 0:
        raise DataError(f"{source} gave no tokens")
    if cache:
        _write_cache(path, splits)
    return splits


def _token_cache_dir() -> str:
    return os.path.join(cache_dir(), "tokens")


def _read_cache(path: str, source: str) -> TokenSplits | None:
    from safetensors import SafetensorError, safe_open

    if not os.path.exists(path):
        return None
    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
            train, heldout = f.get_tensor("train").long(), f.get_tensor("heldout").long()
        return TokenSplits(
            train, heldout, source, int(meta.get("train_documents", 0)), int(meta.get("heldout_documents", 0))
        )
    except (SafetensorError, OSError, KeyError, ValueError):
        return None  # a damaged entry is recomputed and overwritten


def _write_cache(path: str, splits: TokenSplits) -> None:
    from safetensors.torch import save_file

    os.makedirs(os.path.dirname(path), exist_ok=True)
    # int32 halves the file; every vocabulary we load is far below 2**31 ids.
    tensors = {"train": splits.train.to(torch.int32), "heldout": splits.heldout.to(torch.int32)}
    meta = {"train_documents": str(splits.train_documents), "heldout_documents": str(splits.heldout_documents)}
    with atomic_file(path) as tmp:
        save_file(tensors, tmp, metadata=meta)


def blocks(stream: torch.Tensor, block_size: int, max_blocks: int | None = None) -> torch.Tensor:
    """Cut a 1-D token stream into packed, non-overlapping blocks: (n, block_size); the tail that
    does not fill a block is dropped. At most `max_blocks` blocks (from the start) when given."""
    if block_size < 1:
        raise DataError(f"block size must be at least 1, got {block_size}")
    n = stream.numel() // block_size
    if n == 0:
        raise DataError(
            f"only {stream.numel()} tokens, shorter than one block of {block_size}: "
            "use more data or a smaller block size"
        )
    if max_blocks is not None:
        if max_blocks < 1:
            raise DataError(f"max_blocks must be at least 1, got {max_blocks}")
        n = min(n, max_blocks)
    return stream[: n * block_size].view(n, block_size)


def calibration_blocks(train_stream: torch.Tensor, calib_tokens: int, block_size: int) -> torch.Tensor:
    """About `calib_tokens` tokens from the start of the TRAIN stream as (n, block) blocks: the
    calibration of the DHA search and of every baseline (and `dha analyze`).

    n = ceil(calib_tokens / block) blocks, fewer when the stream ends first. The block is
    `block_size`, cut to `calib_tokens` or to the whole stream when either is shorter, and at least
    2 tokens (a block must hold a prediction). DataError when the stream is empty or under 2 tokens."""
    if train_stream.numel() == 0:
        raise DataError("the train split is empty: no calibration text")
    block_size = max(2, min(block_size, calib_tokens, train_stream.numel()))
    return blocks(train_stream, block_size, max_blocks=-(-calib_tokens // block_size))
