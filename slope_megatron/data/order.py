"""Deterministic, resumable sample order for data-parallel training.

The order is a pure function of (seed, iteration): epoch e is a permutation of all
windows drawn from the pair (seed, e), epochs are concatenated, iteration i takes the next
global_batch_size indices, and data-parallel rank r takes its contiguous share, split
into micro-batches. Resuming needs only the iteration number, and the global batch is the
same whatever the parallel layout.

Order version 1 (checkpoints written before the version was recorded) drew epoch e from
`seed + e`, so a run with seed s + 1 saw exactly seed s's epochs shifted by one; version 2
seeds each epoch with (seed, e) through numpy's SeedSequence, independent across seeds. A
checkpoint records its version and a resume keeps it, so a run's order never changes midway.
"""
from __future__ import annotations

import numpy as np

from ..errors import SlopeError

ORDER_VERSION = 2  # what a new run uses (see the module docstring)


class GlobalBatchOrder:
    def __init__(self, num_samples: int, global_batch_size: int, seed: int,
                 version: int = ORDER_VERSION):
        if num_samples < 1:
            raise ValueError("the training split has no complete sample")
        if version not in (1, 2):
            raise SlopeError(f"the checkpoint's data order version is {version!r}, this code "
                             f"knows 1 and 2: it comes from newer code; resume it with that")
        self.num_samples, self.global_batch_size, self.seed = num_samples, global_batch_size, seed
        self.version = version
        self._epoch_cache: dict[int, np.ndarray] = {}

    def _epoch(self, e: int) -> np.ndarray:
        if e not in self._epoch_cache:
            seed = self.seed + e if self.version == 1 else [self.seed, e]
            self._epoch_cache = {e: np.random.default_rng(seed).permutation(self.num_samples)}
        return self._epoch_cache[e]

    def global_indices(self, iteration: int) -> np.ndarray:
        start = iteration * self.global_batch_size
        out = []
        while len(out) < self.global_batch_size:
            e, offset = divmod(start + len(out), self.num_samples)
            take = min(self.global_batch_size - len(out), self.num_samples - offset)
            out.extend(self._epoch(e)[offset:offset + take].tolist())
        return np.asarray(out)

    def micro_batches(self, iteration: int, dp_rank: int, dp_size: int,
                      micro_batch_size: int) -> list[np.ndarray]:
        """This rank's micro-batches for `iteration` (grad-accumulation order)."""
        per_rank = self.global_batch_size // dp_size
        mine = self.global_indices(iteration)[dp_rank * per_rank:(dp_rank + 1) * per_rank]
        return [mine[i:i + micro_batch_size] for i in range(0, per_rank, micro_batch_size)]
