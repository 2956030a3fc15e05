"""The native layer step: whether it can run here, and the switch that turns it off.

Why: a SLoPe layer step through a Python autograd function takes 2-3x the host time of
`nn.Linear` (its backward re-enters Python on autograd's device thread; each Triton launch costs
tens of microseconds), which leaves small and medium models host-bound (docs/KERNELS.md). The
native extension (`kernels/slope_step.cpp`, built with the cuSPARSELt binding) holds the same
steps as C++ autograd functions with CUDA gather/scatter kernels: `sparse_slope_linear` for the
cusparselt backend (operands kept or per call), `dense_slope_linear` for the cublas backend.
They call the same GEMMs as the Python functions, which stay for what the native step does not
take (the first call of a token count, whose GEMMs search their algorithms; fp32; feature sizes
not multiples of 8) and as the comparison path: `SLOPE_NATIVE_STEP=0` turns the native step off
for a whole process. The native step shares its extension with the cuSPARSELt binding: where
that extension cannot build, both are off (docs/KERNELS.md, "The native step").
"""
from __future__ import annotations

import functools
import logging
import os

import torch

log = logging.getLogger(__name__)

NATIVE_DTYPES = (torch.bfloat16, torch.float16)  # the CUDA gather/scatter move 16-bit values
FEATURE_MULTIPLE = 8  # one packed mask byte per 8 entries of a row


@functools.lru_cache(maxsize=None)
def native_ops():
    """The loaded native extension, or None where the native step cannot run (logged once)."""
    if os.environ.get("SLOPE_NATIVE_STEP", "1") == "0":
        log.info("native layer step off (SLOPE_NATIVE_STEP=0): the Python autograd functions run")
        return None
    if not torch.cuda.is_available():
        return None
    try:
        from slope_megatron.kernels.cslt_loader import load_extension
        ext = load_extension()
    except Exception as e:  # no cuSPARSELt wheel, no compiler, ...: the Python path is complete
        log.warning("native layer step unavailable, the Python autograd functions run (more "
                    "host time per layer): %s", e)
        return None
    return ext


def native_takes(layer, x: torch.Tensor) -> bool:
    """Whether the dense native step can take this call (the caller checked device and n:m)."""
    return x.dtype in NATIVE_DTYPES and layer.in_features % FEATURE_MULTIPLE == 0
