"""Launch parameters of the 2:4 decode GEMM (`decode24_triton.py`): its modes, tiles, split.

Why a module of its own: which config a call runs is chosen away from the kernel - by the
load-time plan (`slope_megatron/inference/decode24_plans.py`), the benchmarks and the tests -
and the rules for a valid config (block sizes, which modes take how many rows, the split that
fills the SMs, the pipeline depth) are the same for all of them. The modes themselves are
described in `decode24_triton.py`.
"""
from __future__ import annotations

from dataclasses import dataclass

import triton
import triton.language as tl

MAX_TOKENS = 64  # the token counts this kernel is meant (and planned) for
MODES = ("gather", "fma", "dot", "dotT", "gatherT", "select", "gatherS")
HAS_TL_GATHER = hasattr(tl, "gather")  # gatherS needs it (Triton 3.2 and newer)


@dataclass(frozen=True)
class Decode24Config:
    """Launch parameters. block_m: rows of x per program (a power of two, >= 16 for the dot
    modes); block_n: output rows per program; block_k: input columns per step (a multiple of
    32: whole metadata words); split_k: programs sharing one output tile's K blocks; mode:
    how a step computes (`decode24_triton`'s docstring); num_stages: K blocks the loop keeps in flight
    (copied ahead into shared memory; 1: each step waits for its own loads; unset: the
    mode's `stage_count`)."""

    block_m: int
    block_n: int = 64
    block_k: int = 128
    split_k: int = 1
    mode: str = "dot"
    num_warps: int = 4
    num_stages: int | None = None

    def __post_init__(self):
        for name in ("block_m", "block_n", "block_k"):
            v = getattr(self, name)
            if v < 1 or v & (v - 1):
                raise ValueError(f"{name} must be a power of two, got {v}")
        if self.block_k < 32 or self.split_k < 1:
            raise ValueError(f"block_k must be >= 32 and split_k >= 1, got {self}")
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.mode == "gatherS" and not HAS_TL_GATHER:
            raise ValueError(f"the gatherS mode needs tl.gather, which triton "
                             f"{triton.__version__} lacks (use 3.2 or newer)")
        if self.num_stages is None:  # frozen: set through object's own setattr
            object.__setattr__(self, "num_stages", stage_count(self.mode))
        if self.use_dot and (self.block_m < 16 or self.block_n < 16):
            raise ValueError(f"the dot modes need block_m and block_n >= 16, got {self}")
        if self.num_stages < 1:
            raise ValueError(f"num_stages must be >= 1, got {self}")
        if self.mode == "select" and self.block_m != 1:
            raise ValueError(f"the select mode takes one row per program, got {self}")
        if self.mode == "gatherT" and self.block_m > 16:
            raise ValueError(f"the gatherT mode takes at most 16 rows, got {self}")

    @property
    def use_dot(self) -> bool:
        return self.mode in ("dot", "dotT")


def rows_block(tokens: int) -> int:
    """The power-of-two block of x rows for `tokens` rows (1, 2, 4, 8, 16, 32, 64, ...)."""
    return 1 << max(0, (tokens - 1).bit_length())


def auto_split(tokens: int, out: int, in_features: int, block_m: int, block_n: int,
               block_k: int, num_sms: int = 132) -> int:
    """The split-K giving every SM about four programs when the output tiles alone give
    too few (at most one K block per program, at most 16)."""
    tiles = -(-out // block_n) * -(-tokens // block_m)
    k_blocks = -(-in_features // block_k)
    return max(1, min(k_blocks, 16, -(-4 * num_sms // tiles)))


def stage_count(mode: str) -> int:
    """The default pipeline depth: 3 for the tensor-core modes (Triton's default for a loop
    with a dot), 1 for the CUDA-core modes. Pipelining those measured slower in place: in
    the whole-model run of docs/INFERENCE.md the load-time plan chose the unpipelined loop
    for every call it gave the kernel. (Pipelined, gatherT also stages the transposed x of
    every kept value in shared memory: a (64, 256) tile of 16 rows asks for more than an H100
    has.)"""
    return 3 if mode in ("dot", "dotT") else 1


def mode_config(tokens: int, out: int, in_features: int, mode: str, block_n: int,
                block_k: int, split_scale: int = 1, num_warps: int = 4,
                num_stages: int | None = None) -> Decode24Config:
    """A config of `mode` for `tokens` rows: block_m from the rows (16 at least for the dot
    modes, 1 for select), the split from `auto_split` times `split_scale` (capped at the K
    blocks), `num_stages` by default the mode's `stage_count`."""
    rows = rows_block(min(tokens, MAX_TOKENS))
    block_m = 1 if mode == "select" else max(16, rows) if mode in ("dot", "dotT") else rows
    split = auto_split(tokens, out, in_features, block_m, block_n, block_k) * split_scale
    split = max(1, min(split, -(-in_features // block_k)))
    return Decode24Config(block_m, block_n, block_k, split, mode, num_warps, num_stages)


def default_config(tokens: int, out: int, in_features: int) -> Decode24Config:
    """A starting point: the gather mode for up to 4 rows, the tensor cores above."""
    if rows_block(min(tokens, MAX_TOKENS)) <= 4:
        return mode_config(tokens, out, in_features, "gather", 32, 256)
    return mode_config(tokens, out, in_features, "dotT", 64, 128)
