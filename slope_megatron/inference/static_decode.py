"""Static-shape decoding: one fixed-shape step over a full-capacity KV cache.

Why: eager decoding spends its time on the host (docs/INFERENCE.md, "What is and is not
fast"): every token slices the cache to a new length (a new attention shape, which SDPA's
cuDNN backend re-plans), builds its mask from Python ints and launches hundreds of kernels one
by one. Here the cache is allocated at its full capacity once, and each decode step is
`StaticDecoder.step`: a function of device tensors whose shapes and addresses never change and
whose values the host never reads. On CUDA it is captured once per (batch, capacity) in a CUDA
graph (`decode_graph.py`) and replayed for every token; on a CPU the same function runs
eagerly.

The state the step reads and advances lives on the device: `tokens` (batch,) the tokens to
feed, `positions` (batch,) each sequence's last position, `running` (batch,) bool, the
cache's `slot` (0-d) and `logits` (batch, vocab) fp32, the step's output. A step moves every
running sequence one position on, marks its slot valid (finished sequences' slots invalid,
their positions frozen: what eager decoding does) and runs `InferenceModel.step` - the very
forward of eager decoding - on a `StaticKVCache`, which writes at the slot tensor and attends
over all slots under a length/validity mask. Where the model compiles static steps
(`InferenceModel.compiles`; by default when graphed) the step runs the block regions
torch.compile'd: the first warm-up call compiles them, the graph captures their kernels.

What stays outside the step: the prompt's prefill (eager, through `InferenceModel.forward`
into the same cache, any length), sampling (on `logits`, with the caller's generator, so a
seed gives the tokens eager decoding gives), and the stop/length/streaming bookkeeping of
`generate`, which reads the chosen tokens back: one small device-to-host copy per token.
`running` is copied to the device only when a sequence finishes. Positions need no check per
step: `generate`'s token budgets keep every fed position below `model.seq_len`.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..model import regions
from .decode_graph import GraphedCall
from .kv_cache import StaticKVCache


class StaticDecoder:
    """A full-capacity cache and the fixed-shape decode step for `batch` sequences."""

    def __init__(self, model, batch: int, capacity: int, graph: bool = False):
        self.model, self.batch, self.capacity = model, batch, capacity
        device = model.device
        self.cache = model.new_cache(batch, capacity)
        self.view = StaticKVCache(self.cache)
        self.tokens = torch.zeros(batch, dtype=torch.long, device=device)
        self.positions = torch.zeros(batch, dtype=torch.long, device=device)
        self.running = torch.zeros(batch, dtype=torch.bool, device=device)
        self.logits = torch.zeros(batch, model.vocab_size, dtype=torch.float32, device=device)
        self._running_host: Optional[list] = None
        # a pinned staging buffer: copying `running` in never waits for the GPU queue
        self._staging = torch.zeros(batch, dtype=torch.bool,
                                    pin_memory=device.type == "cuda")
        self.graphed = bool(graph)
        self.compiled = model.compiles(self.graphed)  # the step's regions torch.compile'd
        # capture before the first prefill: the warm-up steps write into a cache that
        # `prefill` then resets (their slots are rewritten or stay masked)
        self._run = GraphedCall(self.step, device) if graph else self.step

    def step(self) -> None:
        """One token for every sequence, from the state tensors into `logits` (the function a
        CUDA graph captures: no host reads, no new shapes)."""
        with torch.inference_mode(), regions.scope(self.compiled):
            self.positions.copy_(torch.where(self.running, self.positions + 1, self.positions))
            logits = self.model.step(self.tokens[:, None], self.positions[:, None], self.view,
                                     self.running[:, None])
            self.logits.copy_(logits[:, -1])

    def prefill(self, ids: torch.Tensor, valid: torch.Tensor, positions: torch.Tensor,
                padded: bool) -> torch.Tensor:
        """Run the left-padded prompts (eagerly) into an emptied cache; the last logits.

        ids, valid, positions: (batch, longest) as `generate` builds them; padded: whether
        any prompt is shorter than the longest (else attention may run unmasked)."""
        cache = self.cache
        cache.length, cache.padded = 0, False
        cache.valid.zero_()  # slots of an earlier generation (or the warm-up) are not valid
        logits = self.model(ids, positions, cache, valid if padded else None,
                            last_only=True)[:, -1]
        self.positions.copy_(positions[:, -1])
        self.view.slot.fill_(ids.shape[1])
        self.running.fill_(True)
        self._running_host = [True] * self.batch
        return logits

    def advance(self, chosen: torch.Tensor, running: list) -> torch.Tensor:
        """Feed `chosen` (batch,) with `running` (which sequences still generate); returns the
        next logits (batch, vocab) - the decoder's own buffer, valid until the next call."""
        if len(running) != self.batch:
            raise ValueError(f"running has {len(running)} entries for a batch of {self.batch}")
        self.tokens.copy_(chosen)
        if running != self._running_host:  # at most `batch` times per generation
            self._staging.copy_(torch.tensor(running, dtype=torch.bool))
            self.running.copy_(self._staging, non_blocking=True)
            self._running_host = list(running)
        self._run()
        return self.logits
