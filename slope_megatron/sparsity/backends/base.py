"""The interface every sparse-linear backend implements.

A backend computes the sparse part of a SlopeLinear (Y = X (W*M)^T + b with the
double-pruned input gradient) and keeps whatever kernel-side caches it needs in sync with
the trainable kept-values tensor. The `reference` backend is the definition; faster ones
must match it within their dtype's tolerance (tests compare them on random inputs).
"""
from __future__ import annotations

import abc
import logging

import torch

log = logging.getLogger(__name__)
LOGGED_FALLBACKS: set = set()  # (backend, out, in, reason) already reported


def log_fallback_once(backend: str, layer, reason: str, instead: str,
                      logger: logging.Logger = log) -> None:
    """One WARNING per (backend, layer shape, reason) on `logger`: that `instead` runs this
    layer, and why."""
    key = (backend, layer.out_features, layer.in_features, reason)
    if key not in LOGGED_FALLBACKS:
        LOGGED_FALLBACKS.add(key)
        logger.warning("%s backend: SlopeLinear(out=%d, in=%d) falls back to %s: %s", backend,
                    layer.out_features, layer.in_features, instead, reason)


class SparseLinearBackend(abc.ABC):
    """Base class: `linear` is required; the refresh hooks default to doing nothing."""

    name = "base"

    @abc.abstractmethod
    def linear(self, layer, x: torch.Tensor) -> torch.Tensor:
        """Sparse part of the layer's forward, with SLoPe's backward attached."""

    def linear_with_adapter(self, layer, x: torch.Tensor) -> torch.Tensor:
        """Sparse part plus the active adapter's (X A) B / r (backends may fuse the two)."""
        return self.linear(layer, x) + (x @ layer.adapter_a) @ layer.adapter_b \
            * layer.adapter_scale

    def after_optimizer_step(self, layer) -> None:
        """Called once after every optimizer step (refresh compressed copies here)."""

    def on_column_mask_change(self, layer) -> None:
        """Called when the layer recomputed its double-pruned column mask."""
