"""N:M masks: the static row mask of the forward and SLoPe's double-pruned column mask.

Conventions (those of the SLoPe paper): a weight W has shape (out, in) and a linear layer
computes Y = X W^T. The forward mask keeps N of every M consecutive entries along `in`
(the reduction dim of the forward GEMM); the input-gradient GEMM dX = dY W reduces over
`out`, so its operand is pruned a second time N:M along `out` ("double pruning").

Ties are broken deterministically: among equal magnitudes the lower index wins (a stable
sort), so the same weights always give the same mask on every device.
"""
from __future__ import annotations

import torch


def check_nm(n: int, m: int) -> None:
    """Raise a clear ValueError unless 1 <= n < m."""
    if not (isinstance(n, int) and isinstance(m, int)):
        raise ValueError(f"N:M sparsity needs integer n and m, got n={n!r}, m={m!r}")
    if n < 1 or n >= m:
        raise ValueError(f"N:M sparsity needs 1 <= n < m, got n={n}, m={m}")


def _check_weight(weight: torch.Tensor, n: int, m: int, dim_name: str, dim_size: int) -> None:
    check_nm(n, m)
    if weight.dim() != 2:
        raise ValueError(f"N:M masks are defined for 2-D weights (out, in); got a tensor of "
                         f"shape {tuple(weight.shape)}")
    if dim_size % m != 0:
        raise ValueError(f"{dim_name} ({dim_size}) of a weight of shape {tuple(weight.shape)} is "
                         f"not divisible by m={m}; N:M groups need whole groups of m entries")


def _keep_top_n(groups: torch.Tensor, n: int) -> torch.Tensor:
    """Bool mask over the last dim of `groups` keeping the n largest |x| (lower index on ties)."""
    order = torch.argsort(groups.abs(), dim=-1, descending=True, stable=True)
    keep = torch.zeros_like(groups, dtype=torch.bool)
    return keep.scatter_(-1, order[..., :n], True)


@torch.no_grad()
def nm_mask(weight: torch.Tensor, n: int = 2, m: int = 4) -> torch.Tensor:
    """Mask keeping, in every group of `m` consecutive entries of a row, the `n` largest |w|."""
    _check_weight(weight, n, m, "the last dim", weight.shape[-1])
    rows, cols = weight.shape
    groups = weight.detach().reshape(rows, cols // m, m)
    return _keep_top_n(groups, n).reshape(rows, cols)


@torch.no_grad()
def double_prune_mask(sparse_weight: torch.Tensor, n: int = 2, m: int = 4,
                      row_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mask of W_RC: the already-pruned weight pruned again N:M along dim 0 (`out`).

    The result is a subset of `row_mask` (default: the non-zeros of `sparse_weight`), so it is
    the product mask M_R * M_C. For 2:4 on random weights its density is about 40.6%.
    """
    _check_weight(sparse_weight, n, m, "dim 0 (out)", sparse_weight.shape[0])
    if row_mask is None:
        row_mask = sparse_weight != 0
    column = nm_mask(sparse_weight.detach().t(), n, m).t()
    return column & row_mask


def expected_double_pruned_density(n: int, m: int) -> float:
    """Density of W_RC for i.i.d. weights (the paper's Lemma): N/M minus the extra zeros."""
    from math import comb
    check_nm(n, m)
    s = n / m
    extra = sum(comb(m, j) * s ** j * (1 - s) ** (m - j) * (j - n) / m for j in range(n + 1, m + 1))
    return s - extra


def mask_stats(mask: torch.Tensor) -> dict:
    """Density and kept count of a bool mask (for logs)."""
    kept = int(mask.sum())
    return {"kept": kept, "total": mask.numel(), "density": kept / max(1, mask.numel())}


_BIT_WEIGHTS: dict = {}


def _bit_weights(device: torch.device) -> torch.Tensor:
    """1, 2, 4, ..., 128 as uint8 on `device` (made once per device)."""
    w = _BIT_WEIGHTS.get(device)
    if w is None:
        w = _BIT_WEIGHTS[device] = torch.tensor([1 << i for i in range(8)], dtype=torch.uint8,
                                                device=device)
    return w


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """(rows, cols) bool -> (rows, ceil(cols / 8)) uint8: bit i of byte j is column 8 j + i.

    Why: a bool mask costs a byte per weight entry - at 2:4 as much as the kept values'
    bf16 copy - while it holds one bit. Layers store their masks packed (1/8 byte per entry)
    and unpack them only where a bool mask is used (`unpack_bits`). Rows stay separate so a
    row slice of a packed mask is the packed row slice of the mask.
    """
    rows, cols = mask.shape
    m = mask.to(torch.uint8)
    pad = -cols % 8
    if pad:
        m = torch.nn.functional.pad(m, (0, pad))
    return (m.view(rows, -1, 8) * _bit_weights(mask.device)).sum(-1, dtype=torch.uint8)


def unpack_bits(bits: torch.Tensor, cols: int) -> torch.Tensor:
    """Inverse of `pack_bits`: (rows, ceil(cols / 8)) uint8 -> (rows, cols) bool."""
    rows = bits.shape[0]
    if bits.dtype != torch.uint8 or bits.dim() != 2 or bits.shape[1] != (cols + 7) // 8:
        raise ValueError(f"a packed mask of {cols} columns is (rows, {(cols + 7) // 8}) uint8; "
                         f"got {tuple(bits.shape)} {bits.dtype}")
    flat = (bits.unsqueeze(-1) & _bit_weights(bits.device)).view(rows, -1)
    return (flat[:, :cols] != 0).contiguous()
