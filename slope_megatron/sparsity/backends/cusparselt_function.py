"""The SLoPe linear on sparse tensor cores, as a custom autograd function.

Same semantics as `functional.SlopeLinearFunction` (the reference), different kernels:
  forward  Y  = X (W*M)^T + b       cuSPARSELt, compressed W
  dX          = dY (W*M*M_C)        cuSPARSELt, compressed double-pruned W^T
  dW          = (dY^T X)[M]         cuBLAS dense GEMM + Triton gather at the mask
  db          = sum of dY
(An active adapter runs in `cusparselt_adapter`'s functions, not here.)
The weight tensor is an input only so that autograd returns its gradient and checks it was
not modified in place between forward and backward; the GEMMs read the layer's cache.
"""
from __future__ import annotations

import torch


class CsltSlopeLinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, cache, layer):
        x2 = x.reshape(-1, x.shape[-1])
        if not x2.is_contiguous():
            x2 = x2.contiguous()
        y = cache.forward(x2, bias)
        ctx.save_for_backward(x2, weight)
        ctx.cache, ctx.layer = cache, layer
        ctx.has_bias = bias is not None
        ctx.x_shape = x.shape
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, grad_out):
        x2, _weight = ctx.saved_tensors
        gy2 = grad_out.reshape(-1, grad_out.shape[-1])
        if not gy2.is_contiguous():
            gy2 = gy2.contiguous()
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            ctx.cache.sync_backward(ctx.layer)
            grad_x = ctx.cache.grad_input(gy2).view(ctx.x_shape)
        if ctx.needs_input_grad[1]:
            grad_w = ctx.cache.grad_weight(gy2, x2, ctx.layer.mask_bits)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = gy2.sum(0)
        return grad_x, grad_w, grad_b, None, None
