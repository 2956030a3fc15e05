"""Choosing the next token from logits: greedy, or temperature / top-k / top-p sampling.

Kept apart from the decoding loop so the rules are easy to read and test. Sampling draws
from an explicit torch.Generator, so a seed reproduces a run exactly for the same model,
prompts (and batch), settings and device.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch


@dataclass
class SamplingConfig:
    temperature: float = 0.0  # 0 = greedy (argmax); top_k/top_p are then ignored
    top_k: int = 0            # keep the k most likely tokens (0 = all)
    top_p: float = 1.0        # keep the smallest set whose probability reaches p (1 = all)
    seed: Optional[int] = None  # None: a fresh random seed (see `make_generator`)

    def validate(self) -> None:
        if not (math.isfinite(self.temperature) and self.temperature >= 0.0):
            raise ValueError(f"temperature must be a number >= 0 (0 = greedy), "
                             f"got {self.temperature}")
        if not (isinstance(self.top_k, int) and self.top_k >= 0):
            raise ValueError(f"top_k must be an integer >= 0 (0 = off), got {self.top_k!r}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1] (1 = off), got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def make_generator(seed: Optional[int], device) -> tuple[torch.Generator, int]:
    """A generator on `device` seeded with `seed` (or a fresh one); returns it and the seed."""
    gen = torch.Generator(device=device)
    if seed is None:
        seed = gen.seed()  # nondeterministic; reported so the run can be repeated
    else:
        gen.manual_seed(int(seed))
    return gen, int(seed)


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Set logits outside the top-k / nucleus (top-p) set to -inf; the argmax always stays."""
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        before = probs.cumsum(-1) - probs  # probability mass strictly above each token
        drop_sorted = before >= top_p      # the first token has before = 0: always kept
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def next_tokens(logits: torch.Tensor, sampling: SamplingConfig,
                generator: Optional[torch.Generator]) -> torch.Tensor:
    """(batch, vocab) float logits -> (batch,) token ids."""
    if sampling.greedy:
        return logits.argmax(-1)
    logits = filter_logits(logits.float() / sampling.temperature, sampling.top_k, sampling.top_p)
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)
