"""The active adapter's term, (X A)(B / r), added to a backend's sparse output.

Why a module of its own: the cublas backend and the calls the cusparselt backend hands on
(to cublas or the reference) add the adapter the same way, after their own GEMMs; calls the
cusparselt kernels take have the adapter in their own autograd functions
(`cusparselt_adapter`), inside the sparse GEMM or after it. The rank is padded to a multiple of 8 (cuBLAS runs unaligned leading
dimensions such as r = 82 on slow kernels) and, for bf16 / fp16 CUDA outputs, Y + (X A)(B / r)
is one Triton pass over Y (`slope_megatron.kernels.lowrank_triton`) instead of the three passes of matmul,
scale and add. Adding it in cuSPARSELt's epilogue (its C input) or by cuBLAS addmm measured
slower on an H100 (docs/KERNELS.md).
"""
from __future__ import annotations

import torch

TRITON_DTYPES = (torch.bfloat16, torch.float16)


class LowRankAddFunction(torch.autograd.Function):
    """Y + (X A) B, computed by one Triton pass over Y (`slope_megatron.kernels.lowrank_triton`)."""

    @staticmethod
    def forward(ctx, y, xa, b):
        from slope_megatron.kernels.lowrank_triton import lowrank_add
        ctx.save_for_backward(xa, b)
        return lowrank_add(y, xa, b)

    @staticmethod
    def backward(ctx, grad_out):
        xa, b = ctx.saved_tensors
        grad_xa = grad_out @ b.t() if ctx.needs_input_grad[1] else None
        grad_b = xa.t() @ grad_out if ctx.needs_input_grad[2] else None
        return grad_out, grad_xa, grad_b


def add_adapter(layer, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """y + (x A)(B / r) for `layer`'s active adapter (y: the sparse part's output for x)."""
    a, b, scale = layer.adapter_a, layer.adapter_b, layer.adapter_scale
    pad = -a.shape[1] % 8
    if pad:
        a = torch.nn.functional.pad(a, (0, pad))
        b = torch.nn.functional.pad(b, (0, 0, 0, pad))
    xa = x.reshape(-1, x.shape[-1]) @ a
    if not (y.is_cuda and y.dtype in TRITON_DTYPES):  # e.g. the fp32 reference ran
        return y + (xa @ (b * scale)).view(y.shape)
    y2d = y.reshape(-1, y.shape[-1]).contiguous()  # torch-semi's F.linear may give a view
    y2 = LowRankAddFunction.apply(y2d, xa, (b * scale).contiguous())
    return y2.view(y.shape)
