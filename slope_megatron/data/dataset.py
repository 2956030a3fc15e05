"""Memory-mapped token shards as a PyTorch-style dataset of fixed-length windows.

Opening checks the shard against the data directory's manifest (``meta.json``) once: that
it exists, is exactly the recorded size (a truncated copy is caught here, not as garbage
mid-training), holds at least one sample, and has no id outside the vocabulary (which would
otherwise surface as an opaque CUDA index error in the embedding).
"""
from __future__ import annotations

from pathlib import Path


import numpy as np
import torch

from .errors import DataError
from .files import read_json

SPLITS = ("train", "val")
_CHUNK = 1 << 24


def data_dir_of(info_or_dir) -> Path:
    d = getattr(info_or_dir, "dir", info_or_dir)
    if not isinstance(d, (str, Path)):
        raise TypeError("expected a DataInfo or a data directory, got "
                        f"{type(info_or_dir).__name__}")
    return Path(d)


def read_meta(directory: Path) -> dict:
    return read_json(directory / "meta.json", "data manifest")


def check_shard_size(directory: Path, split: str, meta: dict) -> Path:
    """The shard's path, after checking it exists and has exactly the recorded size."""
    spec = meta["splits"][split]
    path = directory / spec["file"]
    if not path.is_file():
        raise DataError(f"token shard '{path}' is missing; delete '{directory}' and prepare the "
                        "data again")
    size, want = path.stat().st_size, spec["tokens"] * np.dtype(meta["dtype"]).itemsize
    if size != want:
        raise DataError(f"token shard '{path}' is {size} bytes but the manifest records {want} "
                        f"({spec['tokens']} tokens): it is truncated or was modified; delete "
                        f"'{directory}' and prepare the data again")
    return path


class TokenDataset(torch.utils.data.Dataset):
    """Non-overlapping windows of ``seq_len + 1`` tokens; item i -> (x, y), y = x shifted by 1."""

    def __init__(self, info_or_dir, split: str, seq_len: int):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if seq_len < 1:
            raise ValueError(f"seq_len must be >= 1, got {seq_len}")
        self.dir = data_dir_of(info_or_dir)
        meta = read_meta(self.dir)
        self.split, self.seq_len = split, seq_len
        self.vocab_size, self.eos_id = int(meta["vocab_size"]), int(meta["eos_id"])
        self.path = check_shard_size(self.dir, split, meta)
        self.num_tokens = int(meta["splits"][split]["tokens"])
        if self.num_tokens < seq_len + 1:
            raise DataError(f"the {split} split of '{self.dir}' has fewer tokens than one sample: "
                            f"{self.num_tokens} tokens < seq_len+1 = {seq_len + 1}; use more data "
                            "or a smaller model.seq_len")
        self.tokens = np.memmap(self.path, dtype=np.dtype(meta["dtype"]).newbyteorder("<"),
                                mode="r", shape=(self.num_tokens,))
        self._check_ids()

    def _check_ids(self) -> None:
        top = max(int(self.tokens[i:i + _CHUNK].max()) for i in range(0, self.num_tokens, _CHUNK))
        if top >= self.vocab_size:
            raise DataError(f"token shard '{self.path}' contains id {top} >= vocab_size "
                            f"{self.vocab_size}: it does not belong to this tokenizer or is "
                            f"corrupt; delete '{self.dir}' and prepare the data again")

    def __len__(self) -> int:
        return (self.num_tokens - 1) // self.seq_len

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        n = len(self)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"window {i} out of range for {n} windows")
        start = int(i) * self.seq_len
        chunk = torch.from_numpy(self.tokens[start:start + self.seq_len + 1].astype(np.int64))
        return chunk[:-1], chunk[1:]


__all__ = ["TokenDataset", "read_meta", "check_shard_size", "data_dir_of"]
