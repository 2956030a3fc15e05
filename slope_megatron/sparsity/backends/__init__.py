"""Backend dispatch: `reference` (masked dense math, the definition) | `cusparselt` (sparse
tensor cores) | `cublas` (the reference's dense GEMMs on Triton-built operands: near
plain-dense GPU time) | `torch-semi` (PyTorch's built-in 2:4 path: a peer to benchmark against).

Backends are imported lazily so that nothing CUDA-only is touched on a CPU machine.
`auto` is the `AutoBackend` (auto.py) when CUDA and the cusparselt kernels are available: it
times the cusparselt and the cublas layer step once per (layer shape, token count, dtype,
device) and routes each such key to the faster one, so `auto` is never much slower than dense.
Where cusparselt cannot run, `auto` is `cublas` on a CUDA machine with Triton and `reference`
elsewhere. The explicit `cusparselt` backend runs every shape it can take sparse (always, for
benchmarking) and hands the calls its kernels cannot take to `cublas` (with a one-time log
line), which runs the reference where it cannot take them either.
"""
from __future__ import annotations

import importlib
import logging

import torch

from .base import SparseLinearBackend

log = logging.getLogger(__name__)

_REGISTRY = {
    "reference": ("slope_megatron.sparsity.backends.reference", "ReferenceBackend"),
    "cusparselt": ("slope_megatron.sparsity.backends.cusparselt", "CusparseltBackend"),
    "cublas": ("slope_megatron.sparsity.backends.cublas", "CublasBackend"),
    # a peer for benchmarks: PyTorch's built-in 2:4 path (what the paper's released code uses)
    "torch-semi": ("slope_megatron.sparsity.backends.torch_semi", "TorchSemiBackend"),
    "auto": ("slope_megatron.sparsity.backends.auto", "AutoBackend"),
}
_INSTANCES: dict[str, SparseLinearBackend] = {}


def get_backend(name: str) -> SparseLinearBackend:
    """Return the (shared) backend instance called `name`; 'auto' resolves first (to the
    per-shape AutoBackend where cusparselt can run, else to cublas or the reference)."""
    if name == "auto":
        name = resolve_auto()
    if name not in _REGISTRY:
        raise ValueError(f"unknown sparse backend {name!r}; use one of {', '.join(_REGISTRY)}")
    if name not in _INSTANCES:
        module, cls = _REGISTRY[name]
        _INSTANCES[name] = getattr(importlib.import_module(module), cls)()
    return _INSTANCES[name]


def cusparselt_unavailable_reason() -> str | None:
    """Why the cusparselt backend cannot run here, or None if it can."""
    if not torch.cuda.is_available():
        return "CUDA is not available"
    try:
        module = importlib.import_module(_REGISTRY["cusparselt"][0])
    except ImportError as e:
        return f"its module could not be imported ({e})"
    check = getattr(module, "unavailable_reason", None)
    return check() if check is not None else None


def resolve_auto() -> str:
    """'auto' (per-shape choice between cusparselt and cublas) if cusparselt can run here,
    else 'cublas' if its Triton kernels can, else 'reference'."""
    reason = cusparselt_unavailable_reason()
    if reason is None:
        return "auto"
    from .cublas import unavailable_reason
    if unavailable_reason() is None:
        log.info("sparse backend 'auto' -> 'cublas': cusparselt unavailable (%s)", reason)
        return "cublas"
    log.info("sparse backend 'auto' -> 'reference': cusparselt unavailable (%s)", reason)
    return "reference"
