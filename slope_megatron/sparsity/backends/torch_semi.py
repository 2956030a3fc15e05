"""The `torch-semi` backend: SLoPe's math on PyTorch's built-in 2:4 path, as a peer to measure.

Why it exists: the paper's released code runs its sparse GEMMs through PyTorch's
`to_sparse_semi_structured` (cuSPARSELt behind `torch._cslt_sparse_mm`). To compare that path
with ours in the same training run, `python -m benchmarks.bench train --arms slope-torch-semi`
runs the whole model on it. It is not meant for training: torch builds a cuSPARSELt plan on every
call with an unsearched algorithm and its compression costs about a matmul (docs/KERNELS.md),
so this backend compresses W*M and W*M*M_C^T on every call, as code on that API has to (the
weights change every optimizer step). Using it sets torch's process-wide
`SparseSemiStructuredTensor._FORCE_CUTLASS = False` (CUTLASS refuses sm90; cuSPARSELt runs).

  forward  Y  = X (W*M)^T + b     F.linear on to_sparse_semi_structured(W*M)
  dX          = dY (W*M*M_C)      F.linear on to_sparse_semi_structured((W*M*M_C)^T)
  dW          = (dY^T X)[M]       dense GEMM + the Triton gather at the mask
  db          = sum of dY

Calls it cannot take (no CUDA, not 2:4, not bf16/fp16, widths torch's path rejects, layers
trained without double pruning) run the cublas backend (dense GEMMs) instead. Without double
pruning (`sparsity.double_prune: false`) the dX operand is (W*M)^T, which is not 2:4 along its
rows, and `to_sparse_semi_structured` does not check the pattern: it would silently multiply
by a different matrix (dX entirely wrong), so such layers are refused as the
cusparselt backend refuses them. Importing this module touches no CUDA.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import cublas
from .cublas import CublasBackend
from .cusparselt import NO_DOUBLE_PRUNING

DTYPES = (torch.bfloat16, torch.float16)
WIDTH_MULTIPLE = 64  # torch's cuSPARSELt layout wants both weight dims in multiples of 64


def call_unsupported_reason(layer, x: torch.Tensor) -> str | None:
    """Why torch's 2:4 path cannot take this call, or None."""
    if not getattr(layer, "double_prune", True):
        return NO_DOUBLE_PRUNING  # (W*M)^T is not 2:4 along its rows: wrong dX, not an error
    reason = cublas.call_unsupported_reason(layer, x)
    if reason is not None:
        return reason
    if layer.weight.dtype not in DTYPES:
        return f"dtype {layer.weight.dtype} (torch's 2:4 path takes bf16 and fp16)"
    for name, dim in (("in_features", layer.in_features), ("out_features", layer.out_features)):
        if dim % WIDTH_MULTIPLE:
            return f"{name}={dim} is not a multiple of {WIDTH_MULTIPLE}"
    return None


def _semi_structured(dense: torch.Tensor):
    from torch.sparse import SparseSemiStructuredTensor, to_sparse_semi_structured
    SparseSemiStructuredTensor._FORCE_CUTLASS = False  # CUTLASS refuses sm90: cuSPARSELt
    return to_sparse_semi_structured(dense)


class TorchSemiSlopeLinearFunction(torch.autograd.Function):
    """The reference's math with both sparse GEMMs on `to_sparse_semi_structured` operands."""

    @staticmethod
    def forward(ctx, x, weight, bias, mask_bits, column_bits):
        from slope_megatron.kernels.nm_triton import scatter_kept_2to4
        values = weight if weight.is_contiguous() else weight.contiguous()
        x2 = x.reshape(-1, x.shape[-1])
        y = F.linear(x2, _semi_structured(scatter_kept_2to4(values, mask_bits)), bias)
        ctx.save_for_backward(x2, weight, mask_bits, column_bits)
        ctx.has_bias = bias is not None
        ctx.x_shape = x.shape
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, grad_out):
        from slope_megatron.kernels.nm_triton import gather_kept_2to4, scatter_kept_2to4
        x2, weight, mask_bits, column_bits = ctx.saved_tensors
        values = weight if weight.is_contiguous() else weight.contiguous()
        gy2 = grad_out.reshape(-1, grad_out.shape[-1])
        grad_x = grad_values = grad_bias = None
        if ctx.needs_input_grad[0]:
            w_rc_t = scatter_kept_2to4(values, mask_bits, column_bits).t().contiguous()
            grad_x = F.linear(gy2, _semi_structured(w_rc_t)).view(ctx.x_shape)
        if ctx.needs_input_grad[1]:
            grad_values = gather_kept_2to4(gy2.t() @ x2, mask_bits)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = gy2.sum(0)
        return grad_x, grad_values, grad_bias, None, None


class TorchSemiBackend(CublasBackend):
    """PyTorch's `to_sparse_semi_structured` for forward and dX, compressed per call."""

    name = "torch-semi"
    function = TorchSemiSlopeLinearFunction
    native = False  # the native step is cublas's GEMMs, not torch's sparse path
    fallback_name = "the cublas backend"

    def unsupported_reason(self, layer, x: torch.Tensor) -> str | None:
        return call_unsupported_reason(layer, x)

    def fallback(self, layer, x: torch.Tensor) -> torch.Tensor:
        from . import get_backend
        return get_backend("cublas").linear(layer, x)
