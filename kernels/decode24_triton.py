"""The 2:4 decode GEMM: y = x @ (W*M)^T (+ b) for a few rows of x (1 to 64 tokens).

Why our own kernel: decoding is a bandwidth problem, and cuSPARSELt's small-N kernels stream
the compressed operand at about half the bandwidth cuBLAS reaches on the dense one, so 2:4
decoding is slower than dense (docs/INFERENCE.md). Triton has no sparse MMA; this kernel reads
only the two compressed streams of `decode24_layout.py` (kept values and their 2-bit
positions, 0.5625x of the dense bf16 bytes) with wide loads, rebuilds the dense
(BLOCK_N, BLOCK_K) tile of W*M in registers and multiplies it by the x tile:
- `USE_DOT` (BLOCK_M >= 16): one tl.dot per tile, on the tensor cores (x's rows are padded to
  the MMA's minimum by masked loads; the extra products cost nothing in a memory-bound loop);
- otherwise (1 to 8 rows): multiply-adds on the CUDA cores, one x row at a time.
Split-K: with few output tiles (small layers, `out` / BLOCK_N programs) the GPU would be
mostly idle, so `SPLIT_K` programs share the K blocks of each tile (interleaved) and write
fp32 partial sums that `decode24_linear` adds up in a fixed order (deterministic, so a CUDA
graph replays bit for bit what the eager call computed).

`default_config` is a starting point, not a tuned choice: which block sizes and split the
GPU prefers, and whether this kernel beats the cuSPARSELt or dense GEMM at all, is measured at
load time (`slope_megatron/inference/decode24_plans.py`). The test suite checks the kernel
against F.linear(x, W*M, b) in Triton's CPU interpreter (fp32) and on a GPU (bf16).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

MAX_TOKENS = 64  # the token counts this kernel is meant (and planned) for


@dataclass(frozen=True)
class Decode24Config:
    """Launch parameters. block_m: rows of x per program (a power of two; >= 16 uses
    tl.dot); block_n: output rows per program; block_k: input columns per step (a multiple
    of 32: whole metadata words); split_k: programs sharing one output tile's K blocks."""

    block_m: int
    block_n: int = 64
    block_k: int = 128
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 3

    def __post_init__(self):
        for name in ("block_m", "block_n", "block_k"):
            v = getattr(self, name)
            if v < 1 or v & (v - 1):
                raise ValueError(f"{name} must be a power of two, got {v}")
        if self.block_k < 32 or self.split_k < 1:
            raise ValueError(f"block_k must be >= 32 and split_k >= 1, got {self}")
        if self.use_dot and self.block_n < 16:
            raise ValueError(f"tl.dot needs block_n >= 16, got {self}")

    @property
    def use_dot(self) -> bool:
        return self.block_m >= 16


def rows_block(tokens: int) -> int:
    """The power-of-two block of x rows for `tokens` rows (1, 2, 4, 8, 16, 32, 64, ...)."""
    return 1 << max(0, (tokens - 1).bit_length())


def default_config(tokens: int, out: int, in_features: int, num_sms: int = 132) -> Decode24Config:
    """An untuned starting point: one program per BLOCK_N output rows and per split, the split
    chosen to give every SM about four programs when `out` alone gives too few."""
    block_m = rows_block(min(tokens, MAX_TOKENS))
    block_n = 64 if block_m >= 16 else 32
    block_k = 128
    tiles = -(-out // block_n) * -(-tokens // block_m)
    k_blocks = -(-in_features // block_k)
    split = max(1, min(k_blocks, 16, -(-4 * num_sms // tiles)))
    return Decode24Config(block_m, block_n, block_k, split)


@triton.jit
def _decode24_kernel(x_ptr, v_ptr, meta_ptr, bias_ptr, y_ptr, M, N, K, stride_xm, stride_vn,
                     stride_ym, stride_ys, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr, USE_DOT: tl.constexpr,
                     HAS_BIAS: tl.constexpr, PARTIAL: tl.constexpr,
                     DOT_PRECISION: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m = tl.program_id(2)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    n_ok = rn < N
    m_ok = rm < M
    kept = K // 2
    words = (K + 31) // 32
    g = tl.arange(0, BLOCK_K // 4)            # groups of four input columns in a block
    pair = tl.arange(0, 2)                    # a group's two kept values
    sub = tl.arange(0, 8)                     # groups per metadata word
    col = tl.arange(0, 4)[None, None, :]      # a column's place in its group
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kb in range(pid_k, tl.cdiv(K, BLOCK_K), SPLIT_K):
        k0 = kb * BLOCK_K
        # values: (BLOCK_N, groups, 2), BLOCK_N contiguous runs of BLOCK_K / 2
        kk = k0 // 2 + 2 * g[None, :, None] + pair[None, None, :]
        v = tl.load(v_ptr + rn[:, None, None].to(tl.int64) * stride_vn + kk,
                    mask=n_ok[:, None, None] & (kk < kept), other=0.0)
        v0, v1 = tl.split(v)
        # metadata: (BLOCK_N, BLOCK_K / 32) words, BLOCK_K / 32 contiguous runs of BLOCK_N
        w = k0 // 32 + tl.arange(0, BLOCK_K // 32)
        word = tl.load(meta_ptr + w[None, :].to(tl.int64) * N + rn[:, None],
                       mask=n_ok[:, None] & (w[None, :] < words), other=0)
        nib = tl.reshape((word[:, :, None] >> (4 * sub)[None, None, :]) & 15,
                         (BLOCK_N, BLOCK_K // 4))
        p0 = (nib & 3)[:, :, None]
        p1 = (nib >> 2)[:, :, None]
        tile = tl.where(col == p0, v0[:, :, None], tl.where(col == p1, v1[:, :, None], 0.0))
        dense = tl.reshape(tile, (BLOCK_N, BLOCK_K)).to(v_ptr.dtype.element_ty)
        kx = k0 + tl.arange(0, BLOCK_K)
        if USE_DOT:
            x = tl.load(x_ptr + rm[:, None].to(tl.int64) * stride_xm + kx[None, :],
                        mask=m_ok[:, None] & (kx[None, :] < K), other=0.0)
            acc += tl.dot(x.to(dense.dtype), tl.trans(dense), input_precision=DOT_PRECISION)
        else:
            dense32 = dense.to(tl.float32)
            for i in tl.static_range(BLOCK_M):
                row = pid_m * BLOCK_M + i
                xr = tl.load(x_ptr + row.to(tl.int64) * stride_xm + kx,
                             mask=(kx < K) & (row < M), other=0.0).to(tl.float32)
                y_row = tl.sum(dense32 * xr[None, :], axis=1)
                acc += tl.where(tl.arange(0, BLOCK_M)[:, None] == i, y_row[None, :], 0.0)
    out_mask = m_ok[:, None] & n_ok[None, :]
    if PARTIAL:  # split-K: fp32 partial sums, added (with the bias) by the caller
        tl.store(y_ptr + pid_k.to(tl.int64) * stride_ys + rm[:, None] * stride_ym + rn[None, :],
                 acc, mask=out_mask)
    else:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        tl.store(y_ptr + rm[:, None] * stride_ym + rn[None, :], acc.to(y_ptr.dtype.element_ty),
                 mask=out_mask)


def decode24_linear(x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor,
                    bias: torch.Tensor | None = None,
                    config: Decode24Config | None = None) -> torch.Tensor:
    """y = x @ (W*M)^T (+ bias) for x (tokens, in) from the kept values (out, in/2) and the
    metadata (ceil(in/32), out) of `decode24_layout`; y is (tokens, out) in x's dtype."""
    tokens, in_features = x.shape
    out = values.shape[0]
    if tuple(values.shape) != (out, in_features // 2) or in_features % 4:
        raise ValueError(f"values {tuple(values.shape)} do not fit x {tuple(x.shape)}")
    if meta.dtype != torch.int32 or tuple(meta.shape) != ((in_features + 31) // 32, out):
        raise ValueError(f"metadata must be ({(in_features + 31) // 32}, {out}) int32, got "
                         f"{tuple(meta.shape)} {meta.dtype}")
    if values.dtype != x.dtype or values.stride(1) != 1 or not meta.is_contiguous():
        raise ValueError("values must be row-contiguous and of x's dtype; meta contiguous")
    if x.stride(1) != 1:
        x = x.contiguous()
    cfg = config or default_config(tokens, out, in_features)
    grid = (triton.cdiv(out, cfg.block_n), cfg.split_k, triton.cdiv(tokens, cfg.block_m))
    precision = "ieee" if x.dtype == torch.float32 else "tf32"  # tf32: ignored for 16-bit x
    partial = cfg.split_k > 1
    if partial:
        y = torch.empty(cfg.split_k, tokens, out, dtype=torch.float32, device=x.device)
    else:
        y = torch.empty(tokens, out, dtype=x.dtype, device=x.device)
    _decode24_kernel[grid](
        x, values, meta, bias if bias is not None else values, y, tokens, out, in_features,
        x.stride(0), values.stride(0), y.stride(-2), y.stride(0) if partial else 0,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, SPLIT_K=cfg.split_k,
        USE_DOT=cfg.use_dot, HAS_BIAS=bias is not None, PARTIAL=partial,
        DOT_PRECISION=precision, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    if not partial:
        return y
    total = y.sum(0)
    if bias is not None:
        total += bias.float()
    return total.to(x.dtype)
