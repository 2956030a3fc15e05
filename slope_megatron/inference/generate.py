"""Batched autoregressive generation with a KV cache, stop tokens and a context limit.

Prompts of different lengths are left-padded into one batch; each sequence keeps its own
positions and its own stopping state, so a prompt generates the same tokens in a batch as
alone (up to float rounding of the padded batch GEMMs).

Context rules (the model has learned/rotary positions only for model.seq_len tokens):
- a prompt longer than seq_len is truncated from the left to its last seq_len tokens, with a
  warning (the start of a long prompt matters least for the next token);
- a sequence generates at most seq_len - len(prompt) + 1 tokens (the last token generated
  is never fed back); if that is less than max_new_tokens it stops early with
  finish_reason 'context' and a warning. There is no sliding window.

Two decoding loops share these rules (`decode`): 'eager' slices a KVCache to the current
length each token; 'static' (`static_decode.py`) runs one fixed-shape step over a
full-capacity cache, replayed as a CUDA graph on a GPU. Only the step differs: prefill,
sampling, stop tokens, streaming and budgets are this module's, for both.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable, Iterable, Optional, Sequence

import torch

from .model import InferenceModel
from .sampling import SamplingConfig, make_generator, next_tokens


@dataclass
class GenerationResult:
    tokens: list[int]          # generated tokens, without the stop token
    finish_reason: str         # 'stop' (a stop token), 'length' (max_new_tokens), 'context'
    stop_token: Optional[int]  # the stop token that ended it, if any
    prompt: list[int]          # the prompt actually used (after truncation)
    truncated: int             # prompt tokens dropped from the left
    seed: int                  # the sampling seed (reproduces the run)


def _check_prompts(prompts, vocab_size: int) -> list[list[int]]:
    if isinstance(prompts, torch.Tensor):
        prompts = prompts.tolist()
    if not isinstance(prompts, (list, tuple)) or not prompts:
        raise ValueError("prompts must be a non-empty list of token-id lists")
    out = []
    for i, p in enumerate(prompts):
        if isinstance(p, torch.Tensor):
            p = p.tolist()
        if isinstance(p, int) or not isinstance(p, (list, tuple)):
            raise ValueError(f"prompt {i} is {type(p).__name__}, not a list of token ids "
                             "(pass a list of prompts, e.g. [[1, 2, 3]])")
        if not p:
            raise ValueError(f"prompt {i} is empty; generation needs at least one token")
        bad = [t for t in p if not isinstance(t, int) or not 0 <= t < vocab_size]
        if bad:
            raise ValueError(f"prompt {i} has token ids outside [0, {vocab_size}): {bad[:5]}")
        out.append(list(p))
    return out


def _check_stop_tokens(stop_tokens: Iterable[int], vocab_size: int) -> set[int]:
    stops = set(stop_tokens or ())
    bad = [t for t in stops if not isinstance(t, int) or not 0 <= t < vocab_size]
    if bad:
        raise ValueError(f"stop tokens outside [0, {vocab_size}): {bad}")
    return stops


def _truncate(prompts: list[list[int]], seq_len: int) -> list[int]:
    dropped = []
    for i, p in enumerate(prompts):
        extra = max(0, len(p) - seq_len)
        if extra:
            warnings.warn(f"prompt {i} has {len(p)} tokens, more than the model's context "
                          f"({seq_len}); keeping its last {seq_len} tokens", stacklevel=3)
            prompts[i] = p[extra:]
        dropped.append(extra)
    return dropped


def generate(model: InferenceModel, prompts: Sequence[Sequence[int]], max_new_tokens: int,
             sampling: Optional[SamplingConfig] = None, stop_tokens: Iterable[int] = (),
             on_token: Optional[Callable[[int, int], None]] = None,
             vocab_limit: Optional[int] = None,
             decode: Optional[str] = None) -> list[GenerationResult]:
    """Generate for a batch of token-id prompts; `on_token(seq_index, token)` streams.

    `vocab_limit`: the tokenizer's vocabulary size. The model's output layer is padded to a
    multiple of 64 (`model.vocab_size`); ids at or above the limit decode to nothing, so they
    are never chosen (and prompts and stop tokens must lie below it).

    `decode`: 'eager' (a KV cache sliced to the current length, every op launched from
    Python), 'static' (`static_decode.py`: a full-capacity cache with a length mask and one
    fixed-shape step, replayed as a CUDA graph on a GPU, run eagerly on a CPU) or 'auto'
    (static where CUDA graphs can be used, eager elsewhere); None takes the model's setting.
    Both loops give the same tokens (the logits differ by float rounding only)."""
    decode = model.decoding(decode)
    sampling = sampling or SamplingConfig()
    sampling.validate()
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    limit = model.vocab_size if vocab_limit is None else vocab_limit
    if not (isinstance(limit, int) and 1 <= limit <= model.vocab_size):
        raise ValueError(f"vocab_limit must be an integer in [1, {model.vocab_size}] (the "
                         f"model's vocabulary), got {vocab_limit!r}")
    prompts = _check_prompts(prompts, limit)
    stops = _check_stop_tokens(stop_tokens, limit)
    dropped = _truncate(prompts, model.seq_len)
    budgets = [min(max_new_tokens, model.seq_len - len(p) + 1) for p in prompts]
    for i, g in enumerate(budgets):
        if g < max_new_tokens:
            warnings.warn(f"prompt {i}: only {g} new tokens fit in the model's context "
                          f"({model.seq_len}); it will stop early", stacklevel=2)

    with model.generation_scope():
        return _decode(model, prompts, budgets, dropped, max_new_tokens, sampling, stops,
                       on_token, limit, decode)


class _EagerSteps:
    """Eager decoding: a KVCache sliced to the current length, one `model.forward` a token."""

    def __init__(self, model, batch: int, slots: int):
        self.model, self.cache = model, model.new_cache(batch, slots)

    def prefill(self, ids, valid, positions, padded: bool) -> torch.Tensor:
        self.last = positions[:, -1]
        return self.model(ids, positions, self.cache, valid if padded else None,
                          last_only=True)[:, -1]

    def advance(self, chosen: torch.Tensor, running: list) -> torch.Tensor:
        flags = torch.tensor(running, device=chosen.device)
        self.last = torch.where(flags, self.last + 1, self.last)  # finished: position frozen
        step_valid = None if all(running) else flags[:, None]  # finished rows: masked
        return self.model(chosen[:, None], self.last[:, None], self.cache, step_valid)[:, -1]


def _decode(model, prompts, budgets, dropped, max_new_tokens, sampling, stops, on_token,
            limit, decode):
    """The decoding loop of `generate` (inputs already checked)."""
    b, longest, device = len(prompts), max(map(len, prompts)), model.device
    ids = torch.zeros(b, longest, dtype=torch.long)
    valid = torch.zeros(b, longest, dtype=torch.bool)
    for i, p in enumerate(prompts):
        ids[i, longest - len(p):] = torch.tensor(p)
        valid[i, longest - len(p):] = True
    ids, valid = ids.to(device), valid.to(device)
    positions = (valid.long().cumsum(1) - 1).clamp(min=0)
    slots = longest + max(budgets) - 1  # the last token generated is never fed back
    steps = model.static_decoder(b, slots) if decode == "static" else _EagerSteps(model, b, slots)
    padded = any(len(p) < longest for p in prompts)
    logits = steps.prefill(ids, valid, positions, padded)
    generator, seed = make_generator(sampling.seed, device)

    outputs: list[list[int]] = [[] for _ in range(b)]
    reasons: list[Optional[str]] = [None] * b
    stopped_by: list[Optional[int]] = [None] * b
    padding = torch.arange(logits.shape[-1], device=device) >= limit  # never chosen
    for _ in range(max(budgets)):
        if limit < logits.shape[-1]:
            logits = logits.masked_fill(padding, float("-inf"))
        chosen = next_tokens(logits, sampling, generator)
        for i, tok in enumerate(chosen.tolist()):
            if reasons[i] is not None:
                continue
            if tok in stops:
                reasons[i], stopped_by[i] = "stop", tok
                continue
            outputs[i].append(tok)
            if on_token is not None:
                on_token(i, tok)
            if len(outputs[i]) >= budgets[i]:
                reasons[i] = "length" if budgets[i] == max_new_tokens else "context"
        if all(r is not None for r in reasons):
            break
        logits = steps.advance(chosen, [r is None for r in reasons])
    return [GenerationResult(outputs[i], reasons[i], stopped_by[i], prompts[i], dropped[i], seed)
            for i in range(b)]
