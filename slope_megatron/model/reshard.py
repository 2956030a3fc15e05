"""How each tensor of the TP = 1 model is cut over tensor-parallel ranks, by its state-dict key:
the rules of parallel/layers.py (shard) and parallel/gather.py (merge) written once as data,
so a checkpoint can be resharded from its files alone, without the model of either layout.

A key under a parallel wrapper has `.local.` in it (`blocks.0.attn.qkv.local.weight`); its
TP = 1 key drops it (`blocks.0.attn.qkv.weight`). The wrapper's role (the key's last part
before `.local.`) says how it is cut, as linear_factory.py chose the wrapper:

| role | wrapper | weight, bias, mask, column_mask | adapter_a | adapter_b |
| --- | --- | --- | --- | --- |
| qkv, fc1, lm_head | column-parallel | rows, per stacked block | replicated | columns, per block |
| proj, fc2 | row-parallel | columns (kept values too) | rows | replicated |

Stacked blocks: qkv holds [q; k; v] (3), a SwiGLU fc1 [gate; up] (2). The token embedding is
cut along the vocabulary; everything else (norms, positions, a row-parallel layer's bias,
layer extra state) is replicated. Slicing the TP = 1 kept values is exact: a row-parallel
shard cuts `in` at multiples of M, so each shard's kept values are a contiguous column range
of every row's kept values, and a column-parallel shard holds whole rows.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .linear_factory import ROW_PARALLEL_ROLES

LOCAL = ".local."
VOCAB_PARALLEL_KEYS = ("embedding.tokens.weight",)


@dataclass(frozen=True)
class Cut:
    """How one tensor is cut over TP ranks: along `dim` in `chunks` stacked blocks, each split
    evenly; dim None: replicated (every rank holds the whole tensor)."""
    full_key: str
    dim: Optional[int] = None
    chunks: int = 1


def _chunks(role: str, arch: str) -> int:
    return {"qkv": 3, "fc1": 2 if arch == "llama" else 1}.get(role, 1)


def cut_of(key: str, arch: str) -> Cut:
    """The cut of the tensor at `key` (a TP-local key, with `.local.` where a wrapper holds it,
    or a TP = 1 key, which names the same cut)."""
    if LOCAL not in key:
        return Cut(key, 0 if key in VOCAB_PARALLEL_KEYS else None)
    wrapper, name = key.split(LOCAL, 1)
    role = wrapper.rsplit(".", 1)[-1]
    full_key = f"{wrapper}.{name}"
    if role in ROW_PARALLEL_ROLES:
        dim = {"adapter_a": 0, "adapter_b": None, "_extra_state": None}.get(name, 1)
        return Cut(full_key, dim)
    dim = {"adapter_a": None, "adapter_b": 1, "_extra_state": None}.get(name, 0)
    return Cut(full_key, dim, _chunks(role, arch))


def cut_of_stage_key(key: str, arch: str, num_layers: int, pipelined: bool) -> Cut:
    """`cut_of` a key of a live module: a pipeline stage's key (`3.attn.qkv.local.weight`)
    where `pipelined`, GPTModel's otherwise."""
    if pipelined:
        from .pipeline import pipeline_to_model_keys

        key = next(iter(pipeline_to_model_keys({key: None}, num_layers)))
    return cut_of(key, arch)


def shard(full: torch.Tensor, cut: Cut, tp: int, rank: int) -> torch.Tensor:
    """TP rank `rank`'s piece of the TP = 1 tensor `full` (the tensor itself when replicated)."""
    if cut.dim is None or tp == 1 or not torch.is_tensor(full):
        return full
    size = full.shape[cut.dim]
    if size % (cut.chunks * tp):
        raise ValueError(f"{cut.full_key}: dimension {cut.dim} of {tuple(full.shape)} does not "
                         f"split into {cut.chunks} block(s) x {tp} tensor-parallel ranks")
    return torch.cat([c.chunk(tp, dim=cut.dim)[rank]
                      for c in full.chunk(cut.chunks, dim=cut.dim)], dim=cut.dim).contiguous()


def merge(parts: list, cut: Cut) -> torch.Tensor:
    """The TP = 1 tensor from every TP rank's piece (rank order); the first rank's when
    replicated."""
    if cut.dim is None or len(parts) == 1 or not torch.is_tensor(parts[0]):
        return parts[0]
    blocks = [p.chunk(cut.chunks, dim=cut.dim) for p in parts]
    return torch.cat([blocks[r][c] for c in range(cut.chunks) for r in range(len(parts))],
                     dim=cut.dim)


def merge_state(per_rank: list[dict], arch: str) -> dict:
    """The TP = 1 state dict from every TP rank's local one (the same keys on every rank)."""
    out = {}
    for key in per_rank[0]:
        cut = cut_of(key, arch)
        out[cut.full_key] = merge([state[key] for state in per_rank], cut)
    return out
