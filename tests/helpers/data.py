"""Shared helpers for the data-pipeline tests: tiny corpora, configs, prepare and shards."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from slope_megatron.config import DataConfig
from slope_megatron.data import DataInfo, prepare_data

REPO = Path(__file__).resolve().parents[2]
WORDS = ("the quick brown fox jumps over a lazy dog while seven wizards quietly hex "
         "jovial bankers near the old mill by the river").split()


def sentences(seed: int, n: int) -> str:
    rng = np.random.default_rng(seed)
    return "\n".join(" ".join(rng.choice(WORDS, 10)) + "." for _ in range(n))


def make_dir(root: Path, n_docs: int = 20) -> Path:
    d = root / "docs"
    (d / "sub").mkdir(parents=True)
    for i in range(n_docs):
        (d / ("sub" if i % 2 else "") / f"doc{i:02d}.txt").write_text(sentences(i, 30))
    return d


def cfg(path, tmp_path: Path, **kw) -> DataConfig:
    kw.setdefault("tokenizer_vocab_size", 300)
    kw.setdefault("val_fraction", 0.1)
    return DataConfig(path=None if path is None else str(path),
                      cache_dir=str(tmp_path / "cache"), **kw)


def quiet(*a, **k):
    pass


def prep(c, **kw) -> DataInfo:
    return prepare_data(c, log=quiet, progress=False, **kw)


def shard(info: DataInfo, split: str) -> np.ndarray:
    return np.fromfile(info.dir / f"{split}.bin", dtype=info.dtype)
