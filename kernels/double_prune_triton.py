"""Triton kernels for refreshing SLoPe's double-pruned mask on a GPU (2:4), from packed masks.

Why: `sparsity.column_mask_refresh: 1` (a fresh double-pruned mask every step, as the method
allows) closes SLoPe's loss gap at small scale, but through torch each refresh costs more
than the layer's whole training step (docs/RESULTS.md). The
torch path unpacks the row mask, scatters the kept values into a dense W, sorts every group
of 4 along `out`, packs the result, and then builds the W_RC^T tag matrix in a dozen more
passes. Here each is one pass that reads the kept values and the packed masks:

- `double_prune_bits_2to4(values, mask_bits)`: the double-pruned mask M_R * M_C, packed like
  the row mask: in every group of 4 rows (along `out`) of each column, the 2 largest |W * M|
  (the lower row on ties), and only where the row mask keeps the entry. Bit for bit
  `pack_bits(double_prune_mask(W * M, 2, 4, row_mask=M))`.
- `wt_tag_from_bits(mask_bits, product_bits, dtype)`: `nm_triton.wt_tag_matrix`'s (in, out)
  tag matrix (1 + p + 4 r at kept positions, FILLER padding groups to two entries) from the
  packed masks instead of bool ones.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .nm_triton import FILLER


@triton.jit
def _row_entry(values_ptr, bits_ptr, row, c, ok, k_vals, bytes_per_row):
    """(kept?, |value| as fp32 or 0, rank of the entry among its row group's kept ones) of
    W * M at (row, c) for a vector of columns c."""
    q = c // 4
    byte = tl.load(bits_ptr + row * bytes_per_row + q // 2, mask=ok, other=0).to(tl.int32)
    nib = (byte >> ((q % 2) * 4)) & 15
    pos = c % 4
    kept = ((nib >> pos) & 1) != 0
    below = nib & ((1 << pos) - 1)
    rank = (below & 1) + ((below >> 1) & 1) + ((below >> 2) & 1)
    v = tl.load(values_ptr + row * k_vals + 2 * q + rank, mask=ok & kept, other=0.0)
    return kept, tl.abs(v.to(tl.float32)), rank


@triton.jit
def _beats(a_s, a_r, s_before_r: tl.constexpr):
    """Whether entry s ranks above entry r (larger |w|; on ties the lower row)."""
    if s_before_r:
        return (a_s >= a_r).to(tl.int32)
    return (a_s > a_r).to(tl.int32)


@triton.jit
def _pack_store(out_ptr, row, keep, c, bytes_per_row, BLOCK_C: tl.constexpr):
    """Store bits `keep` of columns c (BLOCK_C of them, starting at a multiple of 8) packed 8 to
    a byte, bit i of byte j being column 8 j + i."""
    weighted = keep.to(tl.int32) << (c % 8)
    packed = tl.sum(tl.reshape(weighted, (BLOCK_C // 8, 8)), axis=1)
    j = tl.program_id(1) * (BLOCK_C // 8) + tl.arange(0, BLOCK_C // 8)
    tl.store(out_ptr + row * bytes_per_row + j, packed.to(tl.uint8), mask=j < bytes_per_row)


@triton.jit
def _double_prune_kernel(values_ptr, bits_ptr, out_ptr, cols, k_vals, bytes_per_row,
                         BLOCK_C: tl.constexpr):
    g = tl.program_id(0).to(tl.int64)  # the group of rows 4g .. 4g+3
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    ok = c < cols
    r0 = 4 * g
    k0, a0, _ = _row_entry(values_ptr, bits_ptr, r0, c, ok, k_vals, bytes_per_row)
    k1, a1, _ = _row_entry(values_ptr, bits_ptr, r0 + 1, c, ok, k_vals, bytes_per_row)
    k2, a2, _ = _row_entry(values_ptr, bits_ptr, r0 + 2, c, ok, k_vals, bytes_per_row)
    k3, a3, _ = _row_entry(values_ptr, bits_ptr, r0 + 3, c, ok, k_vals, bytes_per_row)
    above0 = _beats(a1, a0, False) + _beats(a2, a0, False) + _beats(a3, a0, False)
    above1 = _beats(a0, a1, True) + _beats(a2, a1, False) + _beats(a3, a1, False)
    above2 = _beats(a0, a2, True) + _beats(a1, a2, True) + _beats(a3, a2, False)
    above3 = _beats(a0, a3, True) + _beats(a1, a3, True) + _beats(a2, a3, True)
    _pack_store(out_ptr, r0, k0 & (above0 < 2), c, bytes_per_row, BLOCK_C)
    _pack_store(out_ptr, r0 + 1, k1 & (above1 < 2), c, bytes_per_row, BLOCK_C)
    _pack_store(out_ptr, r0 + 2, k2 & (above2 < 2), c, bytes_per_row, BLOCK_C)
    _pack_store(out_ptr, r0 + 3, k3 & (above3 < 2), c, bytes_per_row, BLOCK_C)


def _check_packed(bits: torch.Tensor, rows: int, cols: int, name: str) -> None:
    assert bits.dtype == torch.uint8 and bits.is_contiguous(), name
    assert bits.shape == (rows, (cols + 7) // 8), (name, tuple(bits.shape), rows, cols)


def double_prune_bits_2to4(values: torch.Tensor, mask_bits: torch.Tensor) -> torch.Tensor:
    """Packed M_R * M_C of a 2:4 layer from its kept values (out, in/2) and packed row mask."""
    rows, half = values.shape
    cols = 2 * half
    assert values.is_contiguous() and rows % 4 == 0 and cols % 4 == 0, (rows, cols)
    _check_packed(mask_bits, rows, cols, "mask_bits")
    out = torch.empty_like(mask_bits)
    block = 128
    grid = (rows // 4, triton.cdiv(cols, block))
    _double_prune_kernel[grid](values, mask_bits, out, cols, half, mask_bits.shape[1],
                               BLOCK_C=block, num_warps=4)
    return out


@triton.jit
def _tag_entry(bits_ptr, prod_ptr, row, c, ok, bytes_per_row):
    """(in the product mask?, code 1 + p + 4 r) of the entry (row, c), p = row % 4."""
    q = c // 4
    off = row * bytes_per_row + q // 2
    shift = (q % 2) * 4
    nib = (tl.load(bits_ptr + off, mask=ok, other=0).to(tl.int32) >> shift) & 15
    prod = (tl.load(prod_ptr + off, mask=ok, other=0).to(tl.int32) >> shift) & 15
    pos = c % 4
    below = nib & ((1 << pos) - 1)
    rank = (below & 1) + ((below >> 1) & 1) + ((below >> 2) & 1)
    return ((prod >> pos) & 1) != 0, 1 + (row % 4).to(tl.int32) + 4 * rank


@triton.jit
def _tag_store(out_ptr, c, row, ok, inside, code, filler, n_rows, FILL: tl.constexpr):
    tag = tl.where(inside, code, tl.where(filler, FILL, 0))
    tl.store(out_ptr + c.to(tl.int64) * n_rows + row, tag.to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _wt_tag_kernel(bits_ptr, prod_ptr, out_ptr, cols, n_rows, bytes_per_row,
                   BLOCK_C: tl.constexpr, FILL: tl.constexpr):
    g = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    ok = c < cols
    r0 = 4 * g
    i0, code0 = _tag_entry(bits_ptr, prod_ptr, r0, c, ok, bytes_per_row)
    i1, code1 = _tag_entry(bits_ptr, prod_ptr, r0 + 1, c, ok, bytes_per_row)
    i2, code2 = _tag_entry(bits_ptr, prod_ptr, r0 + 2, c, ok, bytes_per_row)
    i3, code3 = _tag_entry(bits_ptr, prod_ptr, r0 + 3, c, ok, bytes_per_row)
    f0, f1 = (~i0).to(tl.int32), (~i1).to(tl.int32)
    f2, f3 = (~i2).to(tl.int32), (~i3).to(tl.int32)
    need = 2 - (4 - (f0 + f1 + f2 + f3))  # free slots that become fillers, first ones first
    _tag_store(out_ptr, c, r0, ok, i0, code0, (f0 != 0) & (0 < need), n_rows,
               FILL)
    _tag_store(out_ptr, c, r0 + 1, ok, i1, code1, (f1 != 0) & (f0 < need), n_rows,
               FILL)
    _tag_store(out_ptr, c, r0 + 2, ok, i2, code2, (f2 != 0) & (f0 + f1 < need), n_rows,
               FILL)
    _tag_store(out_ptr, c, r0 + 3, ok, i3, code3, (f3 != 0) & (f0 + f1 + f2 < need), n_rows,
               FILL)


def wt_tag_from_bits(mask_bits: torch.Tensor, product_bits: torch.Tensor, cols: int,
                     dtype: torch.dtype) -> torch.Tensor:
    """`nm_triton.wt_tag_matrix(mask, product_mask, dtype)` from the packed masks: the (in, out)
    tag matrix whose compression gives W_RC^T's metadata and gather codes."""
    rows = mask_bits.shape[0]
    assert rows % 4 == 0 and cols % 4 == 0, (rows, cols)
    _check_packed(mask_bits, rows, cols, "mask_bits")
    _check_packed(product_bits, rows, cols, "product_bits")
    out = torch.empty(cols, rows, dtype=dtype, device=mask_bits.device)
    block = 64
    grid = (rows // 4, triton.cdiv(cols, block))
    _wt_tag_kernel[grid](mask_bits, product_bits, out, cols, rows, mask_bits.shape[1],
                         BLOCK_C=block, FILL=FILLER, num_warps=4)
    return out

