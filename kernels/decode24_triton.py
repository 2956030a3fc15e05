"""The 2:4 decode GEMM: y = x @ (W*M)^T (+ b) for a few rows of x (1 to 64 tokens).

Why our own kernel: decoding is a bandwidth problem, and cuSPARSELt's small-N kernels stream
the compressed operand at about half the bandwidth cuBLAS reaches on the dense one, so 2:4
decoding with it is slower than dense (docs/INFERENCE.md). Triton has no sparse MMA; this
kernel reads only the two compressed streams of `decode24_layout.py` (kept values and their
2-bit positions, 0.5625x of the dense bf16 bytes; the positions may instead be read from
cuSPARSELt's own metadata, `decode24_cslt_meta.py`, each by its own shift) with wide loads
and computes on them in one of these ways (`Decode24Config.mode`):
- "gather" (a few rows): each kept value is multiplied by the x entry its position selects,
  loaded by address (x is a few KB: the loads hit L1), on the CUDA cores - no dense tile;
- "gatherS" (a few rows): the same products, with each step's x block (BLOCK_K entries of a
  row) loaded once and the kept values' entries gathered from it by `tl.gather`, which goes
  through shared memory: no load per kept value reaches L1, and the loop has about 40% fewer
  instructions than "gather" (its sm_90 code: docs/INFERENCE.md);
- "gatherT" (2 to 8 rows): the same, with x transposed first (in, rows): one gathered load
  then brings a kept value's x entry for every row at once (a 4-16 byte vector), where
  "gather" issues one load per row;
- "select" (one row): no load per kept value - the three x entries a kept value can select
  (the first of a group sits at 0-2, the second at 1-3) are loaded once per position of the
  tile and shared by its BLOCK_N rows, and two compares pick one; the products stay in a
  per-thread accumulator that is summed once, after the loop;
- "fma": the dense (BLOCK_N, BLOCK_K) tile of W*M is rebuilt in registers and multiplied by
  one x row at a time on the CUDA cores;
- "dot" / "dotT": the rebuilt tile goes through one tl.dot per step on the tensor cores, as
  x @ tile^T or tile @ x^T (x's rows padded to 16 by masked loads: the extra products cost
  nothing in a memory-bound loop).
Split-K: with few output tiles (small layers, tensor-parallel shards) most SMs would idle, so
SPLIT_K programs share the K blocks of each tile (interleaved) and write fp32 partial sums;
the last of them to finish (an atomic arrival counter per tile) adds the partials up in a
fixed order, adds the bias and writes y, and resets the counter. One launch per call, and
deterministic, so a CUDA graph replays bit for bit what the eager call computed.

`default_config` is a starting point; which config (and whether this kernel or the
cuSPARSELt/dense GEMM) runs a call is measured at load time
(`slope_megatron/inference/decode24_plans.py`). The tests check the kernel against
F.linear(x, W*M, b) in Triton's CPU interpreter (fp32) and on a GPU (bf16).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from slope_megatron.kernels.decode24_config import MODES, Decode24Config, default_config
from slope_megatron.kernels.decode24_cslt_meta import is_cslt_meta, layout_covers, meta_bytes
from slope_megatron.kernels.decode24_layout import meta_words

_MODE_ID = {name: i for i, name in enumerate(MODES)}
# the modes' ids as the kernel compares them (Triton reads only constexpr globals)
_GATHER = tl.constexpr(_MODE_ID["gather"])
_FMA = tl.constexpr(_MODE_ID["fma"])
_DOT = tl.constexpr(_MODE_ID["dot"])
_DOT_T = tl.constexpr(_MODE_ID["dotT"])
_GATHER_T = tl.constexpr(_MODE_ID["gatherT"])
_SELECT = tl.constexpr(_MODE_ID["select"])
_GATHER_S = tl.constexpr(_MODE_ID["gatherS"])


@triton.jit
def _add_lowrank(acc, u_ptr, lb_ptr, rm, rn, m_ok, n_ok, N, RANK, lr_scale, stride_um,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
                 DOT_PRECISION: tl.constexpr):
    """acc (BLOCK_M, BLOCK_N) + lr_scale * u[rm, :] @ lb[:, rn]: the adapter's (x A) B / r,
    in BLOCK_R-wide slices of the rank (tensor cores from 16 rows, CUDA cores below)."""
    for r0 in range(0, RANK, BLOCK_R):
        rr = r0 + tl.arange(0, BLOCK_R)
        r_ok = rr < RANK
        u = tl.load(u_ptr + rm[:, None].to(tl.int64) * stride_um + rr[None, :],
                    mask=m_ok[:, None] & r_ok[None, :], other=0.0)
        b = tl.load(lb_ptr + rr[:, None].to(tl.int64) * N + rn[None, :],
                    mask=r_ok[:, None] & n_ok[None, :], other=0.0)
        if BLOCK_M >= 16 and BLOCK_N >= 16 and BLOCK_R >= 16:
            acc += tl.dot(u, b, input_precision=DOT_PRECISION) * lr_scale
        else:
            acc += tl.sum(u.to(tl.float32)[:, :, None] * b.to(tl.float32)[None, :, :],
                          axis=1) * lr_scale
    return acc


@triton.jit
def _field_shift(i, BITS: tl.constexpr, CSLT_META: tl.constexpr):
    """Where field i of a metadata word starts: a kept value's 2-bit position (BITS=2, i in
    0..15) or a group's 4-bit nibble (BITS=4, i in 0..7). The kernel's own int32 word holds
    them in order; cuSPARSELt's int64 (`decode24_cslt_meta.py`) holds group 4 e + f in byte
    2 f + e (the row's nibble low; add 4 for rows r % 16 >= 8)."""
    if CSLT_META:
        g = i // 2 if BITS == 2 else i
        return 8 * (2 * (g % 4) + g // 4) + (2 * (i % 2) if BITS == 2 else 0)
    else:
        return BITS * i


@triton.jit
def _decode24_kernel(x_ptr, v_ptr, meta_ptr, bias_ptr, y_ptr, part_ptr, lock_ptr, u_ptr, lb_ptr,
                     M, N, K, RANK, lr_scale, stride_xm, stride_vn, stride_ym, stride_um,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     SPLIT_K, MODE: tl.constexpr, HAS_BIAS: tl.constexpr,
                     HAS_LOWRANK: tl.constexpr, BLOCK_R: tl.constexpr,
                     DOT_PRECISION: tl.constexpr, NUM_STAGES: tl.constexpr,
                     CSLT_META: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m = tl.program_id(2)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    n_ok = rn < N
    m_ok = rm < M
    kept = K // 2
    words = (K + 31) // 32
    if MODE == _DOT_T or MODE == _GATHER_T:  # these accumulate y^T
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if MODE == _SELECT:  # one product per thread register: (rows, words, kept per word)
        acc3 = tl.zeros((BLOCK_N, BLOCK_K // 32, 16), dtype=tl.float32)
    # pipelined as asked: Triton pipelines a loop unasked only where it has a tl.dot, and a
    # CUDA-core mode whose steps each wait for their own loads leaves the memory idle
    for kb in tl.range(pid_k, tl.cdiv(K, BLOCK_K), SPLIT_K, num_stages=NUM_STAGES):
        k0 = kb * BLOCK_K
        # metadata: (BLOCK_N, BLOCK_K / 32) words, BLOCK_K / 32 contiguous runs of BLOCK_N
        w = k0 // 32 + tl.arange(0, BLOCK_K // 32)
        w_ok = n_ok[:, None] & (w[None, :] < words)
        if CSLT_META:  # cuSPARSELt's, read in place: one int64 per 32 columns of rows r, r + 8
            word = tl.load(meta_ptr + (rn[:, None] // 64).to(tl.int64) * K + w[None, :] * 32
                           + (rn[:, None] % 64) // 16 * 8 + rn[:, None] % 8, mask=w_ok, other=0)
            row_shift = 4 * ((rn[:, None, None] // 8) % 2)  # row r + 8: the high nibbles
        else:
            word = tl.load(meta_ptr + w[None, :].to(tl.int64) * N + rn[:, None], mask=w_ok,
                           other=0)
            row_shift = 0
        if MODE == _SELECT:
            # kept values (BLOCK_N, words, 16): value t of word w is at input column
            # 32 w + 4 (t // 2) + pos, pos in odd .. odd + 2 (odd = t % 2)
            wl = tl.arange(0, BLOCK_K // 32)[None, :, None]
            t = tl.arange(0, 16)[None, None, :]
            kk = k0 // 2 + 16 * wl + t
            v = tl.load(v_ptr + rn[:, None, None].to(tl.int64) * stride_vn + kk,
                        mask=n_ok[:, None, None] & (kk < kept), other=0.0).to(tl.float32)
            odd = t & 1
            xo = k0 + 32 * wl + 4 * (t // 2) + odd
            x_row = x_ptr + pid_m.to(tl.int64) * stride_xm
            x0 = tl.load(x_row + xo, mask=xo < K, other=0.0).to(tl.float32)
            x1 = tl.load(x_row + xo + 1, mask=xo + 1 < K, other=0.0).to(tl.float32)
            x2 = tl.load(x_row + xo + 2, mask=xo + 2 < K, other=0.0).to(tl.float32)
            q = ((word[:, :, None] >> (_field_shift(t, 2, CSLT_META) + row_shift)) & 3
                 ).to(tl.int32) - odd
            acc3 += v * tl.where(q == 0, x0, tl.where(q == 1, x1, x2))
        elif MODE == _GATHER or MODE == _GATHER_T or MODE == _GATHER_S:
            # kept values (BLOCK_N, BLOCK_K / 2) times the x entries their positions select
            j = tl.arange(0, BLOCK_K // 2)
            kk = k0 // 2 + j
            v = tl.load(v_ptr + rn[:, None].to(tl.int64) * stride_vn + kk[None, :],
                        mask=n_ok[:, None] & (kk[None, :] < kept), other=0.0).to(tl.float32)
            shift = _field_shift(tl.arange(0, 16), 2, CSLT_META)[None, None, :] + row_shift
            pos = tl.reshape(((word[:, :, None] >> shift) & 3).to(tl.int32),
                             (BLOCK_N, BLOCK_K // 2))
            xi = k0 + 4 * (j // 2)[None, :] + pos
            x_ok = n_ok[:, None] & (xi < K)
            if MODE == _GATHER_T:  # x^T (K, BLOCK_M), rows zero-padded: one vector load
                # brings a kept value's x entry for all rows
                rows = tl.arange(0, BLOCK_M)
                xg = tl.load(x_ptr + (xi.to(tl.int64) * BLOCK_M)[:, :, None]
                             + rows[None, None, :], mask=x_ok[:, :, None],
                             other=0.0).to(tl.float32)
                acc += tl.sum(v[:, :, None] * xg, axis=1)
            else:  # row by row: one gathered load per kept value (gather), or the row's
                # x block loaded once and gathered through shared memory (gatherS)
                kx = k0 + tl.arange(0, BLOCK_K)
                at = tl.reshape(xi - k0, (BLOCK_N * (BLOCK_K // 2),))
                for i in tl.static_range(BLOCK_M):
                    row = pid_m * BLOCK_M + i
                    if MODE == _GATHER_S:
                        xb = tl.load(x_ptr + row.to(tl.int64) * stride_xm + kx,
                                     mask=(kx < K) & (row < M), other=0.0).to(tl.float32)
                        xg = tl.reshape(tl.gather(xb, at, 0), (BLOCK_N, BLOCK_K // 2))
                    else:
                        xg = tl.load(x_ptr + row.to(tl.int64) * stride_xm + xi,
                                     mask=x_ok & (row < M), other=0.0).to(tl.float32)
                    y_row = tl.sum(v * xg, axis=1)
                    acc += tl.where(tl.arange(0, BLOCK_M)[:, None] == i, y_row[None, :], 0.0)
        else:
            # the dense tile of W*M rebuilt from values (BLOCK_N, groups, 2) and positions
            g = tl.arange(0, BLOCK_K // 4)
            kk = k0 // 2 + 2 * g[None, :, None] + tl.arange(0, 2)[None, None, :]
            v = tl.load(v_ptr + rn[:, None, None].to(tl.int64) * stride_vn + kk,
                        mask=n_ok[:, None, None] & (kk < kept), other=0.0)
            v0, v1 = tl.split(v)
            shift = _field_shift(tl.arange(0, 8), 4, CSLT_META)[None, None, :] + row_shift
            nib = tl.reshape(((word[:, :, None] >> shift) & 15).to(tl.int32),
                             (BLOCK_N, BLOCK_K // 4))
            p0 = (nib & 3)[:, :, None]
            p1 = (nib >> 2)[:, :, None]
            col = tl.arange(0, 4)[None, None, :]
            tile = tl.where(col == p0, v0[:, :, None],
                            tl.where(col == p1, v1[:, :, None], 0.0))
            dense = tl.reshape(tile, (BLOCK_N, BLOCK_K)).to(v_ptr.dtype.element_ty)
            kx = k0 + tl.arange(0, BLOCK_K)
            if MODE == _FMA:
                dense32 = dense.to(tl.float32)
                for i in tl.static_range(BLOCK_M):
                    row = pid_m * BLOCK_M + i
                    xr = tl.load(x_ptr + row.to(tl.int64) * stride_xm + kx,
                                 mask=(kx < K) & (row < M), other=0.0).to(tl.float32)
                    y_row = tl.sum(dense32 * xr[None, :], axis=1)
                    acc += tl.where(tl.arange(0, BLOCK_M)[:, None] == i, y_row[None, :], 0.0)
            else:
                x = tl.load(x_ptr + rm[:, None].to(tl.int64) * stride_xm + kx[None, :],
                            mask=m_ok[:, None] & (kx[None, :] < K), other=0.0).to(dense.dtype)
                if MODE == _DOT:
                    acc += tl.dot(x, tl.trans(dense), input_precision=DOT_PRECISION)
                else:
                    acc += tl.dot(dense, tl.trans(x), input_precision=DOT_PRECISION)
    if MODE == _DOT_T or MODE == _GATHER_T:
        acc = tl.trans(acc)
    if MODE == _SELECT:
        acc = tl.sum(tl.sum(acc3, axis=2), axis=1)[None, :]
    out_mask = m_ok[:, None] & n_ok[None, :]
    offs = rm[:, None].to(tl.int64) * stride_ym + rn[None, :]
    if SPLIT_K > 1:
        # this program's partial sums; the last of the tile's SPLIT_K programs adds them up
        part = rm[:, None].to(tl.int64) * N + rn[None, :]
        tl.store(part_ptr + pid_k.to(tl.int64) * M * N + part, acc, mask=out_mask)
        tl.debug_barrier()  # every thread's partials are written before the arrival
        tile = pid_m * tl.num_programs(0) + pid_n
        arrived = tl.atomic_add(lock_ptr + tile, 1, sem="acq_rel")
        if arrived == SPLIT_K - 1:
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for s in range(SPLIT_K):  # a fixed order: deterministic
                acc += tl.load(part_ptr + s * M * N + part, mask=out_mask, other=0.0,
                               cache_modifier=".cg")
            if HAS_LOWRANK:
                acc = _add_lowrank(acc, u_ptr, lb_ptr, rm, rn, m_ok, n_ok, N, RANK, lr_scale,
                                   stride_um, BLOCK_M, BLOCK_N, BLOCK_R, DOT_PRECISION)
            if HAS_BIAS:
                acc += tl.load(bias_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
            tl.store(y_ptr + offs, acc.to(y_ptr.dtype.element_ty), mask=out_mask)
            tl.atomic_xchg(lock_ptr + tile, 0)  # ready for the next call (or graph replay)
    else:
        if HAS_LOWRANK:
            acc = _add_lowrank(acc, u_ptr, lb_ptr, rm, rn, m_ok, n_ok, N, RANK, lr_scale,
                               stride_um, BLOCK_M, BLOCK_N, BLOCK_R, DOT_PRECISION)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        tl.store(y_ptr + offs, acc.to(y_ptr.dtype.element_ty), mask=out_mask)


def _rank_block(block_m: int, block_n: int) -> int:
    """Rank slice of the low-rank epilogue: 16 for tl.dot from 16 rows; below, as many as keep
    the (rows, slice, block_n) products at 4096 (registers)."""
    if block_m >= 16:
        return 16
    return max(1, min(64, 4096 // (block_m * block_n)))


_LOCKS: dict = {}
_LOCK_SLOTS = 1 << 16


def _arrival_counters(device: torch.device, tiles: int) -> torch.Tensor:
    """The per-device zeroed counters of the split-K reduction (each reduction resets its own
    counter, so one buffer serves every call issued on one stream at a time)."""
    if tiles > _LOCK_SLOTS:
        raise ValueError(f"{tiles} output tiles exceed the {_LOCK_SLOTS} split-K counters; "
                         f"use larger blocks or split_k=1")
    locks = _LOCKS.get(device)
    if locks is None:
        locks = _LOCKS[device] = torch.zeros(_LOCK_SLOTS, dtype=torch.int32, device=device)
    return locks


def decode24_linear(x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor,
                    bias: torch.Tensor | None = None,
                    config: Decode24Config | None = None,
                    lowrank: tuple | None = None) -> torch.Tensor:
    """y = x @ (W*M)^T (+ bias) for x (tokens, in) from the kept values (out, in/2) and the
    metadata: (ceil(in/32), out) int32 of `decode24_layout`, or (out * in / 64,) int64 of
    cuSPARSELt's operand (`decode24_cslt_meta`); y is (tokens, out) in x's dtype.
    lowrank = (u, b, scale), u (tokens, r) = x @ A and b (r, out): adds scale * u @ b in the
    kernel's epilogue (an active adapter), where a separate GEMM and add would cost launches
    and a pass over y."""
    tokens, in_features = x.shape
    out = values.shape[0]
    if tuple(values.shape) != (out, in_features // 2) or in_features % 4:
        raise ValueError(f"values {tuple(values.shape)} must be (out, in / 2) for x "
                         f"{tuple(x.shape)}, with in a multiple of 4: ({out}, "
                         f"{in_features // 2})")
    cslt_meta = is_cslt_meta(meta)
    if cslt_meta and not (layout_covers(out, in_features)
                          and meta.numel() * 8 == meta_bytes(out, in_features)):
        raise ValueError(f"cuSPARSELt-layout metadata (decode24_cslt_meta) needs out % 64 == 0 "
                         f"and in % 32 == 0 and is ({meta_bytes(out, in_features) // 8},) int64; "
                         f"got {tuple(meta.shape)} for ({out}, {in_features})")
    if not cslt_meta and (meta.dtype != torch.int32
                          or tuple(meta.shape) != (meta_words(in_features), out)):
        raise ValueError(f"metadata must be ({meta_words(in_features)}, {out}) int32 "
                         f"(decode24_layout) or cuSPARSELt's int64 (decode24_cslt_meta), got "
                         f"{tuple(meta.shape)} {meta.dtype}")
    if values.dtype != x.dtype or values.stride(1) != 1 or not meta.is_contiguous():
        raise ValueError(f"values must be row-contiguous in x's dtype {x.dtype} and meta "
                         f"contiguous; got values {values.dtype} with strides "
                         f"{values.stride()}, meta contiguous: {meta.is_contiguous()}")
    if x.stride(1) != 1:
        x = x.contiguous()
    cfg = config or default_config(tokens, out, in_features)
    if cfg.mode == "gatherT":
        if tokens > cfg.block_m:
            raise ValueError(f"gatherT takes at most block_m={cfg.block_m} rows, got {tokens}")
        if tokens == cfg.block_m:
            x = x.t().contiguous()  # a copy, except for one row (then a view of x)
        else:
            xt = x.new_zeros(in_features, cfg.block_m)
            xt[:, :tokens] = x.t()
            x = xt
    if lowrank is not None:
        u, lb, scale = lowrank
        if (u.dim() != 2 or lb.dim() != 2 or u.shape[0] != tokens or lb.shape != (u.shape[1], out)
                or u.dtype != x.dtype or lb.dtype != x.dtype or u.stride(1) != 1
                or not lb.is_contiguous()):
            raise ValueError(f"lowrank u {tuple(u.shape)} {u.dtype} and b {tuple(lb.shape)} "
                             f"{lb.dtype} must be ({tokens}, r) and contiguous (r, {out}) in "
                             f"{x.dtype}")
        rank, block_r = u.shape[1], _rank_block(cfg.block_m, cfg.block_n)
    else:
        u = lb = x
        scale, rank, block_r = 0.0, 0, 16
    grid = (triton.cdiv(out, cfg.block_n), cfg.split_k, triton.cdiv(tokens, cfg.block_m))
    precision = "ieee" if x.dtype == torch.float32 else "tf32"  # tf32: ignored for 16-bit x
    y = torch.empty(tokens, out, dtype=x.dtype, device=x.device)
    if cfg.split_k > 1:
        part = torch.empty(cfg.split_k, tokens, out, dtype=torch.float32, device=x.device)
        locks = _arrival_counters(x.device, grid[0] * grid[2])
    else:
        part = locks = y
    _decode24_kernel[grid](
        x, values, meta, bias if bias is not None else values, y, part, locks, u, lb, tokens,
        out, in_features, rank, float(scale), x.stride(0), values.stride(0), y.stride(0),
        u.stride(0), BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
        SPLIT_K=cfg.split_k, MODE=_MODE_ID[cfg.mode], HAS_BIAS=bias is not None,
        HAS_LOWRANK=lowrank is not None, BLOCK_R=block_r, DOT_PRECISION=precision,
        NUM_STAGES=cfg.num_stages, CSLT_META=cslt_meta, num_warps=cfg.num_warps,
        num_stages=cfg.num_stages)
    return y
