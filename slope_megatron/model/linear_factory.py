"""Which linear each block position gets: dense or SlopeLinear, replicated or TP-sharded.

The transformer asks a factory for every linear by *role* (qkv, proj, fc1, fc2, lm_head) so
the model code is the same for the dense baseline, the sparse model and the
tensor-parallel model. With TP > 1, qkv / fc1 / lm_head become column-parallel and proj /
fc2 row-parallel (Megatron's layout); `chunks` says how many stacked blocks a fused
output holds ([q; k; v] = 3, SwiGLU's [gate; up] = 2) so each rank gets its slice of each.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

from torch import nn

from ..config import AdaptersConfig, SparsityConfig
from ..sparsity import SlopeLinear, adapter_rank

ROLES = ("qkv", "proj", "fc1", "fc2", "lm_head")
OUTPUT_ROLES = ("proj", "fc2")  # residual-branch outputs: GPT-2's scaled init
ROW_PARALLEL_ROLES = ("proj", "fc2")


@dataclass
class LinearFactory:
    """Builds every linear of the model from the sparsity/adapter config and TP layout."""

    sparsity: SparsityConfig
    adapters: AdaptersConfig
    init_std: float
    num_layers: int
    hidden_size: int
    tp_size: int = 1
    tp_rank: int = 0
    tp_group: Optional[object] = None

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
                 layer_idx: int = -1, chunks: int = 1) -> nn.Module:
        if role not in ROLES:
            raise ValueError(f"unknown linear role {role!r}; expected one of {ROLES}")
        std = self.std(role)
        init = lambda t: nn.init.normal_(t, 0.0, std)  # noqa: E731
        sparse_kw, rank = None, None
        if self.is_sparse(role, layer_idx):
            s = self.sparsity
            sparse_kw = dict(n=s.n, m=s.m, column_mask_refresh=s.column_mask_refresh,
                             backend=s.backend, double_prune=s.double_prune,
                             keep_compressed=s.keep_compressed)
            if self.adapters.enabled:
                a = self.adapters
                width = self.hidden_size if a.rank_of == "hidden" else in_features
                rank = adapter_rank(width, a.rank_ratio, a.rank)
        if self.tp_size > 1:
            from ..parallel.layers import ColumnParallelLinear, RowParallelLinear

            tp = dict(tp=self.tp_size, rank=self.tp_rank, group=self.tp_group,
                      sparse_kw=sparse_kw, adapter_rank=rank)
            if role in ROW_PARALLEL_ROLES:
                return RowParallelLinear(in_features, out_features, bias, init, **tp)
            return ColumnParallelLinear(in_features, out_features, bias, init, chunks=chunks,
                                        **tp)
        if sparse_kw is not None:
            return SlopeLinear(in_features, out_features, bias=bias, adapter_rank=rank,
                               init_method=init, **sparse_kw)
        layer = nn.utils.skip_init(nn.Linear, in_features, out_features, bias=bias)
        init(layer.weight)
        if bias:
            nn.init.zeros_(layer.bias)
        return layer
