"""cuSPARSELt's 2:4 metadata on Hopper, as the decode kernel can read it in place.

Why: a model that keeps the cuSPARSELt operand (for prefill) and the decode kernel's own
metadata (`decode24_layout.py`) holds the 2-bit positions twice: 1/16 more of each sparse
layer's dense bf16 bytes (docs/INFERENCE.md, "Weight memory of the default"). If the kernel
reads the positions from cuSPARSELt's buffer, the model holds one copy.

cuSPARSELt does not document its compressed layout. The one modelled here was published as a
reverse-engineered writer for sm90 (xformers' and torchao's sparsify kernels for
`MetadataCusparseLt16bits`, 2025: `store_metadata_reordered`), for a row-major (out, in)
16-bit operand with out % 64 == 0 (that writer: in % 64 == 0; the formula below is extended
here to in % 32 == 0, which the byte comparison covers): the buffer is the kept values
(out * in / 2 elements, row-major) followed by out * in / 8 bytes of metadata. A group of four
input columns is one nibble (its first kept position in the low two bits, its second in the
high two - as in ours), and for row r and group g (columns 4g..4g+3):

    byte  = (r // 64) * 8 * in + (g // 8) * 256 + (r % 64 // 16) * 64 + (r % 8) * 8
            + (g % 4) * 2 + (g % 8) // 4
    nibble: low for r % 16 < 8, high otherwise

So one little-endian int64 holds the 8 groups of a 32-column chunk for rows r and r + 8, and
a 64-row slab's metadata for 32 columns is 256 contiguous bytes. Since nothing guarantees
this, the model is never trusted: `in_place_meta` compares a buffer's metadata byte for byte
with `pack_cslt_meta` of the layer's mask and returns a view only where they are equal; the
caller keeps the kernel's own metadata otherwise. `python -m benchmarks.cslt_meta_probe`
finds the real layout on a GPU where they differ.
Pure torch, any device; nothing here needs Triton.
"""
from __future__ import annotations

from typing import Optional

import torch

from slope_megatron.kernels.decode24_layout import kept_positions

ROWS_PER_SLAB = 64    # the layout's row period
COLS_PER_CHUNK = 32   # input columns per int64 (8 groups of 4)


def layout_covers(out_features: int, in_features: int) -> bool:
    """Whether a weight's shape is one the modelled layout covers."""
    return out_features % ROWS_PER_SLAB == 0 and in_features % COLS_PER_CHUNK == 0


def is_cslt_meta(meta: torch.Tensor) -> bool:
    """Whether decode metadata is cuSPARSELt's (int64, this layout) rather than the kernel's
    own int32 words (`decode24_layout.py`)."""
    return meta.dtype == torch.int64


def meta_bytes(out_features: int, in_features: int) -> int:
    """Bytes of metadata after the values: 4 bits per group of four columns."""
    return out_features * in_features // 8


def pack_cslt_meta(mask: torch.Tensor) -> torch.Tensor:
    """(out, in) bool 2:4 mask -> (out * in / 64,) int64 in the modelled layout (docstring)."""
    out, inp = mask.shape
    if not layout_covers(out, inp):
        raise ValueError(f"the modelled cuSPARSELt layout needs out % 64 == 0 and in % 32 == 0,"
                         f" got ({out}, {inp})")
    pos = kept_positions(mask).view(out, inp // 4, 2)
    nib = (pos[..., 0] | (pos[..., 1] << 2)).to(torch.uint8)
    # rows r = 64 s + 16 b + 8 h + q, groups g = 8 c + 4 e + f
    nib = nib.view(out // 64, 4, 2, 8, inp // 32, 2, 4)                 # s b h q c e f
    byte = nib[:, :, 0] | (nib[:, :, 1] << 4)                          # s b q c e f
    byte = byte.permute(0, 3, 1, 2, 5, 4).contiguous()                 # s c b q f e
    return byte.view(-1).view(torch.int64)


def positions_from_cslt_meta(meta: torch.Tensor, out_features: int,
                             in_features: int) -> torch.Tensor:
    """Inverse of `pack_cslt_meta`: (out, in/2) int64 positions of the kept values in their
    groups, as `decode24_layout.kept_positions` gives them."""
    out, inp = out_features, in_features
    if not is_cslt_meta(meta) or meta.numel() * 8 != meta_bytes(out, inp) \
            or not layout_covers(out, inp):
        raise ValueError(f"cuSPARSELt-layout metadata for ({out}, {inp}) is "
                         f"({meta_bytes(out, inp) // 8},) int64; got {tuple(meta.shape)} "
                         f"{meta.dtype}")
    byte = meta.contiguous().view(torch.uint8).view(out // 64, inp // 32, 4, 8, 4, 2)  # s c b q f e
    byte = byte.permute(0, 2, 3, 1, 5, 4)                                         # s b q c e f
    nib = torch.stack([byte & 15, byte >> 4], dim=2)                              # s b h q c e f
    nib = nib.reshape(out, inp // 4).to(torch.int64)
    return torch.stack([nib & 3, nib >> 2], dim=-1).view(out, inp // 2)


def in_place_meta(buffer: torch.Tensor, mask: torch.Tensor,
                  dtype: torch.dtype = torch.bfloat16) -> Optional[torch.Tensor]:
    """The metadata of a cuSPARSELt buffer (uint8) of the (out, in) weight of `dtype` whose 2:4
    mask is `mask`, as an int64 view into `buffer`, where its bytes are exactly
    `pack_cslt_meta(mask)`; None where the shape does not fit the model, the buffer is too
    short or its metadata not 8-byte aligned for an int64 view, or the bytes differ (another
    layout)."""
    out, inp = mask.shape
    start = out * inp // 2 * dtype.itemsize       # after the kept values
    size = meta_bytes(out, inp)
    if (not layout_covers(out, inp) or buffer.dtype != torch.uint8
            or buffer.numel() < start + size):
        return None
    region = buffer[start:start + size]
    if region.data_ptr() % 8:
        return None
    view = region.view(torch.int64)
    return view if torch.equal(view, pack_cslt_meta(mask)) else None
