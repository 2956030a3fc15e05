"""Triton kernels for the memory-bound pieces of the SLoPe linear on a GPU.

Why Triton: both operations are gathers at the 2:4 mask's positions, which torch can only
express with int64 index tensors (16 bytes of index per 2-byte value) or boolean masked_select
(a sync and a nonzero pass). Here the positions are packed in one uint8 per group/slot.

- `gather_kept_2to4(dense, mask_bits)`: dW = (dY^T X)[mask] -> (out, in/2), row-major mask
  order, reading the layer's packed mask (4 bits per group: no codes of its own).
- `scatter_kept_2to4(values, mask_bits, column_bits)`: its inverse, W * M (or W * M * M_C) as
  a dense (out, in) tensor from the kept values, for the dense-GEMM (`cublas`) backend; one
  pass at memory bandwidth where `masked_scatter` needs a scan of the mask.
- `gather_wt_values(weight, codes, out)`: the values block of the compressed double-pruned
  W^T (in, out/2) gathered from the kept-values parameter (out, in/2).
  codes[j, s] = 0 or 9 (FILLER) for an empty slot, else 1 + p + 4 * r: slot s of row j holds
  W[4 * (s // 2) + p, j], which is kept value number r of its row-mask group, i.e.
  weight[4 * (s // 2) + p, (j // 4) * 2 + r].
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _gather_kept_kernel(dense_ptr, bits_ptr, out_ptr, n_groups, groups_per_row, bytes_per_row,
                        BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    g = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = g < n_groups
    row = g // groups_per_row
    col_group = g % groups_per_row
    byte = tl.load(bits_ptr + row * bytes_per_row + col_group // 2, mask=ok, other=0).to(tl.int32)
    nib = (byte >> ((col_group % 2) * 4).to(tl.int32)) & 15  # this group's 4 mask bits
    p0 = tl.where((nib & 1) != 0, 0, tl.where((nib & 2) != 0, 1, tl.where((nib & 4) != 0, 2, 3)))
    p1 = tl.where((nib & 8) != 0, 3, tl.where((nib & 4) != 0, 2, tl.where((nib & 2) != 0, 1, 0)))
    c4 = tl.arange(0, 4)
    tile = tl.load(dense_ptr + g[:, None] * 4 + c4[None, :], mask=ok[:, None], other=0.0)
    v0 = tl.sum(tl.where(c4[None, :] == p0[:, None], tile, 0.0), axis=1)
    v1 = tl.sum(tl.where(c4[None, :] == p1[:, None], tile, 0.0), axis=1)
    c2 = tl.arange(0, 2)
    pair = tl.where(c2[None, :] == 0, v0[:, None], v1[:, None])
    tl.store(out_ptr + g[:, None] * 2 + c2[None, :], pair.to(out_ptr.dtype.element_ty),
             mask=ok[:, None])


def gather_kept_2to4(dense: torch.Tensor, mask_bits: torch.Tensor,
                     out: torch.Tensor | None = None) -> torch.Tensor:
    """Kept entries of a dense (rows, cols) tensor under a 2:4 mask given packed
    (`sparsity.masks.pack_bits`: (rows, ceil(cols / 8)) uint8, the layer's own buffer)."""
    rows, cols = dense.shape
    assert dense.is_contiguous() and mask_bits.is_contiguous() and mask_bits.dtype == torch.uint8
    assert mask_bits.shape == (rows, (cols + 7) // 8) and cols % 4 == 0, (mask_bits.shape,
                                                                          dense.shape)
    if out is None:
        out = torch.empty(rows, cols // 2, dtype=dense.dtype, device=dense.device)
    n_groups = rows * cols // 4
    block = 1024
    _gather_kept_kernel[(triton.cdiv(n_groups, block),)](
        dense, mask_bits, out, n_groups, cols // 4, mask_bits.shape[1], BLOCK=block, num_warps=4)
    return out


@triton.jit
def _scatter_kept_kernel(values_ptr, bits_ptr, col_bits_ptr, out_ptr, n_groups, groups_per_row,
                         bytes_per_row, HAS_COL: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    g = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = g < n_groups
    row = g // groups_per_row
    col_group = g % groups_per_row
    byte_off = row * bytes_per_row + col_group // 2
    shift = ((col_group % 2) * 4).to(tl.int32)
    nib = (tl.load(bits_ptr + byte_off, mask=ok, other=0).to(tl.int32) >> shift) & 15
    p0 = tl.where((nib & 1) != 0, 0, tl.where((nib & 2) != 0, 1, tl.where((nib & 4) != 0, 2, 3)))
    p1 = tl.where((nib & 8) != 0, 3, tl.where((nib & 4) != 0, 2, tl.where((nib & 2) != 0, 1, 0)))
    keep = nib
    if HAS_COL:  # the double-pruned mask is a subset of the row mask: drop what it prunes
        keep = keep & ((tl.load(col_bits_ptr + byte_off, mask=ok, other=0).to(tl.int32)
                        >> shift) & 15)
    v0 = tl.load(values_ptr + g * 2, mask=ok, other=0.0)
    v1 = tl.load(values_ptr + g * 2 + 1, mask=ok, other=0.0)
    c4 = tl.arange(0, 4)
    tile = tl.where(c4[None, :] == p0[:, None], v0[:, None],
                    tl.where(c4[None, :] == p1[:, None], v1[:, None], 0.0))
    tile = tl.where(((keep[:, None] >> c4[None, :]) & 1) != 0, tile, 0.0)
    tl.store(out_ptr + g[:, None] * 4 + c4[None, :], tile.to(out_ptr.dtype.element_ty),
             mask=ok[:, None])


def scatter_kept_2to4(values: torch.Tensor, mask_bits: torch.Tensor,
                      column_bits: torch.Tensor | None = None,
                      out: torch.Tensor | None = None) -> torch.Tensor:
    """Dense (rows, 2 * values.shape[1]) tensor holding `values` (rows, cols / 2; kept entries
    in row-major mask order) at the 2:4 mask's positions and zero elsewhere; with
    `column_bits` (packed like `mask_bits`, a subset of it) also zero where that is 0."""
    rows, half = values.shape
    cols = 2 * half
    assert values.is_contiguous() and mask_bits.is_contiguous() and mask_bits.dtype == torch.uint8
    assert mask_bits.shape == (rows, (cols + 7) // 8) and cols % 4 == 0, (mask_bits.shape,
                                                                          values.shape)
    if column_bits is not None:
        assert column_bits.shape == mask_bits.shape and column_bits.dtype == torch.uint8
        assert column_bits.is_contiguous()
    if out is None:
        out = torch.empty(rows, cols, dtype=values.dtype, device=values.device)
    n_groups = rows * cols // 4
    block = 1024
    _scatter_kept_kernel[(triton.cdiv(n_groups, block),)](
        values, mask_bits, mask_bits if column_bits is None else column_bits, out, n_groups,
        cols // 4, mask_bits.shape[1], HAS_COL=column_bits is not None, BLOCK=block,
        num_warps=4)
    return out


@triton.jit
def _gather_wt_kernel(w_ptr, codes_ptr, out_ptr, n_rows, n_slots, k_w,
                      BJ: tl.constexpr, BS: tl.constexpr):
    pj = tl.program_id(0)
    ps = tl.program_id(1)
    j = pj * BJ + tl.arange(0, BJ)
    s = ps * BS + tl.arange(0, BS)
    ok = (j[:, None] < n_rows) & (s[None, :] < n_slots)
    off = j[:, None].to(tl.int64) * n_slots + s[None, :]
    code = tl.load(codes_ptr + off, mask=ok, other=0).to(tl.int32)
    c = code - 1
    p = c & 3
    r = (c >> 2) & 1
    o = 4 * (s[None, :] // 2) + p
    src = o.to(tl.int64) * k_w + (j[:, None] // 4) * 2 + r
    v = tl.load(w_ptr + src, mask=ok & (code > 0) & (code < 9), other=0.0)
    tl.store(out_ptr + off, v, mask=ok)


def gather_wt_values(weight: torch.Tensor, codes: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Fill `out` (in, out_features/2) with W_RC^T's compressed values from `weight` (see module)."""
    n_rows, n_slots = codes.shape
    assert weight.is_contiguous() and codes.is_contiguous() and out.is_contiguous()
    assert codes.dtype == torch.uint8 and out.shape == codes.shape and out.dtype == weight.dtype
    assert weight.shape == (2 * n_slots, n_rows // 2), (weight.shape, codes.shape)
    bj, bs = 32, 128
    grid = (triton.cdiv(n_rows, bj), triton.cdiv(n_slots, bs))
    _gather_wt_kernel[grid](weight, codes, out, n_rows, n_slots, weight.shape[1],
                            BJ=bj, BS=bs, num_warps=4)
    return out


def _exclusive_count4(g: torch.Tensor) -> torch.Tensor:
    """For a (..., 4) bool tensor: how many True entries precede each entry in its group.

    Explicit adds instead of torch.cumsum: its CUDA scan over a last dim of 4 is orders of
    magnitude slower than three adds on LLM-sized masks."""
    g = g.to(torch.int16)
    c1 = g[..., 0]
    c2 = c1 + g[..., 1]
    return torch.stack([torch.zeros_like(c1), c1, c2, c2 + g[..., 2]], dim=-1)


FILLER = 9  # tag of a slot that only pads a group to two entries (its value is 0)


def wt_tag_matrix(mask: torch.Tensor, product_mask: torch.Tensor, dtype) -> torch.Tensor:
    """(in, out) tag matrix for W_RC^T: 1 + p + 4 r at each kept position (see module), FILLER
    at the first free positions of groups with fewer than two kept entries, 0 elsewhere.

    Compressing it gives the metadata of W_RC^T together with, in its values block, the codes
    that `gather_wt_values` needs. The fillers make every group hold exactly two non-zeros, so
    where the empty slots go is decided here, not by cuSPARSELt (whose compression of groups
    with fewer non-zeros is undocumented).
    """
    rows, cols = mask.shape
    rank = _exclusive_count4(mask.view(rows, cols // 4, 4)).view(rows, cols)
    p = (torch.arange(rows, device=mask.device, dtype=torch.int16) % 4)[:, None]
    code = (1 + p + 4 * rank).to(dtype)
    tag = torch.where(product_mask, code, torch.zeros((), dtype=dtype, device=mask.device))
    t = tag.t().contiguous()
    g = t.view(cols, rows // 4, 4)
    free = g == 0
    need = 2 - (~free).sum(-1, keepdim=True, dtype=torch.int16)
    g.masked_fill_(free & (_exclusive_count4(free) < need), FILLER)
    return t
