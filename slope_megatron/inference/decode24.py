"""The `decode24` inference kernels: our 2:4 decode GEMM for calls of 1 to 64 tokens.

`InferenceModel(kernels="decode24")`, and "auto" (the default) where cuSPARSELt and Triton
can run: every 2:4 sparse linear gets the decode kernel's metadata - a view of cuSPARSELt's
own where it can (below), else a copy in the layout of `kernels/decode24_layout.py` built
here once from its mask, which is then dropped; the kept values stay as they are - they are
the kernel's values stream. A call of at most 64 tokens for which the layer's plan
(`decode24_plans.py`) names a config runs the Triton kernel (`kernels/decode24_triton.py`);
every other call runs the fallback:
- `HybridDecode24Backend` (CUDA + bf16, where cuSPARSELt can take the layer): the compressed
  cuSPARSELt operand of `compressed.py`. Its values block *is* the kernel's values stream,
  and where its metadata is in the layout of `kernels/decode24_cslt_meta.py` (checked per
  layer) that is the kernel's metadata too: the layer holds one copy of each. Elsewhere it
  holds a copy of the metadata in the kernel's layout (+0.0625x of the dense bf16 bytes).
  Which calls the kernel takes is measured at load (`decode24_plans.py`); layers of a shape
  for which the kernel won no token count drop that copy again.
- `Decode24Backend` (elsewhere: fp16/fp32, shapes cuSPARSELt refuses, Triton's CPU
  interpreter in tests): values + metadata only (0.5625x of dense bf16). The kernel runs every
  call of <= 64 tokens; longer ones (prefill) rebuild W*M in the call for a dense GEMM -
  correct, and slow.
An active adapter's (x A) B / r is added in the kernel's epilogue on the kernel's calls (one
thin GEMM for x A beside it, instead of two GEMMs and a pass over y).
"""
from __future__ import annotations

import logging
import os
from typing import Optional

import torch
import torch.nn.functional as F

from ..sparsity import slope_layers
from ..sparsity.backends.base import SparseLinearBackend
from .compressed import CompressedBackend
from .decode24_plans import Decode24Plans, measure_on_gpu, plan_mode, run_kernel

log = logging.getLogger(__name__)


def interpreted() -> bool:
    """Whether Triton runs its CPU interpreter (TRITON_INTERPRET=1: tests)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def unavailable_reason(device: torch.device) -> Optional[str]:
    """Why the decode kernel cannot run on `device`, or None."""
    if torch.device(device).type != "cuda" and not interpreted():
        return (f"device {device} is not a CUDA device (TRITON_INTERPRET=1 runs the kernel on "
                f"a CPU, slowly, for tests)")
    try:
        import triton  # noqa: F401
    except ImportError:
        return "triton is not installed"
    return None


def layer_reason(layer) -> Optional[str]:
    """Why a SlopeLinear cannot take the decode kernel, or None."""
    if (layer.n, layer.m) != (2, 4):
        return f"{layer.n}:{layer.m} sparsity (the kernel is 2:4 only)"
    return None


def _meta(layer) -> torch.Tensor:
    return layer.__dict__["_decode24"]


def _decode(plans: Decode24Plans, layer, x2: torch.Tensor,
            adapter: Optional[tuple] = None) -> Optional[torch.Tensor]:
    """The kernel's y for x2 (tokens, in), or None where the plan says: fallback. adapter =
    (A (in, r), B (r, out), scale): its (x2 A) B * scale is added in the kernel's epilogue."""
    cfg = plans.choose(layer.out_features, layer.in_features, x2.shape[0])
    return None if cfg is None else run_kernel(layer, x2, _meta(layer), cfg, adapter)


def _decode_with_adapter(plans: Decode24Plans, layer, x: torch.Tensor,
                         adapter: tuple) -> Optional[torch.Tensor]:
    """The kernel's y for x (..., in) with the adapter term, shaped like x, or None
    (fallback)."""
    y = _decode(plans, layer, x.reshape(-1, x.shape[-1]), adapter)
    return None if y is None else y.view(*x.shape[:-1], y.shape[-1])


class Decode24Backend(SparseLinearBackend):
    """Kept values + decode metadata only; the dense W*M is rebuilt for longer calls."""

    name = "decode24-inference"

    def __init__(self, plans: Optional[Decode24Plans] = None):
        self.plans = plans or Decode24Plans(always=True)

    def prepare(self, layer) -> None:
        """Build the layer's metadata from its mask; drop the mask; attach this backend."""
        from slope_megatron.kernels.decode24_layout import pack_meta
        with torch.no_grad():
            layer.__dict__["_decode24"] = pack_meta(layer.mask)
        layer.mask_bits = torch.zeros(0, 0, dtype=torch.uint8, device=layer.weight.device)
        layer.release_unpacked_masks()
        layer.backend = self

    def linear(self, layer, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])
        y = _decode(self.plans, layer, x2)
        if y is None:
            from slope_megatron.kernels.decode24_layout import unpack_decode24
            y = F.linear(x2, unpack_decode24(layer.weight, _meta(layer), layer.in_features),
                         layer.bias)
        return y.view(*x.shape[:-1], y.shape[-1])

    def linear_with_adapter(self, layer, x: torch.Tensor) -> torch.Tensor:
        y = _decode_with_adapter(self.plans, layer, x, (
            layer.adapter_a, layer.adapter_b.contiguous(), layer.adapter_scale))
        return super().linear_with_adapter(layer, x) if y is None else y


class HybridDecode24Backend(CompressedBackend):
    """The cuSPARSELt operand plus decode metadata; the plan picks the kernel per call."""

    name = "decode24+cusparselt-inference"

    def __init__(self, plans: Optional[Decode24Plans] = None):
        super().__init__()
        self.plans = plans or Decode24Plans()
        self.warned_layout = False

    def compress(self, layer) -> None:
        """The cuSPARSELt operand, and the kernel's metadata: cuSPARSELt's own, read in place,
        where its bytes are the layout the kernel knows (`decode24_cslt_meta.py`, checked per
        layer), else a copy in the kernel's layout (+0.0625x of the dense bf16 bytes)."""
        from slope_megatron.kernels.decode24_cslt_meta import in_place_meta, layout_covers
        from slope_megatron.kernels.decode24_layout import pack_meta
        mask, dtype = layer.mask, layer.weight.dtype  # before compress drops the mask
        super().compress(layer)                       # layer.weight: a view of the values
        with torch.no_grad():
            meta = in_place_meta(layer.__dict__["_compressed"].buf, mask, dtype)
            if meta is None:
                if layout_covers(*mask.shape) and not self.warned_layout:
                    self.warned_layout = True
                    log.warning("inference: cuSPARSELt's metadata of a (%d, %d) layer is not "
                                "in the layout the decode kernel reads in place "
                                "(kernels/decode24_cslt_meta.py); such layers keep a copy of "
                                "it (+0.0625x of their dense bf16 bytes). `python -m "
                                "benchmarks.cslt_meta_probe` on this GPU tells what differs.",
                                *mask.shape)
                meta = pack_meta(mask)
        layer.__dict__["_decode24"] = meta

    def _sparse(self, layer, x2: torch.Tensor) -> torch.Tensor:
        y = _decode(self.plans, layer, x2)
        return super()._sparse(layer, x2) if y is None else y

    def linear_with_adapter(self, layer, x: torch.Tensor) -> torch.Tensor:
        adapter = _adapter(layer)
        if adapter is None:  # switched on after loading: the parent's clear error
            return super().linear_with_adapter(layer, x)
        y = _decode_with_adapter(self.plans, layer, x, adapter)
        return super().linear_with_adapter(layer, x) if y is None else y  # None: cuSPARSELt


def _adapter(layer) -> Optional[tuple]:
    """A compressed layer's active adapter as (A, B, scale), or None (inactive at load)."""
    st = layer.__dict__["_compressed"]
    return None if st.adapter_a is None else (st.adapter_a, st.adapter_b, st.adapter_scale)


def drop_unused_meta(layers: list, plans: Decode24Plans) -> int:
    """Drop the decode metadata of layers whose shape the plan never runs the kernel for
    (their calls all go to cuSPARSELt; a copy is freed, a view of cuSPARSELt's frees
    nothing); the number of layers dropped."""
    used = {(out, inp) for out, inp, _ in plans.table}
    dropped = 0
    for layer in layers:
        if (layer.out_features, layer.in_features) not in used:
            layer.__dict__.pop("_decode24", None)
            dropped += 1
    return dropped


def install(model, device: torch.device, dtype: torch.dtype) -> str:
    """Give every 2:4 SlopeLinear of `model` a decode24 backend; returns the kernels note.
    Raises ValueError where the kernel cannot run at all (it was asked for explicitly)."""
    reason = unavailable_reason(device)
    if reason is not None:
        raise ValueError(f"kernels='decode24' cannot run here: {reason}")
    from .compressed import unavailable_reason as cusparselt_reason
    from ..sparsity.backends.cusparselt import static_unsupported_reason
    layers = list(slope_layers(model))
    hybrid = None if cusparselt_reason(device, dtype) is not None else HybridDecode24Backend(
        Decode24Plans(always=plan_mode() == "always"))
    plain = Decode24Backend()
    hybrid_layers, plain_count = [], 0
    for layer in layers:
        why = layer_reason(layer)
        if why is not None:
            log.warning("inference: SlopeLinear(out=%d, in=%d) stays on the reference path: %s",
                        layer.out_features, layer.in_features, why)
        elif hybrid is not None and static_unsupported_reason(layer) is None:
            hybrid.compress(layer)
            hybrid_layers.append(layer)
        else:
            plain.prepare(layer)
            plain_count += 1
    dropped = 0
    if hybrid_layers and not hybrid.plans.always:
        def cusparselt(layer, x2):  # the fallback the kernel must beat, adapter included
            if _adapter(layer) is None:
                return CompressedBackend._sparse(hybrid, layer, x2)
            return CompressedBackend.linear_with_adapter(hybrid, layer, x2)
        hybrid.plans = measure_on_gpu(hybrid_layers, cusparselt, _meta, _adapter)
        dropped = drop_unused_meta(hybrid_layers, hybrid.plans)
    from slope_megatron.kernels.decode24_cslt_meta import is_cslt_meta
    in_place = sum(1 for layer in hybrid_layers if "_decode24" in layer.__dict__
                   and is_cslt_meta(_meta(layer)))
    return kernels_note(len(layers), len(hybrid_layers), dropped,
                        hybrid.plans.describe() if hybrid_layers else "", plain_count, in_place)


def kernels_note(total: int, hybrid: int, dropped: int, plan: str, plain: int,
                 in_place: int = 0) -> str:
    """What runs each sparse linear, for `InferenceModel.kernels_note`: `hybrid` layers on the
    kernel with cuSPARSELt beside it (`dropped` of them on cuSPARSELt only; `in_place` of the
    others reading cuSPARSELt's metadata), `plain` ones on the kernel alone; `plan` describes
    the hybrid layers' plan."""
    parts = []
    kernel = hybrid - dropped
    if kernel:
        meta = ("cuSPARSELt's metadata read in place" if in_place == kernel else
                f"cuSPARSELt's metadata read in place in {in_place}, a copy in the kernel's "
                f"layout in {kernel - in_place}" if in_place else
                "a copy of the metadata in the kernel's layout")
        parts.append(f"{kernel} of {total} sparse linears on the decode kernel ({plan}; "
                     f"{meta}), with cuSPARSELt for other calls")
    if dropped:
        parts.append(f"{dropped} of {total} on cuSPARSELt only (the kernel won no call of "
                     f"their shape)")
    if plain:
        from slope_megatron.kernels.decode24_config import MAX_TOKENS
        parts.append(f"{plain} of {total} sparse linears on the decode kernel for calls of "
                     f"<= {MAX_TOKENS} tokens, rebuilding W*M for longer calls")
    if total - hybrid - plain:
        parts.append(f"{total - hybrid - plain} of {total} on the reference path (see the log)")
    return "; ".join(parts)
