"""The data a run trains on: prepared once on rank 0 (the others wait, then hit the cache;
a data error on any rank stops every rank with the same clean error), the vocabulary size
taken from the tokenizer, and at least one global batch of training and of validation
samples."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from ..config import Config, ConfigError, padded_vocab_size
from ..distributed import share_failure


@dataclass
class RunData:
    train: Any
    val: Any
    tokenizer_file: Optional[Path]


def _open_run_data(cfg: Config, log: Callable) -> RunData:
    from ..data import prepare_data
    from ..data.prepare import open_training_splits

    info = prepare_data(cfg.data, log=log)
    if cfg.model.vocab_size is None:
        cfg.model.vocab_size = padded_vocab_size(info.vocab_size)  # round up: faster GEMMs
    elif cfg.model.vocab_size < info.vocab_size:
        raise ConfigError(f"config key 'model.vocab_size' = {cfg.model.vocab_size} is smaller "
                          f"than the tokenizer's vocabulary ({info.vocab_size}); unset it or "
                          f"raise it")
    train, val = open_training_splits(info, cfg.model.seq_len, cfg.train.global_batch_size)
    return RunData(train, val, info.tokenizer_file)


def _attempt(fn: Callable[[], RunData]) -> tuple[Optional[RunData], Optional[Exception]]:
    try:
        return fn(), None
    except Exception as e:  # noqa: BLE001 - every rank must learn of it, see _share_failure
        return None, e


def prepare_run_data(cfg: Config, main: bool) -> RunData:
    """Prepare shards (rank 0 first, the others then hit the cache), fix model.vocab_size,
    open both splits. A failure on any rank - typically rank 0 finding the data unusable -
    stops every rank with the same SlopeError."""
    data = error = None
    if main:
        data, error = _attempt(lambda: _open_run_data(cfg, print))
    share_failure(error, "preparing the data")  # also the barrier the others wait at
    if not main:
        data, error = _attempt(lambda: _open_run_data(cfg, lambda *a, **k: None))
    share_failure(error, "preparing the data")
    return data
