"""Activation checkpointing: each transformer block's forward recomputed in the backward.

Why: without it a training step keeps every block's intermediate activations (the QKV, the
attention output, the MLP's wide hidden state, ...) until the backward reaches the block;
at ~1.3B and 16k tokens per micro-batch that is most of the GPU memory beyond the model
state. With it only each block's input is kept, and the block runs its forward once more
right before its backward (PyTorch's non-reentrant `torch.utils.checkpoint`, which restores
the RNG state, so dropout draws the same masks). The sparse layers need nothing special:
their compressed operands and plans are per-layer state that the recomputed forward finds
as the first forward left it, and their autograd functions save the same tensors again.
"""
from __future__ import annotations

import logging

from torch import nn

log = logging.getLogger(__name__)


def enable_activation_checkpointing(model: nn.Module) -> int:
    """Turn recomputation on for every transformer block of `model` (a GPTModel or a
    pipeline stage); returns how many blocks it covers."""
    from .blocks import Block

    blocks = [m for m in model.modules() if isinstance(m, Block)]
    for block in blocks:
        block.recompute = True
    log.info("activation checkpointing on: %d blocks recompute their forward in the backward",
             len(blocks))
    return len(blocks)
