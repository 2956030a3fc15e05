"""Column- and row-parallel linears (sparse or dense), vocab-parallel embedding and loss.

A parallel linear wraps one *local* module - a SlopeLinear or nn.Linear holding this
rank's shard - and adds the Megatron mappings around it:

    column-parallel (shards `out`):  y_r = copy_to_tp(x) W_r^T + b_r  [+ (x A) B_r / r]
    row-parallel    (shards `in`):   y   = reduce_from_tp(x_r W_r^T [+ (x_r A_r) B / r]) + b

N:M groups never straddle shards: a column shard holds whole rows (the forward mask runs
along `in`) and its row count is a multiple of M (so the double pruning along `out` sees
whole groups); a row shard cuts `in` at multiples of M. Each rank therefore prunes and
compresses only its shard, and the math equals TP = 1. Every full tensor is generated
first and then sliced, so the same seed gives the same full model for any TP size.
The replicated adapter factor (A for column, B for row) gets its gradient all-reduced
over TP by passing it through copy_to_tp.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..sparsity import SlopeLinear
from ..sparsity.linear import initial_adapter_a
from .mappings import copy_to_tp, reduce_from_tp


def shard_rows(full: torch.Tensor, tp: int, rank: int, chunks: int = 1) -> torch.Tensor:
    """This rank's rows: each of `chunks` stacked blocks (e.g. [q; k; v]) split `tp` ways."""
    return torch.cat([c.chunk(tp, dim=0)[rank] for c in full.chunk(chunks, dim=0)], dim=0)


def shard_cols(full: torch.Tensor, tp: int, rank: int) -> torch.Tensor:
    return full.chunk(tp, dim=1)[rank]


def mark_tp_sharded(*params: Optional[nn.Parameter]) -> None:
    """Tell DeepSpeed's grad-norm code these differ per TP rank (count every shard)."""
    for p in params:
        if p is not None:
            p.tensor_model_parallel = True


def own_local_params(wrapper: nn.Module) -> None:
    """Make `wrapper`'s ZeRO-3 hooks gather and release every parameter of `wrapper.local`.

    ZeRO-3 gathers a module's own parameters (recurse=False) in that module's forward and
    backward hooks. A SlopeLinear local is never called as a module (the wrapper calls its
    backend and adds the TP-mapped adapter term itself), so its hooks never run; DeepSpeed
    then finds each parameter when the wrapper's forward first reads it and registers it to
    the wrapper from then on. That late discovery changes the wrapper's parameter set the
    first time the adapters are read (the adapter switch), and ZeRO-3's recorded fetch trace
    fails its next backward ("tracing error ... expected the next 2 parameters in the
    parameter fetch queue"). Registering all of them up front, inactive adapters included,
    keeps the set fixed, as a TP = 1 SlopeLinear's own hooks do. Without ZeRO-3 it is unused.
    """
    try:
        import deepspeed
    except ImportError:  # nothing can partition the parameters then
        return
    for p in wrapper.local.parameters():
        deepspeed.zero.register_external_parameter(wrapper, p)


def _local_module(sparse_kw: Optional[dict], in_f: int, out_f: int, bias: bool,
                  shard: torch.Tensor) -> nn.Module:
    copy = lambda t: t.copy_(shard)  # noqa: E731
    if sparse_kw is None:
        layer = nn.utils.skip_init(nn.Linear, in_f, out_f, bias=bias)  # consumes no RNG
        with torch.no_grad():
            copy(layer.weight)
            if bias:
                layer.bias.zero_()
        return layer
    return SlopeLinear(in_f, out_f, bias=bias, init_method=copy, **sparse_kw)


class ColumnParallelLinear(nn.Module):
    """Shards `out` over TP; the output stays sharded (feed a RowParallelLinear next)."""

    def __init__(self, in_features: int, out_features: int, bias: bool, init_method: Callable,
                 tp: int, rank: int, group, sparse_kw: Optional[dict] = None,
                 adapter_rank: Optional[int] = None, chunks: int = 1):
        super().__init__()
        m = sparse_kw["m"] if sparse_kw else 1
        if out_features % (chunks * tp) or (out_features // (chunks * tp)) % m:
            raise ValueError(f"column-parallel out_features={out_features} ({chunks} block(s)) "
                             f"cannot be split over TP={tp} in multiples of m={m}")
        self.group, self.tp, self.chunks = group, tp, chunks
        full = torch.empty(out_features, in_features)
        init_method(full)
        self.local = _local_module(sparse_kw, in_features, out_features // tp, bias,
                                   shard_rows(full, tp, rank, chunks))
        mark_tp_sharded(self.local.weight, self.local.bias)
        if adapter_rank is not None:
            a = initial_adapter_a(in_features, adapter_rank)  # replicated: same on every rank
            self.local.create_adapter(adapter_rank, a=a)
            mark_tp_sharded(self.local.adapter_b)
        if isinstance(self.local, SlopeLinear):  # called through its backend, not local(x)
            own_local_params(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = copy_to_tp(x, self.group)
        local = self.local
        if not isinstance(local, SlopeLinear):
            return local(x)
        y = local.backend.linear(local, x)
        if local.adapter_active:
            y = y + (x @ copy_to_tp(local.adapter_a, self.group)) @ local.adapter_b \
                * local.adapter_scale
        return y


class RowParallelLinear(nn.Module):
    """Shards `in` over TP (input already sharded); all-reduces the output."""

    def __init__(self, in_features: int, out_features: int, bias: bool, init_method: Callable,
                 tp: int, rank: int, group, sparse_kw: Optional[dict] = None,
                 adapter_rank: Optional[int] = None):
        super().__init__()
        m = sparse_kw["m"] if sparse_kw else 1
        if in_features % tp or (in_features // tp) % m:
            raise ValueError(f"row-parallel in_features={in_features} cannot be split over "
                             f"TP={tp} in multiples of m={m}")
        self.group, self.tp = group, tp
        full = torch.empty(out_features, in_features)
        init_method(full)
        self.local = _local_module(sparse_kw, in_features // tp, out_features, False,
                                   shard_cols(full, tp, rank))
        mark_tp_sharded(self.local.weight)
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        if adapter_rank is not None:
            a = initial_adapter_a(in_features, adapter_rank).chunk(tp, dim=0)[rank]
            self.local.create_adapter(adapter_rank, a=a)
            mark_tp_sharded(self.local.adapter_a)
        if isinstance(self.local, SlopeLinear):  # called through its backend, not local(x)
            own_local_params(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        local = self.local
        if isinstance(local, SlopeLinear):
            y = local.backend.linear(local, x)
            if local.adapter_active:
                y = y + (x @ local.adapter_a) @ copy_to_tp(local.adapter_b, self.group) \
                    * local.adapter_scale
        else:
            y = local(x)
        y = reduce_from_tp(y, self.group)
        return y if self.bias is None else y + self.bias


class VocabParallelEmbedding(nn.Module):
    """Token embedding sharded along the vocabulary; lookups outside the shard are zero."""

    def __init__(self, vocab_size: int, hidden: int, std: float, tp: int, rank: int, group):
        super().__init__()
        if vocab_size % tp:
            raise ValueError(f"vocab size {vocab_size} is not divisible by TP={tp}")
        full = torch.empty(vocab_size, hidden)
        nn.init.normal_(full, 0.0, std)
        self.per_rank, self.start, self.group = vocab_size // tp, rank * (vocab_size // tp), group
        self.weight = nn.Parameter(full[self.start:self.start + self.per_rank].clone())
        mark_tp_sharded(self.weight)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        local = ids - self.start
        outside = (local < 0) | (local >= self.per_rank)
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        out = out.masked_fill(outside.unsqueeze(-1), 0.0)
        return reduce_from_tp(out, self.group)


class _VocabParallelCrossEntropy(torch.autograd.Function):
    """Cross-entropy over logits sharded along the vocabulary (three small all-reduces)."""

    @staticmethod
    def forward(ctx, logits, targets, start, group):
        import torch.distributed as dist

        logits = logits.float()
        vmax = logits.max(dim=-1).values
        dist.all_reduce(vmax, op=dist.ReduceOp.MAX, group=group)
        shifted = logits - vmax.unsqueeze(-1)
        exp = shifted.exp()
        sum_exp = exp.sum(-1)
        dist.all_reduce(sum_exp, group=group)
        local_t = targets - start
        inside = (local_t >= 0) & (local_t < logits.shape[-1])
        picked = shifted.gather(-1, local_t.clamp(0, logits.shape[-1] - 1).unsqueeze(-1))
        picked = picked.squeeze(-1) * inside
        dist.all_reduce(picked, group=group)
        loss = sum_exp.log() - picked
        valid = targets != -1  # as lm_loss's ignore_index
        ctx.save_for_backward(exp / sum_exp.unsqueeze(-1), local_t, inside & valid, valid)
        # No valid target: NaN (0 / 0), as lm_loss's F.cross_entropy at TP = 1. Such a micro-
        # batch is no data point; the trainer sees a non-finite loss (skips the step, or
        # stops) where a 0 would silently pull the mean over micro-batches down.
        return (loss * valid).sum() / valid.sum()

    @staticmethod
    def backward(ctx, g):
        softmax, local_t, hit, valid = ctx.saved_tensors
        grad = softmax * valid.unsqueeze(-1)
        grad.scatter_add_(-1, local_t.clamp(0, grad.shape[-1] - 1).unsqueeze(-1),
                          -hit.unsqueeze(-1).to(grad.dtype))
        # no valid target: a zero gradient (clamp), as F.cross_entropy's
        return grad * (g / valid.sum().clamp(min=1)), None, None, None


def vocab_parallel_lm_loss(logits: torch.Tensor, targets: torch.Tensor, start: int,
                           group) -> torch.Tensor:
    """Mean next-token loss from this rank's vocab shard of the logits (targets of -1 ignored;
    NaN when every target is, with zero gradients: the same as `lm_loss` at TP = 1)."""
    return _VocabParallelCrossEntropy.apply(logits.reshape(-1, logits.shape[-1]),
                                            targets.reshape(-1), start, group)
