"""Y + (X A) B in one pass over Y: the lazy adapter's low-rank term, added without extra passes.

Why: the adapter's product (T x r) @ (r x out) is tiny in flops but, done with torch, costs
several full passes over the T x out output (matmul output, scale, add; cuBLAS addmm with
beta = 1 ran at ~1.1 TB/s on an H100). Here each program computes one (BM x BN) tile of
(X A) @ B with K = r in registers and writes Y_tile + it: one read and one write of Y.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _lowrank_add_kernel(y_ptr, xa_ptr, b_ptr, out_ptr, M, N, K: tl.constexpr,
                        BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    # K (the padded rank) is a compile-time constant: a few values per model
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    off = rm[:, None].to(tl.int64) * N + rn[None, :]
    ok = (rm[:, None] < M) & (rn[None, :] < N)
    y = tl.load(y_ptr + off, mask=ok, other=0.0)  # issued before the dot loop: overlaps it
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, K, BK):
        rk = k0 + tl.arange(0, BK)
        a = tl.load(xa_ptr + rm[:, None].to(tl.int64) * K + rk[None, :],
                    mask=(rm[:, None] < M) & (rk[None, :] < K), other=0.0)
        b = tl.load(b_ptr + rk[:, None].to(tl.int64) * N + rn[None, :],
                    mask=(rk[:, None] < K) & (rn[None, :] < N), other=0.0)
        acc += tl.dot(a, b)
    tl.store(out_ptr + off, (y.to(tl.float32) + acc).to(out_ptr.dtype.element_ty), mask=ok)


def lowrank_add(y: torch.Tensor, xa: torch.Tensor, b: torch.Tensor, bm: int = 64,
                bn: int = 128, num_warps: int = 4) -> torch.Tensor:
    """Return y + xa @ b for y (M, N), xa (M, K), b (K, N), all contiguous, same dtype.

    Tile default from an H100 sweep at 8192 x 11008, K = 88 (.device micro-benchmark,
    docs/KERNELS.md): 64x128/4 warps 0.181 ms (2.0 TB/s), 128x128/8 0.216 ms, 128x256/8
    0.201 ms; a plain copy of Y runs at 2.9 TB/s."""
    m, n = y.shape
    k = xa.shape[1]
    assert xa.shape == (m, k) and b.shape == (k, n), (y.shape, xa.shape, b.shape)
    assert y.is_contiguous() and xa.is_contiguous() and b.is_contiguous()
    out = torch.empty_like(y)
    grid = (triton.cdiv(m, bm), triton.cdiv(n, bn))
    _lowrank_add_kernel[grid](y, xa, b, out, m, n, k, BM=bm, BN=bn, BK=32,
                              num_warps=num_warps, num_stages=2)
    return out
