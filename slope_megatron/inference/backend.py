"""Forward-only sparse backend for inference: Y = X (W*M)^T + b, nothing for backward.

Why not the training `reference` backend: it keeps the double-pruned column mask up to date
for the input gradient (an (out, in) buffer per layer, recomputed whenever gradients are
enabled); inference needs neither. This backend computes exactly the reference forward -
F.linear(x, dense_from_values(values, mask), bias) - from the kept values and the mask.

Rebuilding W*M costs far more than the GEMM of a single decoded token (a scatter over the
whole weight against one row of products), so a generation call may hold a dense copy of every sparse
weight for its duration (`dense_cache`), freed when it returns. The model itself never keeps
one. Backends are plain objects on each SlopeLinear (`layer.backend`), the extension point
sparsity/backends provides, so no model code changes.
"""
from __future__ import annotations

import contextlib
from typing import Iterable, Iterator

import torch
import torch.nn.functional as F

from ..sparsity import dense_from_values
from ..sparsity.backends.base import SparseLinearBackend


class InferenceBackend(SparseLinearBackend):
    """One instance per InferenceModel, so dense caches of different models never mix."""

    name = "inference"

    def __init__(self):
        self._dense: dict[int, torch.Tensor] = {}

    def linear(self, layer, x: torch.Tensor) -> torch.Tensor:
        weight = self._dense.get(id(layer))
        if weight is None:
            weight = dense_from_values(layer.weight, layer.mask)
        return F.linear(x, weight, layer.bias)

    @contextlib.contextmanager
    def dense_cache(self, layers: Iterable) -> Iterator[None]:
        """Hold W*M of every layer for the duration of the block (then free it)."""
        if self._dense:  # nested use: the outer block already holds them
            yield
            return
        try:
            with torch.no_grad():
                for layer in layers:
                    self._dense[id(layer)] = dense_from_values(layer.weight, layer.mask)
            yield
        finally:
            self._dense.clear()
