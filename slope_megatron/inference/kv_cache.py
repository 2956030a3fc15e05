"""Key/value cache for batched incremental decoding with left-padded prompts.

Every sequence of the batch owns the same cache slots 0..capacity-1; a slot holds a real
token or a left pad of a shorter prompt, and `valid` says which. Slots are not positions:
each sequence's token positions (for learned or rotary embeddings) count only its real
tokens, so a padded prompt sees exactly what it would see alone. The attention mask lets a
query attend to valid slots up to its own, plus always its own slot, so that pad queries
(whose outputs are never used) get a finite softmax instead of NaNs that would leak through
0 * NaN into real rows.
"""
from __future__ import annotations

from typing import Optional

import torch


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

        Returns the (batch, 1, t, length) attention mask, or None while the cache has never
        held a pad and the step is a prefill into an empty cache (plain causal attention:
        the caller passes is_causal) or a single token (it may attend to every slot), so
        that SDPA can take its flash kernels.
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
        q = slots[s:, None]
        allowed = ((slots[None, :] <= q)[None] & self.valid[:, None, :s + t]) \
            | (slots[None, :] == q)[None]
        return allowed[:, None]

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Store this step's keys/values of `layer`; returns all keys/values so far."""
        s, t = self.length, k.shape[2]
        self.k[layer, :, :, s:s + t] = k
        self.v[layer, :, :, s:s + t] = v
        return self.k[layer, :, :, :s + t], self.v[layer, :, :, :s + t]

    def end(self, t: int) -> None:
        """Mark the slots reserved by `begin` as filled (call after the last layer)."""
        self.length += t
