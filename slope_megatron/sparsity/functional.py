"""The SLoPe linear as a custom autograd function: the reference semantics.

Forward   Y  = X (W * M)^T + b                       (M: static N:M row mask)
Backward  dX = dY (W * M * M_C)                       (M_C: double-pruned column mask)
          dW = (dY^T X) at M's positions only          (returned as kept-values gradient)
          db = sum of dY over all leading dims

dX is deliberately not the true gradient of the forward: it uses the double-pruned
weight so that, on a GPU, this GEMM runs on sparse tensor cores too. The trainable tensor
is the (out, in*n/m) block of kept values in row-major order of the mask, which is
exactly what ``masked_scatter`` / boolean indexing read and write.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def dense_from_values(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Scatter kept values (out, k) into a dense (out, in) weight that is zero off the mask."""
    dense = torch.zeros(mask.shape, dtype=values.dtype, device=values.device)
    return dense.masked_scatter_(mask, values)


def values_from_dense(dense: torch.Tensor, mask: torch.Tensor,
                      kept_per_row: int | None = None) -> torch.Tensor:
    """Gather the entries of a dense (out, in) tensor at the mask's positions -> (out, k).

    With `kept_per_row` known (N:M masks keep the same count in every row) the gather needs
    no device-to-host sync: boolean indexing must first read the number of True entries
    back to the host, which stalls the GPU queue on every backward.
    """
    if kept_per_row is None:
        return dense[mask].view(mask.shape[0], -1)
    rows = mask.shape[0]
    flat = mask.reshape(-1).nonzero_static(size=rows * kept_per_row).view(-1)
    return dense.reshape(-1).index_select(0, flat).view(rows, kept_per_row)


class SlopeLinearFunction(torch.autograd.Function):
    """Masked-dense reference of the SLoPe linear (runs on any device and dtype)."""

    @staticmethod
    def forward(ctx, x, values, mask, rc_mask, bias):
        weight = dense_from_values(values, mask)
        ctx.save_for_backward(x, values, mask, rc_mask)
        ctx.has_bias = bias is not None
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_out):
        x, values, mask, rc_mask = ctx.saved_tensors
        grad_x = grad_values = grad_bias = None
        if ctx.needs_input_grad[0]:
            if rc_mask is None:
                raise RuntimeError("SlopeLinear backward needs the double-pruned column mask; "
                                   "it is computed in forward when gradients are enabled")
            w_rc = dense_from_values(values, mask) * rc_mask
            grad_x = grad_out @ w_rc
        grad_2d = grad_out.reshape(-1, grad_out.shape[-1])
        if ctx.needs_input_grad[1]:
            grad_dense = grad_2d.t() @ x.reshape(-1, x.shape[-1])
            grad_values = values_from_dense(grad_dense, mask, values.shape[1])
        if ctx.has_bias and ctx.needs_input_grad[4]:
            grad_bias = grad_2d.sum(0)
        return grad_x, grad_values, None, None, grad_bias


def slope_linear(x, values, mask, rc_mask, bias=None):
    """Functional form of the reference SLoPe linear (see the module docstring)."""
    return SlopeLinearFunction.apply(x, values, mask, rc_mask, bias)
