"""Which linear each block position gets: dense nn.Linear or a SlopeLinear.

The transformer asks a factory for every linear by *role* (qkv, proj, fc1, fc2, lm_head) so
the model code is the same for the dense baseline, the sparse model and - through another
factory - the tensor-parallel model. Keeping this decision in one place is what lets
"dense and sparse variants share code" hold literally.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from torch import nn

from ..config import AdaptersConfig, SparsityConfig
from ..sparsity import SlopeLinear, adapter_rank

ROLES = ("qkv", "proj", "fc1", "fc2", "lm_head")
OUTPUT_ROLES = ("proj", "fc2")  # residual-branch outputs: GPT-2's scaled init


@dataclass
class LinearFactory:
    """Builds every linear of the model from the sparsity/adapter config."""

    sparsity: SparsityConfig
    adapters: AdaptersConfig
    init_std: float
    num_layers: int

    def is_sparse(self, role: str, layer_idx: int) -> bool:
        s = self.sparsity
        if not s.enabled:
            return False
        if role == "lm_head":
            return s.sparse_lm_head
        if role == "qkv" and layer_idx == 0 and s.dense_first_qkv:
            return False
        return role in s.modules

    def std(self, role: str) -> float:
        if role in OUTPUT_ROLES:
            return self.init_std / math.sqrt(2 * self.num_layers)
        return self.init_std

    def __call__(self, role: str, in_features: int, out_features: int, bias: bool,
                 layer_idx: int = -1) -> nn.Module:
        if role not in ROLES:
            raise ValueError(f"unknown linear role {role!r}; expected one of {ROLES}")
        std = self.std(role)
        if self.is_sparse(role, layer_idx):
            rank = None
            if self.adapters.enabled:
                rank = adapter_rank(in_features, self.adapters.rank_ratio, self.adapters.rank)
            return SlopeLinear(in_features, out_features, bias=bias, n=self.sparsity.n,
                               m=self.sparsity.m,
                               column_mask_refresh=self.sparsity.column_mask_refresh,
                               backend=self.sparsity.backend, adapter_rank=rank,
                               init_method=lambda t: nn.init.normal_(t, 0.0, std))
        layer = nn.Linear(in_features, out_features, bias=bias)
        nn.init.normal_(layer.weight, 0.0, std)
        if bias:
            nn.init.zeros_(layer.bias)
        return layer
