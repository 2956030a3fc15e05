"""The `cusparselt` backend: SLoPe's three GEMMs on 2:4 sparse tensor cores.

Why: PyTorch's built-in 2:4 path rebuilds its cuSPARSELt plan on every call and never searches
an algorithm, which leaves it slower than dense on Hopper (docs/KERNELS.md). This backend uses `kernels/` (a native binding with cached plans and searched
algorithms, Triton gathers) and keeps the compressed operands in the layer's cache, refreshed
by copy/gather after each optimizer step instead of compressing. Once a token count's plans are
tuned (its first call), the layer step runs as one C++ autograd function (`backends.native`),
in both operand modes; the Python function (`cusparselt_function.py`) runs the first call. An
active adapter runs inside the sparse forward GEMM as extra reduction columns
(`cusparselt_adapter.py`).

What it cannot take it hands to the cublas backend (dense GEMMs; it runs the reference where it
cannot run either), logging the reason once per layer shape: no CUDA / CPU tensors, sparsity
other than 2:4, dtypes other than bfloat16, feature sizes not multiples of 32, token counts not
multiples of 16, shapes cuSPARSELt rejects, and layers trained without double pruning
(`sparsity.double_prune: false`: their dX operand W*M is not N:M along `out`).
Importing this module touches no CUDA: the binding is built on first use.
"""
from __future__ import annotations

import functools
import logging

import torch

from .base import SparseLinearBackend, log_fallback_once
from .native import native_ops

log = logging.getLogger(__name__)

SUPPORTED_DTYPES = (torch.bfloat16,)
FEATURE_MULTIPLE = 32
TOKEN_MULTIPLE = 16


@functools.lru_cache(maxsize=None)
def unavailable_reason() -> str | None:
    """Why this backend cannot run on this machine, or None if it can (result cached)."""
    if not torch.cuda.is_available():
        return "CUDA is not available"
    major, minor = torch.cuda.get_device_capability()
    if major < 8:
        return f"2:4 sparse tensor cores need compute capability 8.0+, this GPU has {major}.{minor}"
    try:
        import triton  # noqa: F401
    except ImportError as e:
        return f"triton is not installed ({e})"
    try:
        from .cusparselt_runtime import runtime
        runtime()
    except Exception as e:  # CusparseltUnavailable, or a build/load error
        return str(e)
    return None


NO_DOUBLE_PRUNING = ("double pruning is off: (W*M)^T is not N:M along its reduction dim, so "
                     "the input-gradient GEMM cannot run on sparse tensor cores")


def static_unsupported_reason(layer) -> str | None:
    """Reason a layer can never use the kernels (independent of its input), or None."""
    if not getattr(layer, "double_prune", True):
        return NO_DOUBLE_PRUNING
    if (layer.n, layer.m) != (2, 4):
        return f"sparsity {layer.n}:{layer.m} (cuSPARSELt supports 2:4 only)"
    if layer.weight.dtype not in SUPPORTED_DTYPES:
        return (f"dtype {layer.weight.dtype} (the cuSPARSELt path is validated for bfloat16; "
                "fp16 search crashed in a probe, fp32 has no 2:4 tensor-core path here)")
    for name, dim in (("in_features", layer.in_features), ("out_features", layer.out_features)):
        if dim % FEATURE_MULTIPLE:
            return f"{name}={dim} is not a multiple of {FEATURE_MULTIPLE}"
    return None


def input_unsupported_reason(layer, x: torch.Tensor) -> str | None:
    """Reason this call cannot use the kernels, or None."""
    if not (x.is_cuda and layer.weight.is_cuda):
        return "tensors are not on a CUDA device"
    reason = unavailable_reason()
    if reason is not None:
        return reason
    reason = static_unsupported_reason(layer)
    if reason is not None:
        return reason
    if x.dtype != layer.weight.dtype:
        return f"input dtype {x.dtype} differs from weight dtype {layer.weight.dtype}"
    if layer.bias is not None and layer.bias.dtype != layer.weight.dtype:
        return f"bias dtype {layer.bias.dtype} differs from weight dtype {layer.weight.dtype}"
    tokens = x.numel() // x.shape[-1] if x.shape[-1] else 0
    if tokens == 0 or tokens % TOKEN_MULTIPLE:
        return f"{tokens} tokens is not a positive multiple of {TOKEN_MULTIPLE}"
    return None


def log_fallback(layer, reason: str) -> None:
    """Log once per (layer shape, reason) that dense GEMMs run instead."""
    log_fallback_once("cusparselt", layer, reason, "dense GEMMs (the cublas backend, or the "
                      "reference where that cannot run)", log)


class CusparseltBackend(SparseLinearBackend):
    """2:4 sparse GEMMs through cuSPARSELt with cached plans and copy/gather refreshes."""

    name = "cusparselt"

    def _accepted_cache(self, layer, x: torch.Tensor):
        """The layer's kernel cache if the kernels can take this call, else None (the reason
        logged once). Full checks run once per token count."""
        if torch.is_grad_enabled():
            layer.refresh_column_mask_if_stale()  # recomputes (and notifies the cache) when due
        cache = layer.__dict__.get("_cslt_cache")
        if cache is None or not cache.accepts(layer, x):
            reason = input_unsupported_reason(layer, x)
            if reason is None:
                reason = self._plans_reason(layer, x)
            if reason is not None:
                log_fallback(layer, reason)
                return None
            cache = self.cache(layer)
            cache.accepted_tokens.add(x.numel() // x.shape[-1])
        if layer._unpacked:  # left by a reference-path call (fallback, auto, evaluation)
            layer.release_unpacked_masks()
        return cache

    def linear(self, layer, x: torch.Tensor) -> torch.Tensor:
        cache = self._accepted_cache(layer, x)
        if cache is None:
            from . import get_backend
            return get_backend("cublas").linear(layer, x)
        cache.sync_forward(layer)
        grad = torch.is_grad_enabled()
        plans = cache.native_plans(x.numel() // x.shape[-1], layer.bias is not None, grad)
        ext = native_ops() if plans is not None else None
        if ext is not None:
            wt = codes = meta = None
            if grad:  # the backward runs in C++: its W^T inputs, now
                wt, codes, meta = cache.native_wt(layer)
            return ext.sparse_slope_linear(x, layer.weight, layer.bias, cache.fwd_buf, wt,
                                           layer.mask_bits, *plans, cache.bias_fused, codes,
                                           meta)
        from .cusparselt_function import CsltSlopeLinearFunction
        return CsltSlopeLinearFunction.apply(x, layer.weight, layer.bias, cache, layer)

    def linear_with_adapter(self, layer, x: torch.Tensor) -> torch.Tensor:
        """Sparse part + the active adapter's (X A)(B / r) (`cusparselt_adapter`): inside the
        sparse GEMM where that pays, else added after it in the same autograd function; where
        this backend cannot take the call, on the fallback's output (`lowrank.add_adapter`)."""
        cache = self._accepted_cache(layer, x)
        if cache is not None:
            from .cusparselt_adapter import after_linear, augmented_linear
            y = augmented_linear(cache, layer, x)
            return y if y is not None else after_linear(cache, layer, x)
        from .lowrank import add_adapter
        return add_adapter(layer, x, self.linear(layer, x))

    def cache(self, layer):
        """The layer's kernel cache, (re)built when missing or made for another shape/device."""
        cache = layer.__dict__.get("_cslt_cache")
        if cache is None or not cache.matches(layer):
            from .cusparselt_cache import LayerKernelCache
            from .cusparselt_runtime import runtime
            cache = LayerKernelCache(runtime(), layer)
            layer.__dict__["_cslt_cache"] = cache
        return cache

    def _plans_reason(self, layer, x: torch.Tensor) -> str | None:
        """Create (once) the forward and dX plans for this token count; report a rejection."""
        from .cusparselt_runtime import runtime
        plans = runtime().plans
        tokens = x.numel() // x.shape[-1]
        dev = x.device.index
        try:
            plans.get(layer.out_features, layer.in_features, tokens, x.dtype, dev,
                      layer.bias is not None and self.cache(layer).bias_fused)
            plans.get(layer.in_features, layer.out_features, tokens, x.dtype, dev)
        except RuntimeError as e:
            if isinstance(e, torch.OutOfMemoryError):
                raise  # not the shape's fault: a fallback (or `auto`'s dense decision) would stick
            return f"cuSPARSELt rejected the shape ({e})"
        return None

    def after_optimizer_step(self, layer) -> None:
        cache = layer.__dict__.get("_cslt_cache")
        if cache is None or not cache.matches(layer):
            return  # built lazily at the next forward
        # a weight partitioned by ZeRO-3 (this runs outside forward) is skipped by after_step:
        # the next forward's syncs see the step count in `weight_key` and refresh then
        stale = getattr(layer, "_column_mask_is_stale", None)
        cache.after_step(layer, column_mask_will_change=bool(stale and stale()))

    def on_column_mask_change(self, layer) -> None:
        cache = layer.__dict__.get("_cslt_cache")
        if cache is not None:
            cache.invalidate_wt()
