"""The lazy adapter's Triton kernels: its low-rank term without extra passes over Y.

Why: the adapter's product (T x r) @ (r x out) is tiny in flops but, done with torch, costs
several full passes over the T x out output (matmul output, scale, add; cuBLAS addmm with
beta = 1 streams well below copy bandwidth: docs/KERNELS.md). Two ways round that:
- `lowrank_add` (the cublas backend): each program computes one (BM x BN) tile of (X A) @ B
  with K = r in registers and writes Y_tile + it: one read and one write of Y.
- `widen_with_lowrank` (the cusparselt backend): no pass over Y at all. It writes
  [X | s X A spread 2:4] in one pass over X, so that one sparse GEMM against [W | B^T] (the
  adapter columns encoded 2:4, `backends/cusparselt_adapter.py`) computes X W^T + s (X A) B.
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

    The tile default is the fastest of a sweep over tile shapes and warps on an H100 at an
    LLM MLP shape (docs/KERNELS.md)."""
    m, n = y.shape
    k = xa.shape[1]
    assert xa.shape == (m, k) and b.shape == (k, n), (y.shape, xa.shape, b.shape)
    assert y.is_contiguous() and xa.is_contiguous() and b.is_contiguous()
    out = torch.empty_like(y)
    grid = (triton.cdiv(m, bm), triton.cdiv(n, bn))
    _lowrank_add_kernel[grid](y, xa, b, out, m, n, k, BM=bm, BN=bn, BK=32,
                              num_warps=num_warps, num_stages=2)
    return out


@triton.jit
def _widen_kernel(x_ptr, a_ptr, wide_ptr, xa_ptr, M, K, R, WIDTH, scale,
                  BM: tl.constexpr, BK: tl.constexpr, BR: tl.constexpr):
    # programs (row block, rank block); the rank block 0 also copies X into the wide rows
    pid_m = tl.program_id(0)
    pid_r = tl.program_id(1)
    rm = pid_m * BM + tl.arange(0, BM)
    rr = pid_r * BR + tl.arange(0, BR)
    row_ok = rm[:, None] < M
    r_ok = rr[None, :] < R
    x_rows = x_ptr + rm[:, None].to(tl.int64) * K
    wide_rows = wide_ptr + rm[:, None].to(tl.int64) * WIDTH
    acc = tl.zeros((BM, BR), dtype=tl.float32)
    for k0 in range(0, K, BK):
        rk = k0 + tl.arange(0, BK)
        x_ok = row_ok & (rk[None, :] < K)
        x = tl.load(x_rows + rk[None, :], mask=x_ok, other=0.0)
        if pid_r == 0:
            tl.store(wide_rows + rk[None, :], x, mask=x_ok)
        a = tl.load(a_ptr + rk[:, None].to(tl.int64) * R + rr[None, :],
                    mask=(rk[:, None] < K) & r_ok, other=0.0)
        acc += tl.dot(x, a)
    xa = acc.to(xa_ptr.dtype.element_ty)
    ok = row_ok & r_ok
    tl.store(xa_ptr + rm[:, None].to(tl.int64) * R + rr[None, :], xa, mask=ok)
    # scale * (x a): rank entries 2g, 2g+1 go to wide columns K + 4g, K + 4g + 1, zeros to
    # K + 4g + 2, K + 4g + 3
    tail = (acc * scale).to(wide_ptr.dtype.element_ty)
    col = K + 4 * (rr // 2) + rr % 2
    tl.store(wide_rows + col[None, :], tail, mask=ok)
    tl.store(wide_rows + col[None, :] + 2, tl.zeros_like(tail), mask=ok)


def widen_with_lowrank(x: torch.Tensor, a: torch.Tensor, scale: float = 1.0, bm: int = 64,
                       bk: int = 128, num_warps: int = 8, br: int | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """For x (M, K) and a (K, R), R even: return (wide, xa) with xa = x @ a (M, R) and wide
    (M, K + 2R) = [x | scale * xa spread 2:4]: rank entries 2g and 2g+1 at columns K + 4g and
    K + 4g + 1, zeros at K + 4g + 2 and K + 4g + 3. One read of x per rank block of `br`
    columns (default: the whole rank, up to 128); the matmul is fp32-accumulated.

    The tile default is the fastest of a sweep on an H100, close to the time of a plain copy
    of x (docs/KERNELS.md)."""
    m, k = x.shape
    r = a.shape[1]
    assert a.shape == (k, r) and r % 2 == 0, (x.shape, a.shape)
    assert x.is_contiguous() and a.is_contiguous() and x.dtype == a.dtype
    wide = torch.empty(m, k + 2 * r, dtype=x.dtype, device=x.device)
    xa = torch.empty(m, r, dtype=x.dtype, device=x.device)
    if br is None:  # 256 computed wrong results on an H100 (rank > 128, triton 3.6)
        br = min(128, triton.next_power_of_2(r))
    br = max(16, br)
    grid = (triton.cdiv(m, bm), triton.cdiv(r, br))
    _widen_kernel[grid](x, a, wide, xa, m, k, r, k + 2 * r, float(scale), BM=bm, BK=bk, BR=br,
                        num_warps=num_warps, num_stages=3)
    return wide, xa
