"""The four Megatron mappings between a replicated tensor and the TP region.

Each is a tiny autograd function whose name says what crosses the wire:

| function            | forward                      | backward                    |
| ------------------- | ---------------------------- | --------------------------- |
| copy_to_tp          | identity                     | all-reduce                  |
| reduce_from_tp      | all-reduce                   | identity                    |
| scatter_to_tp       | keep this rank's last-dim slice | all-gather along last dim |
| gather_from_tp      | all-gather along last dim    | keep this rank's slice      |

Buffers are allocated on the input's device, so the same code runs over gloo on CPUs and
NCCL on GPUs. With one TP rank (or no group) every mapping is the identity.
"""
from __future__ import annotations

import torch
import torch.distributed as dist


def _all_reduce(x: torch.Tensor, group) -> torch.Tensor:
    if group is None or dist.get_world_size(group) == 1:
        return x
    x = x.contiguous().clone()
    dist.all_reduce(x, group=group)
    return x


def _split_last(x: torch.Tensor, group) -> torch.Tensor:
    if group is None or dist.get_world_size(group) == 1:
        return x
    size, rank = dist.get_world_size(group), dist.get_rank(group)
    if x.shape[-1] % size:
        raise ValueError(f"last dim {x.shape[-1]} is not divisible by the TP size {size}")
    return x.chunk(size, dim=-1)[rank].contiguous()


def _gather_last(x: torch.Tensor, group) -> torch.Tensor:
    if group is None or dist.get_world_size(group) == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim=-1)


class _CopyToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, g):
        return _all_reduce(g, ctx.group), None


class _ReduceFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        return _all_reduce(x, group)

    @staticmethod
    def backward(ctx, g):
        return g, None


class _ScatterToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _split_last(x, group)

    @staticmethod
    def backward(ctx, g):
        return _gather_last(g, ctx.group), None


class _GatherFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _gather_last(x, group)

    @staticmethod
    def backward(ctx, g):
        return _split_last(g, ctx.group), None


def copy_to_tp(x, group):
    return _CopyToTP.apply(x, group)


def reduce_from_tp(x, group):
    return _ReduceFromTP.apply(x, group)


def scatter_to_tp(x, group):
    return _ScatterToTP.apply(x, group)


def gather_from_tp(x, group):
    return _GatherFromTP.apply(x, group)
