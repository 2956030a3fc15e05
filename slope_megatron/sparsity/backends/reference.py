"""The reference backend: masked dense math in plain PyTorch, correct on any device."""
from __future__ import annotations

import torch

from ..functional import slope_linear
from .base import SparseLinearBackend


class ReferenceBackend(SparseLinearBackend):
    name = "reference"

    def linear(self, layer, x: torch.Tensor) -> torch.Tensor:
        return slope_linear(x, layer.weight, layer.mask, layer.column_mask_for_backward(),
                            layer.bias)
