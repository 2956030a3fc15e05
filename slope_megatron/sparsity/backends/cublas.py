"""The `cublas` backend: SLoPe's semantics with dense cuBLAS GEMMs, at plain-dense speed.

Why: where 2:4 sparse tensor cores do not win (small layers, small token counts, the 2048x2048
projection of a 1.3B model), `auto` must run what is fastest without them, and the reference
backend is not that: it rebuilds W*M by `masked_scatter` (a scan of the mask) in forward and
again in backward, and gathers dW by index, ~1.1-4x the time of a plain `F.linear` step
(docs/KERNELS.md). Here the same three GEMMs as the reference run on operands built by one
Triton pass each from the packed masks:
  forward  Y  = X (W*M)^T + b     W*M     scattered from the kept values (`scatter_kept_2to4`)
  dX          = dY (W*M*M_C)      W*M*M_C scattered with the column mask applied
  dW          = (dY^T X)[M]       dense GEMM, gathered at the mask (`gather_kept_2to4`)
  db          = sum of dY
The GEMMs are the reference's own torch calls on the same operands, so for finite weights
results equal the reference's bit for bit on the same device (a NaN weight gives NaN at pruned
positions in the reference's W*M*M_C, 0 here). Nothing is kept between calls (the dense operand
is transient), so the model state is that of the reference. The packed masks themselves are
saved for backward, so changing them between a forward and its backward (refresh_column_mask,
load_state_dict) makes autograd raise; training never does (the column mask is recomputed only
in the first forward after an optimizer step).

Where it can (bf16/fp16, in_features a multiple of 8, the native extension built), the step
runs as one C++ autograd function with CUDA scatter/gather kernels (`backends.native`): the same
ATen calls, so the same bits, at a fraction of the host time. Calls it cannot take (CPU
tensors, sparsity other than 2:4, mixed dtypes, no Triton) run the reference. Importing this
module touches no CUDA and no Triton.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from ..functional import slope_linear
from .base import SparseLinearBackend, log_fallback_once
from .native import native_ops, native_takes


@functools.lru_cache(maxsize=None)
def unavailable_reason() -> str | None:
    """Why this backend's kernels cannot run on this machine, or None if they can."""
    if not torch.cuda.is_available():
        return "CUDA is not available"
    try:
        from slope_megatron.kernels.nm_triton import scatter_kept_2to4
    except ImportError as e:
        return f"triton is not installed ({e})"
    try:  # Triton imports without a C compiler but fails at its first launch: launch one now
        values = torch.zeros(4, 2, device="cuda", dtype=torch.bfloat16)
        scatter_kept_2to4(values, torch.zeros(4, 1, device="cuda", dtype=torch.uint8))
    except Exception as e:  # compiler, driver or PTX problem: say it, run the reference
        return f"a Triton kernel failed to build or launch ({type(e).__name__}: {e})"[:300]
    return None


def call_unsupported_reason(layer, x: torch.Tensor) -> str | None:
    """Why this call must run the reference instead, or None."""
    if not (x.is_cuda and layer.weight.is_cuda):
        return "tensors are not on a CUDA device"
    if (layer.n, layer.m) != (2, 4):
        return f"sparsity {layer.n}:{layer.m} (the Triton scatter/gather handle 2:4)"
    if x.dtype != layer.weight.dtype:
        return f"input dtype {x.dtype} differs from weight dtype {layer.weight.dtype}"
    return unavailable_reason()


class CublasSlopeLinearFunction(torch.autograd.Function):
    """The reference's GEMMs on operands scattered by Triton from the packed masks."""

    @staticmethod
    def forward(ctx, x, weight, bias, mask_bits, column_bits):
        from slope_megatron.kernels.nm_triton import scatter_kept_2to4
        values = weight if weight.is_contiguous() else weight.contiguous()
        y = F.linear(x, scatter_kept_2to4(values, mask_bits), bias)
        ctx.save_for_backward(x, weight, mask_bits, column_bits)
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    def backward(ctx, grad_out):
        from slope_megatron.kernels.nm_triton import gather_kept_2to4, scatter_kept_2to4
        x, weight, mask_bits, column_bits = ctx.saved_tensors
        values = weight if weight.is_contiguous() else weight.contiguous()
        grad_x = grad_values = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_out @ scatter_kept_2to4(values, mask_bits, column_bits)
        grad_2d = grad_out.reshape(-1, grad_out.shape[-1])
        if ctx.needs_input_grad[1]:
            grad_dense = grad_2d.t() @ x.reshape(-1, x.shape[-1])
            grad_values = gather_kept_2to4(grad_dense, mask_bits)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = grad_2d.sum(0)
        return grad_x, grad_values, grad_bias, None, None


class CublasBackend(SparseLinearBackend):
    """Dense cuBLAS GEMMs on W*M / W*M*M_C built per call by Triton from the packed masks.

    Subclasses run other kernels on the same packed-mask operands (`torch_semi`): they set
    `function` and override `unsupported_reason` / `fallback`."""

    name = "cublas"
    function = CublasSlopeLinearFunction
    native = True  # the same step as one C++ autograd function where it can (backends.native)

    def unsupported_reason(self, layer, x: torch.Tensor) -> str | None:
        return call_unsupported_reason(layer, x)

    def fallback(self, layer, x: torch.Tensor) -> torch.Tensor:
        return slope_linear(x, layer.weight, layer.mask, layer.column_mask_for_backward(),
                            layer.bias)

    fallback_name = "the reference backend"

    def linear(self, layer, x: torch.Tensor) -> torch.Tensor:
        reason = self.unsupported_reason(layer, x)
        if reason is not None:
            if x.is_cuda:  # on a GPU a fallback is news (a CPU run is the reference's anyway)
                log_fallback_once(self.name, layer, reason, self.fallback_name)
            return self.fallback(layer, x)
        if torch.is_grad_enabled():
            layer.refresh_column_mask_if_stale()  # the dX operand's mask, as the reference
        if layer._unpacked:  # left by a reference-path call; this path reads the bits
            layer.release_unpacked_masks()
        ext = native_ops() if self.native and native_takes(layer, x) else None
        if ext is not None:
            return ext.dense_slope_linear(x, layer.weight, layer.bias, layer.mask_bits,
                                          layer.column_mask_bits)
        return self.function.apply(x, layer.weight, layer.bias, layer.mask_bits,
                                   layer.column_mask_bits)

    def linear_with_adapter(self, layer, x: torch.Tensor) -> torch.Tensor:
        """Sparse part + the active adapter's (X A)(B / r) (`lowrank.add_adapter`)."""
        from .lowrank import add_adapter
        return add_adapter(layer, x, self.linear(layer, x))
