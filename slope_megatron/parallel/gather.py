"""Reassemble a tensor-parallel model's shards into the TP = 1 state dict.

Used to write the layout-independent inference artifact from a TP run (and by tests that
compare layouts). The rules are the inverse of the sharding in layers.py: column-parallel
tensors are concatenated block by block along `out` ([q; k; v] keeps its blocks), row-
parallel ones along `in` (kept values too: each row's kept values are ordered by column,
and shards are column ranges in order), vocab-parallel embeddings along the vocabulary.
Keys lose the `.local` of the wrapper, so the result loads into a TP = 1 GPTModel.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from .layers import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding


def _all_gather(t: torch.Tensor, group, tp: int, device: torch.device) -> list[torch.Tensor]:
    """All TP ranks' `t`, gathered on `device` (NCCL needs GPU tensors; state dicts hold
    SlopeLinear masks on the CPU) and returned on `t`'s device."""
    work = t.to(device).contiguous()
    parts = [torch.empty_like(work) for _ in range(tp)]
    dist.all_gather(parts, work, group=group)
    return [p.to(t.device) for p in parts]


def _column_full(parts: list[torch.Tensor], chunks: int) -> torch.Tensor:
    blocks = [p.chunk(chunks, dim=0) for p in parts]
    return torch.cat([blocks[r][c] for c in range(chunks) for r in range(len(parts))], dim=0)


@torch.no_grad()
def gather_full_state_dict(model: nn.Module) -> dict:
    """Collective over the TP group: every TP rank gets the full (TP = 1) state dict.

    Under ZeRO-3 call it inside `deepspeed.zero.GatheredParameters(model.parameters())`:
    partitioned parameters are otherwise empty placeholders and their shards would be
    gathered as such (`training.checkpoint.consolidated_state_dict` does so). Under pipeline
    parallelism it gathers this stage's modules only, under the stage's own keys
    (`model.pipeline.pipeline_to_model_keys` renames them)."""
    state = model.state_dict()
    full: dict = {}
    handled: set = set()
    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        if isinstance(module, (ColumnParallelLinear, RowParallelLinear)):
            tp, group = module.tp, module.group
            dev = next(module.parameters()).device
            for key, value in module.local.state_dict().items():
                src = f"{prefix}local.{key}"
                handled.add(src)
                if not torch.is_tensor(value):  # extra state: identical on every rank
                    full[f"{prefix}{key}"] = value
                    continue
                if isinstance(module, ColumnParallelLinear):
                    if key == "adapter_a":  # replicated
                        full[f"{prefix}{key}"] = value
                    elif key == "adapter_b":
                        full[f"{prefix}{key}"] = _column_full(
                            [p.t() for p in _all_gather(value, group, tp, dev)],
                            module.chunks).t()
                    else:
                        full[f"{prefix}{key}"] = _column_full(
                            _all_gather(value, group, tp, dev), module.chunks)
                else:
                    if key == "adapter_b":  # replicated
                        full[f"{prefix}{key}"] = value
                    elif key == "adapter_a":
                        full[f"{prefix}{key}"] = torch.cat(_all_gather(value, group, tp, dev),
                                                           dim=0)
                    else:
                        full[f"{prefix}{key}"] = torch.cat(_all_gather(value, group, tp, dev),
                                                           dim=1)
        elif isinstance(module, VocabParallelEmbedding):
            handled.add(f"{prefix}weight")
            tp = dist.get_world_size(module.group)
            full[f"{prefix}weight"] = torch.cat(_all_gather(module.weight, module.group, tp,
                                                            module.weight.device))
    for key, value in state.items():
        if key not in handled:
            full[key] = value
    return full
