"""A CPU stand-in for the cuSPARSELt runtime, so that CI can run the cusparselt backend's own
logic: its caches, refreshes, staleness keys, operand modes and the adapter inside the GEMM.

Why: the kernels need an H100, but most bugs of the backend are in the bookkeeping around them
(which buffer is current after an optimizer step, a `.data` write, a reload, an `auto`
timing). This fake keeps the two properties the backend relies on (docs/KERNELS.md): a
compressed 2:4 matrix is its kept values in row-major order followed by metadata that depends
only on the pattern (here: each kept value's position in its group of 4), and a matmul reads
exactly that. Everything else (the Triton gathers, the widening pass) is the real code, run by
Triton's CPU interpreter in fp32. Install with `install()` before the first layer call, in a
process with TRITON_INTERPRET=1.
"""
from __future__ import annotations

import torch


def _value_bytes(rows: int, cols: int, dtype: torch.dtype) -> int:
    return rows * cols // 2 * torch.finfo(dtype).bits // 8


def _shape_layout(rows: int, cols: int, layout: str) -> str:
    """"sm90" covers the shapes its model does (`decode24_cslt_meta.layout_covers`); others
    (padded by a real cuSPARSELt) are stored as "positions" here."""
    from slope_megatron.kernels.decode24_cslt_meta import layout_covers
    return layout if layout == "sm90" and layout_covers(rows, cols) else "positions"


def _meta_bytes(rows: int, cols: int, layout: str) -> int:
    layout = _shape_layout(rows, cols, layout)
    return rows * cols // 2 if layout == "positions" else rows * cols // 8


def decompress(buf: torch.Tensor, rows: int, cols: int, dtype: torch.dtype,
               layout: str = "positions") -> torch.Tensor:
    """The dense (rows, cols) matrix a compressed buffer holds."""
    from slope_megatron.kernels.decode24_cslt_meta import positions_from_cslt_meta
    nbytes = _value_bytes(rows, cols, dtype)
    vals = buf[:nbytes].view(dtype).view(rows, cols // 4, 2)
    meta = buf[nbytes:nbytes + _meta_bytes(rows, cols, layout)]
    pos = (meta.view(rows, cols // 4, 2).long()
           if _shape_layout(rows, cols, layout) == "positions" else
           positions_from_cslt_meta(meta.view(torch.int64), rows, cols).view(rows, -1, 2))
    dense = torch.zeros(rows, cols // 4, 4, dtype=dtype)
    return dense.scatter_(-1, pos, vals).view(rows, cols)


class FakeExt:
    """meta_layout: "positions" (one byte per kept value's position) or "sm90" (the layout
    `kernels/decode24_cslt_meta.py` models, which the decode kernel can read in place)."""

    def __init__(self, meta_layout: str = "positions"):
        self.meta_layout = meta_layout

    def compress(self, dense: torch.Tensor, buf: torch.Tensor) -> None:
        """Keep 2 entries per group of 4: the non-zeros first, in order (as cuSPARSELt)."""
        rows, cols = dense.shape
        groups = dense.view(rows, cols // 4, 4)
        rank = (groups == 0).to(torch.int64) * 4 + torch.arange(4)  # non-zeros sort first
        pos = rank.argsort(-1)[..., :2].sort(-1).values
        nbytes = _value_bytes(rows, cols, dense.dtype)
        buf[:nbytes].view(dense.dtype).copy_(groups.gather(-1, pos).reshape(-1))
        if _shape_layout(rows, cols, self.meta_layout) == "positions":
            buf[nbytes:nbytes + rows * cols // 2].copy_(pos.reshape(-1).to(torch.uint8))
        else:
            from slope_megatron.kernels.decode24_cslt_meta import pack_cslt_meta
            mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, pos, True)
            meta = pack_cslt_meta(mask.view(rows, cols)).view(torch.uint8)
            buf[nbytes:nbytes + meta.numel()].copy_(meta)


class FakePlan:
    tuned = True
    plan = None


class FakePlans:
    """Plan cache: `matmul` decompresses and multiplies; `refuse` holds (m, k) shapes whose
    plans "cuSPARSELt" rejects (with the binding's CSLT_CHECK wording); `fail` maps an (m, k)
    shape to an exception its next plan look-up (plan creation, or a matmul) raises once
    (e.g. torch.OutOfMemoryError); `calls` records every (m, k, tokens) multiplied."""

    def __init__(self, meta_layout: str = "positions"):
        self.meta_layout = meta_layout
        self.calls: list[tuple[int, int, int]] = []
        self.refuse: set[tuple[int, int]] = set()
        self.fail: dict[tuple[int, int], BaseException] = {}

    def get(self, m, k, n, dtype, device, bias=False):
        if (m, k) in self.refuse:
            raise RuntimeError(f"cuSPARSELt call cusparseLtMatmulPlanInit(h_, &plan_, &mm_, "
                               f"&sel_) failed: CUSPARSE_STATUS_NOT_SUPPORTED (10): fake "
                               f"refusal of {m}x{k}")
        if (m, k) in self.fail:
            raise self.fail.pop((m, k))
        return FakePlan()

    def matmul(self, a_comp, m, k, b, c=None, beta=0.0, bias=None):
        self.get(m, k, b.shape[0], b.dtype, None)
        self.calls.append((m, k, b.shape[0]))
        y = b @ decompress(a_comp, m, k, b.dtype, self.meta_layout).t()
        if c is not None:
            y = y + beta * c
        return y if bias is None else y + bias


class FakeRuntime:
    """What `cusparselt_runtime.Runtime` offers the backend, on the CPU."""

    def __init__(self, meta_layout: str = "positions"):
        self.ext, self.plans = FakeExt(meta_layout), FakePlans(meta_layout)
        self._scratch: dict[str, torch.Tensor] = {}

    def values_row_major(self, device, dtype) -> bool:
        return True

    def bias_epilogue_ok(self, device, dtype) -> bool:
        return True

    def compressed_buffer_size(self, rows, cols, dtype, device) -> int:
        return _value_bytes(rows, cols, dtype) + _meta_bytes(rows, cols, self.ext.meta_layout)

    def compressed_buffer(self, rows, cols, dtype, device) -> torch.Tensor:
        return torch.empty(self.compressed_buffer_size(rows, cols, dtype, device),
                           dtype=torch.uint8)

    def scratch(self, role, nbytes, device) -> torch.Tensor:
        return self.scratch_base(role, nbytes, device)[:nbytes]

    def scratch_base(self, role, nbytes, device) -> torch.Tensor:
        buf = self._scratch.get(role)
        if buf is None or buf.numel() < nbytes:
            buf = self._scratch[role] = torch.empty(nbytes, dtype=torch.uint8)
        return buf


def install(meta_layout: str = "positions") -> FakeRuntime:
    """Route the cusparselt backend to a fresh FakeRuntime for this process: CPU fp32 inputs
    accepted, the Python autograd functions instead of the native step."""
    from slope_megatron.sparsity.backends import cusparselt, cusparselt_runtime
    rt = FakeRuntime(meta_layout)
    cusparselt_runtime.runtime = lambda: rt
    cusparselt.input_unsupported_reason = lambda layer, x: None
    cusparselt.native_ops = lambda: None
    return rt
