"""The weight layout of the 2:4 decode GEMM (`decode24_triton.py`): kept values + 2-bit indices.

Why this layout: decoding reads every weight once per token, so the kernel must stream as few
bytes as possible in as few, as wide, loads as possible (docs/INFERENCE.md, "The decode GEMM
alone"). A 2:4 weight needs its kept values and, per kept value, its position (0..3) inside
its group of four input columns: 2 bits. Two streams:

- values (out, in/2): the kept values in row-major order of the mask - exactly a
  SlopeLinear's `weight` parameter, and exactly the values block of its cuSPARSELt operand
  (`compressed.py`). The kernel reads that tensor in place: the layout adds no copy of the
  values, and a model compressed for cuSPARSELt can run both kernels from one set of values.
  A program's tile (BLOCK_N rows x BLOCK_K/2 values) is BLOCK_N contiguous runs.
- meta (ceil(in/32), out) int32: word [w, n] holds the positions of kept values 16w .. 16w+15
  of row n, value 16w + j in bits 2j, 2j+1. A group of four input columns is one nibble (its
  first kept position in the low two bits, its second in the high two). Stored word-major
  (transposed) so that a program's metadata for BLOCK_N rows and BLOCK_K input columns is
  BLOCK_K/32 contiguous runs of BLOCK_N words: wide, coalesced loads like the values'. Bits
  past the row's last kept value (in not a multiple of 32) are zero and never used.

Bytes per dense entry: values half the dense bytes, meta 1 bit (1/16 of bf16's 2 bytes):
0.5625x dense in bf16, as cuSPARSELt's operand; 0.0625x more when both are held.

`pack_meta` builds meta once at load from the layer's bool mask; `unpack_decode24` is its
exact inverse back to the dense W*M (and `mask_from_meta` to the mask): the tests' definition.
Pure torch, any device; nothing here needs Triton.
"""
from __future__ import annotations

import torch

GROUP = 4             # 2:4: two kept values in every group of four input columns
KEPT_PER_WORD = 16    # 2-bit positions per int32 word
COLS_PER_WORD = 32    # input columns covered by one word


def meta_words(in_features: int) -> int:
    """Words of metadata per output row."""
    return -(-in_features // COLS_PER_WORD)


def kept_positions(mask: torch.Tensor) -> torch.Tensor:
    """(out, in) bool 2:4 mask -> (out, in/2) int64: each kept value's position in its group
    (the two of a group ascending, as the kept values are stored)."""
    out, inp = mask.shape
    if inp % GROUP:
        raise ValueError(f"a 2:4 mask needs in_features divisible by 4, got {inp}")
    groups = mask.reshape(out, inp // GROUP, GROUP)
    if not bool((groups.sum(-1) == 2).all()):
        raise ValueError("the mask does not keep exactly 2 of every 4 entries along `in`")
    as_int = groups.to(torch.int8)
    first = as_int.argmax(-1)                           # the first True of each group
    second = GROUP - 1 - as_int.flip(-1).argmax(-1)     # the last True
    return torch.stack([first, second], dim=-1).reshape(out, inp // 2)


def pack_meta(mask: torch.Tensor) -> torch.Tensor:
    """(out, in) bool 2:4 mask -> (ceil(in/32), out) int32 metadata (module docstring)."""
    out, inp = mask.shape
    pos = kept_positions(mask)
    words = meta_words(inp)
    pos = torch.nn.functional.pad(pos, (0, words * KEPT_PER_WORD - pos.shape[1]))
    shifts = 2 * torch.arange(KEPT_PER_WORD, device=mask.device, dtype=torch.int64)
    packed = (pos.view(out, words, KEPT_PER_WORD) << shifts).sum(-1)  # 0 .. 2^32 - 1
    packed = torch.where(packed >= 2 ** 31, packed - 2 ** 32, packed)  # int32's bit pattern
    return packed.to(torch.int32).t().contiguous()


def meta_positions(meta: torch.Tensor, in_features: int) -> torch.Tensor:
    """Inverse of the packing in `pack_meta`: (out, in/2) int64 positions in their groups."""
    words, out = meta.shape
    if meta.dtype != torch.int32 or words != meta_words(in_features) or in_features % GROUP:
        raise ValueError(f"metadata for {in_features} input columns is "
                         f"({meta_words(in_features)}, out) int32; got {tuple(meta.shape)} "
                         f"{meta.dtype}")
    shifts = 2 * torch.arange(KEPT_PER_WORD, device=meta.device, dtype=torch.int32)
    pos = (meta.t()[:, :, None] >> shifts) & 3  # arithmetic shift; & 3 keeps the two bits
    return pos.reshape(out, words * KEPT_PER_WORD)[:, :in_features // 2].to(torch.int64)


def mask_from_meta(meta: torch.Tensor, in_features: int) -> torch.Tensor:
    """The (out, in) bool mask that `meta` encodes."""
    pos = meta_positions(meta, in_features)
    out = pos.shape[0]
    mask = torch.zeros(out, in_features // GROUP, GROUP, dtype=torch.bool, device=meta.device)
    mask.scatter_(2, pos.view(out, -1, 2), True)
    return mask.view(out, in_features)


def unpack_decode24(values: torch.Tensor, meta: torch.Tensor, in_features: int) -> torch.Tensor:
    """The dense (out, in) W*M from kept values (out, in/2) and their metadata."""
    out = values.shape[0]
    if tuple(values.shape) != (out, in_features // 2) or meta.shape[1] != out:
        raise ValueError(f"values {tuple(values.shape)} and metadata {tuple(meta.shape)} do "
                         f"not describe one (out, {in_features}) 2:4 weight")
    pos = meta_positions(meta, in_features)
    dense = torch.zeros(out, in_features // GROUP, GROUP, dtype=values.dtype,
                        device=values.device)
    dense.scatter_(2, pos.view(out, -1, 2), values.reshape(out, -1, 2))
    return dense.view(out, in_features)
