"""Key/value cache for batched incremental decoding with left-padded prompts.

Every sequence of the batch owns the same cache slots 0..capacity-1; a slot holds a real
token or a left pad of a shorter prompt, and `valid` says which. Slots are not positions:
each sequence's token positions (for learned or rotary embeddings) count only its real
tokens, so a padded prompt sees exactly what it would see alone. The attention mask lets a
query attend to valid slots up to its own, plus always its own slot, so that pad queries
(whose outputs are never used) get a finite softmax instead of NaNs that would leak through
0 * NaN into real rows.

The mask is additive (0 where allowed, -inf elsewhere, in the cache's dtype), made once per
step for all layers: given a bool mask, scaled_dot_product_attention builds this very tensor
itself, in every layer (two more kernel launches per layer and token).
"""
from __future__ import annotations

from typing import Optional

import torch


def attention_mask(slots: torch.Tensor, queries: torch.Tensor, valid: torch.Tensor,
                   dtype: torch.dtype) -> torch.Tensor:
    """The (batch, 1, t, slots) additive mask of both caches: each query (t, 1) may attend
    to the valid slots (1, slots) up to its own, and always to its own; 0 where allowed,
    -inf elsewhere, in `dtype` (the mask SDPA would make of a bool one)."""
    allowed = ((slots <= queries)[None] & valid[:, None, :]) | (slots == queries)[None]
    zero = torch.zeros((), dtype=dtype, device=valid.device)
    return torch.where(allowed[:, None], zero, float("-inf"))


class KVCache:
    """Preallocated (layers, batch, heads, capacity, head_dim) keys and values."""

    def __init__(self, num_layers: int, batch: int, num_heads: int, head_dim: int,
                 capacity: int, dtype: torch.dtype, device: torch.device | str = "cpu"):
        shape = (num_layers, batch, num_heads, capacity, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.valid = torch.zeros(batch, capacity, dtype=torch.bool, device=device)
        self.capacity = capacity
        self.length = 0  # slots filled so far (by every layer)
        self.padded = False  # True once any slot holds a pad (then every step needs a mask)

    def begin(self, t: int, valid: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
        """Reserve the next t slots; valid (batch, t) marks pads (None: all valid).

        Returns the (batch, 1, t, length) additive attention mask, or None while the cache
        has never held a pad and the step is a prefill into an empty cache (plain causal
        attention: the caller passes is_causal) or a single token (it may attend to every
        slot), so that SDPA can take its flash kernels.
        """
        s = self.length
        if s + t > self.capacity:
            raise RuntimeError(f"KV cache overflow: {s} + {t} slots > capacity {self.capacity}")
        if valid is None:
            self.valid[:, s:s + t] = True
        else:
            self.padded = True
            self.valid[:, s:s + t] = valid
        if not self.padded and (s == 0 or t == 1):
            return None
        slots = torch.arange(s + t, device=self.valid.device)
        return attention_mask(slots[None, :], slots[s:, None], self.valid[:, :s + t],
                              self.k.dtype)

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Store this step's keys/values of `layer`; returns all keys/values so far."""
        s, t = self.length, k.shape[2]
        self.k[layer, :, :, s:s + t] = k
        self.v[layer, :, :, s:s + t] = v
        return self.k[layer, :, :, :s + t], self.v[layer, :, :, :s + t]

    def end(self, t: int) -> None:
        """Mark the slots reserved by `begin` as filled (call after the last layer)."""
        self.length += t


class StaticKVCache:
    """The same keys, values and valid flags as a `KVCache`, written at a slot held in a
    0-d device tensor: every call has the same shapes and reads no host state.

    Why: a KVCache slices its tensors by the host-side `length` (a new shape for attention at
    every token) and builds its mask from Python ints, so a decode step cannot be captured
    once and replayed. Here `begin` writes the valid flags at `slot .. slot + t - 1` with
    `index_copy_`, `write` stores keys/values there and returns the *whole* capacity, and the
    mask (same rule as KVCache.begin: valid slots up to the query's own, plus its own)
    hides the slots not filled yet. Masked slots get probability exactly 0, so the result is
    the sliced attention's up to float rounding (the zeros must be finite: a KVCache starts
    zeroed and only ever holds keys/values the model computed).
    """

    def __init__(self, cache: KVCache):
        self.k, self.v, self.valid = cache.k, cache.v, cache.valid
        self.capacity = cache.capacity
        device = cache.valid.device
        self.slot = torch.zeros((), dtype=torch.long, device=device)  # next slot to write
        self._slots = torch.arange(cache.capacity, device=device)
        self._index = self.slot.view(1)

    def begin(self, t: int, valid: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Reserve slots slot .. slot + t - 1; returns the (batch, 1, t, capacity) additive
        mask. Writing past the capacity is the caller's to prevent (no host check here)."""
        self._index = self.slot + self._slots[:t]
        flags = torch.ones_like(self.valid[:, :t]) if valid is None else valid
        self.valid.index_copy_(1, self._index, flags)
        return attention_mask(self._slots[None, :], self._index[:, None], self.valid,
                              self.k.dtype)

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Store this step's keys/values of `layer` at the reserved slots; returns all slots."""
        self.k[layer].index_copy_(2, self._index, k)
        self.v[layer].index_copy_(2, self._index, v)
        return self.k[layer], self.v[layer]

    def end(self, t: int) -> None:
        """Advance the slot by t (on the device)."""
        self.slot.add_(t)
