"""Compressed 2:4 inference on sparse tensor cores: each sparse linear holds one cuSPARSELt
operand (kept values + 2-bit metadata, 0.5625x of the dense bf16 bytes) and nothing else.

Why a separate backend from training's `cusparselt`: training keeps the kept-values parameter,
the bool mask, the double-pruned W^T and their refresh machinery; inference needs only the
forward GEMM. Here the compressed buffer is built once at load time, the layer's `weight`
becomes a view of the buffer's values block (cuSPARSELt stores the kept values row-major,
checked once per device by the training runtime), and its (out, in) bool mask is dropped -
the metadata encodes it. So the model holds no dense copy, no mask and no W^T.

cuSPARSELt needs the token count to be a multiple of 16 and builds one plan (and searches
one algorithm) per count, so inputs are zero-padded to a bucket: 16 for decoding up to 16
sequences, then steps of at most 1/8 of the count (<= 12.5% padding), which bounds the number
of plans a generation server builds. Active adapters add (X A)(B/r) with one addmm into Y;
inactive ones are dropped (they never run at inference).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..sparsity import slope_layers
from ..sparsity.backends.base import SparseLinearBackend

TOKEN_MULTIPLE = 16


def token_bucket(tokens: int) -> int:
    """Padded token count for a cuSPARSELt call: a multiple of 16, at most 12.5% over."""
    if tokens <= TOKEN_MULTIPLE:
        return TOKEN_MULTIPLE
    step = max(TOKEN_MULTIPLE, 1 << max(0, tokens.bit_length() - 4))  # <= tokens / 8
    return -(-tokens // step) * step


def unavailable_reason(device: torch.device, dtype: torch.dtype) -> str | None:
    """Why compressed inference cannot run for this device and dtype, or None."""
    if device.type != "cuda":
        return f"device {device} is not a CUDA device"
    if device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if dtype != torch.bfloat16:
        return f"dtype {dtype} (the cuSPARSELt path is validated for bf16; use --dtype bf16)"
    from ..sparsity.backends.cusparselt import unavailable_reason as kernels_reason
    reason = kernels_reason()
    if reason is not None:
        return reason
    from ..sparsity.backends.cusparselt_runtime import runtime
    if not runtime().values_row_major(device, dtype):
        return "this cuSPARSELt's compressed layout is not the kept values in row-major order"
    return None


class _Compressed:
    """One layer's compressed operand and, if active, its rank-padded adapter factors."""

    __slots__ = ("buf", "out", "inp", "bias_fused", "adapter_a", "adapter_b", "adapter_scale")

    def __init__(self, buf, out, inp, bias_fused):
        self.buf, self.out, self.inp, self.bias_fused = buf, out, inp, bias_fused
        self.adapter_a = self.adapter_b = self.adapter_scale = None


class CompressedBackend(SparseLinearBackend):
    """Forward-only Y = X (W*M)^T (+ b) (+ (X A)(B / r)) through cached cuSPARSELt plans."""

    name = "cusparselt-inference"

    def __init__(self):
        from ..sparsity.backends.cusparselt_runtime import runtime
        self.rt = runtime()

    # ---- building -------------------------------------------------------------------------
    def compress(self, layer) -> None:
        """Replace the layer's kept values + mask by one compressed buffer (values are kept as
        `layer.weight`, a view into it); attach this backend to the layer."""
        w = layer.weight.detach()
        out, inp = layer.out_features, layer.in_features
        buf = self.rt.compressed_buffer(out, inp, w.dtype, w.device)
        self.rt.ext.compress(layer.mask.to(w.dtype), buf)  # metadata from the mask's pattern
        values = buf[: w.numel() * w.element_size()].view(w.dtype).view(out, -1)
        values.copy_(w)  # the values block is the kept values, row-major (checked at start)
        layer.weight = torch.nn.Parameter(values, requires_grad=False)
        # the pattern is in the metadata now
        layer.mask_bits = torch.zeros(0, 0, dtype=torch.uint8, device=w.device)
        layer.release_unpacked_masks()
        state = _Compressed(buf, out, inp, layer.bias is not None
                            and self.rt.bias_epilogue_ok(w.device, w.dtype))
        if layer.adapter_active:
            # cuBLAS runs unaligned ranks (e.g. 82) on slow kernels: pad the rank to a multiple
            # of 8 with zeros; the layer's factors become views of the padded copies.
            a, b = layer.adapter_a.detach(), layer.adapter_b.detach()
            rank, pad = a.shape[1], -a.shape[1] % 8
            state.adapter_a = F.pad(a, (0, pad)).contiguous()
            state.adapter_b = F.pad(b, (0, 0, 0, pad)).contiguous()
            state.adapter_scale = layer.adapter_scale
            layer.adapter_a = torch.nn.Parameter(state.adapter_a[:, :rank], requires_grad=False)
            layer.adapter_b = torch.nn.Parameter(state.adapter_b[:rank], requires_grad=False)
        else:  # an inactive adapter never runs at inference: do not hold it
            layer.adapter_a = layer.adapter_b = None
        layer.__dict__["_compressed"] = state
        layer.backend = self

    # ---- forward --------------------------------------------------------------------------
    def _sparse(self, layer, x2: torch.Tensor) -> torch.Tensor:
        st = layer.__dict__["_compressed"]
        t = x2.shape[0]
        padded = token_bucket(t)
        if padded != t:
            x2 = F.pad(x2, (0, 0, 0, padded - t))
        bias = layer.bias
        y = self.rt.plans.matmul(st.buf, st.out, st.inp, x2.contiguous(), None, 0.0,
                                 bias if st.bias_fused else None)
        y = y[:t]
        if bias is not None and not st.bias_fused:
            y = y + bias
        return y

    def linear(self, layer, x: torch.Tensor) -> torch.Tensor:
        y = self._sparse(layer, x.reshape(-1, x.shape[-1]))
        return y.view(*x.shape[:-1], y.shape[-1])

    def linear_with_adapter(self, layer, x: torch.Tensor) -> torch.Tensor:
        st = layer.__dict__["_compressed"]
        x2 = x.reshape(-1, x.shape[-1])
        y = self._sparse(layer, x2)
        if st.adapter_a is None:  # switched on after loading: its factors were dropped
            raise RuntimeError("this layer's adapter was inactive when it was compressed")
        y = torch.addmm(y, x2 @ st.adapter_a, st.adapter_b, alpha=st.adapter_scale)
        return y.view(*x.shape[:-1], y.shape[-1])


def compress_model(model, backend: CompressedBackend) -> tuple[int, list[str]]:
    """Compress every SlopeLinear the kernels can take; returns (count, reasons for the rest)."""
    from ..sparsity.backends.cusparselt import static_unsupported_reason
    done, skipped = 0, []
    for layer in slope_layers(model):
        reason = static_unsupported_reason(layer)
        if reason is None:
            backend.compress(layer)
            done += 1
        else:
            skipped.append(f"SlopeLinear(out={layer.out_features}, in={layer.in_features}): "
                           f"{reason}")
    return done, skipped
