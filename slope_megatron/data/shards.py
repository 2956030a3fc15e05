"""The held-out split and the flat token shards (``train.bin`` / ``val.bin``).

Validation holds out whole documents, chosen by a fixed-seed permutation so the same corpus
and ``val_fraction`` always give the same split. (A corpus that is a single document is
cut once at a line boundary instead: its tail becomes the validation document.) Shards are
raw little-endian token ids, uint16 when the vocabulary fits, each document followed by
the EOS id, written through a checksum so the manifest can record what was written.
"""
from __future__ import annotations

import hashlib
from itertools import islice
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
from tqdm import tqdm

from .errors import DataError
from .tokenizer import Tokenizer

SPLIT_SEED = 20240601
BATCH_DOCS = 256


def shard_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 65535 else np.dtype(np.uint32)


def choose_val(n_docs: int, val_fraction: float) -> frozenset[int]:
    """Indices of held-out documents: round(fraction * n), at least 1, never all."""
    if n_docs < 2:
        raise DataError("a validation split needs at least 2 documents")
    k = min(n_docs - 1, max(1, round(val_fraction * n_docs)))
    order = np.random.default_rng(SPLIT_SEED).permutation(n_docs)
    return frozenset(int(i) for i in order[:k])


def split_single_document(doc: str, val_fraction: float, where: str) -> list[str]:
    """Cut one document into [train part, validation tail] at a line (or word) boundary."""
    cut = int(len(doc) * (1 - val_fraction))
    for sep in ("\n", " "):
        at = doc.rfind(sep, 0, cut + 1)
        if at <= 0:
            at = doc.find(sep, cut)
        if 0 < at < len(doc) - 1:
            head, tail = doc[:at].strip(), doc[at + 1:].strip()
            if head and tail:
                return [head, tail]
    raise DataError(f"{where} is a single document too short to split into training and "
                    "validation text; add more text or more documents")


class SplitWriter:
    """Writes one shard file while counting tokens and hashing the bytes."""

    def __init__(self, path: Path, dtype: np.dtype):
        self.path, self.dtype = path, dtype
        self.f = open(path, "wb")
        self.sha = hashlib.sha256()
        self.tokens = self.documents = 0

    def write(self, ids: list[int], eos_id: int) -> None:
        arr = np.empty(len(ids) + 1, dtype=self.dtype.newbyteorder("<"))
        arr[:-1] = ids
        arr[-1] = eos_id
        data = arr.tobytes()
        self.f.write(data)
        self.sha.update(data)
        self.tokens += arr.size
        self.documents += 1

    def close(self) -> dict:
        self.f.flush()
        self.f.close()
        return {"file": self.path.name, "tokens": self.tokens, "documents": self.documents,
                "bytes": self.tokens * self.dtype.itemsize, "sha256": self.sha.hexdigest()}


def _batches(items: Iterable, n: int) -> Iterator[list]:
    it = iter(items)
    while batch := list(islice(it, n)):
        yield batch


def write_shards(docs: Iterable[str], is_val, n_docs: int, tok: Tokenizer, out_dir: Path,
                 progress: bool = True) -> dict:
    """Tokenize every document into ``train.bin`` or ``val.bin``; returns their manifests."""
    dtype = shard_dtype(tok.vocab_size)
    writers = {"train": SplitWriter(out_dir / "train.bin", dtype),
               "val": SplitWriter(out_dir / "val.bin", dtype)}
    bar = tqdm(total=n_docs, desc="tokenizing", unit="doc", disable=not progress,
               mininterval=1.0)
    index = 0
    try:
        for batch in _batches(docs, BATCH_DOCS):
            for ids in tok.encode_batch(batch):
                writers["val" if is_val(index) else "train"].write(ids, tok.eos_id)
                index += 1
            bar.update(len(batch))
    finally:
        bar.close()
        out = {name: w.close() for name, w in writers.items()}
    return out


def expected_val_docs(n_docs: int, val_fraction: float) -> int:
    return min(n_docs - 1, max(1, round(val_fraction * n_docs))) if n_docs >= 2 else 0


