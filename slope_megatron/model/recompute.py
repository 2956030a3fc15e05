"""Activation checkpointing: each transformer block's forward recomputed in the backward.

Why: without it a training step keeps every block's intermediate activations (the QKV, the
attention output, the MLP's wide hidden state, ...) until the backward reaches the block;
at ~1.3B and 16k tokens per micro-batch that is most of the GPU memory beyond the model
state. With it only each block's input is kept, and the block runs its forward once more
right before its backward (`torch.utils.checkpoint`, which restores the RNG state, so dropout
draws the same masks).

Reentrant checkpointing, not the non-reentrant kind PyTorch recommends: the first forward runs
without autograd and the recomputation back-propagates through its own graph. The sparse
layers may take another kernel path in the recomputation than in the first forward (the
first call of a token count runs the Python function that searches the GEMM algorithms and
later calls the native step; `auto` times and re-times its choices; the first forward, run
without gradients, takes the no-grad path), and non-reentrant checkpointing feeds the
recomputed tensors to the first forward's autograd nodes, which then refuse them (the run
stops with torch's CheckpointError). Their compressed operands and
plans are per-layer state that the recomputation finds as the first forward left it.
"""
from __future__ import annotations

import logging

from torch import nn

log = logging.getLogger(__name__)


def enable_activation_checkpointing(model: nn.Module, enabled: bool = True) -> int:
    """Turn recomputation on (or off) for every transformer block of `model` (a GPTModel or
    a pipeline stage); returns how many blocks it covers."""
    from .blocks import Block

    blocks = [m for m in model.modules() if isinstance(m, Block)]
    for block in blocks:
        block.recompute = enabled
    log.info("activation checkpointing %s: %d blocks", "on" if enabled else "off", len(blocks))
    return len(blocks)
