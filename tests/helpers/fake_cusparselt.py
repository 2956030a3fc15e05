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


def decompress(buf: torch.Tensor, rows: int, cols: int, dtype: torch.dtype) -> torch.Tensor:
    """The dense (rows, cols) matrix a compressed buffer holds."""
    nbytes, kept = _value_bytes(rows, cols, dtype), rows * cols // 2
    vals = buf[:nbytes].view(dtype).view(rows, cols // 4, 2)
    pos = buf[nbytes:nbytes + kept].view(rows, cols // 4, 2).long()
    dense = torch.zeros(rows, cols // 4, 4, dtype=dtype)
    return dense.scatter_(-1, pos, vals).view(rows, cols)


class FakeExt:
    def compress(self, dense: torch.Tensor, buf: torch.Tensor) -> None:
        """Keep 2 entries per group of 4: the non-zeros first, in order (as cuSPARSELt)."""
        rows, cols = dense.shape
        groups = dense.view(rows, cols // 4, 4)
        rank = (groups == 0).to(torch.int64) * 4 + torch.arange(4)  # non-zeros sort first
        pos = rank.argsort(-1)[..., :2].sort(-1).values
        nbytes = _value_bytes(rows, cols, dense.dtype)
        buf[:nbytes].view(dense.dtype).copy_(groups.gather(-1, pos).reshape(-1))
        buf[nbytes:nbytes + rows * cols // 2].copy_(pos.reshape(-1).to(torch.uint8))


class FakePlan:
    tuned = True
    plan = None


class FakePlans:
    """Plan cache: `matmul` decompresses and multiplies; `refuse` holds (m, k) shapes whose
    plans "cuSPARSELt" rejects (with the binding's CSLT_CHECK wording); `fail` maps an (m, k)
    shape to an exception its next plan look-up (plan creation, or a matmul) raises once
    (e.g. torch.OutOfMemoryError); `calls` records every (m, k, tokens) multiplied."""

    def __init__(self):
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
        y = b @ decompress(a_comp, m, k, b.dtype).t()
        if c is not None:
            y = y + beta * c
        return y if bias is None else y + bias


class FakeRuntime:
    """What `cusparselt_runtime.Runtime` offers the backend, on the CPU."""

    def __init__(self):
        self.ext, self.plans = FakeExt(), FakePlans()
        self._scratch: dict[str, torch.Tensor] = {}

    def values_row_major(self, device, dtype) -> bool:
        return True

    def bias_epilogue_ok(self, device, dtype) -> bool:
        return True

    def compressed_buffer_size(self, rows, cols, dtype, device) -> int:
        return _value_bytes(rows, cols, dtype) + rows * cols // 2

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


def install() -> FakeRuntime:
    """Route the cusparselt backend to a fresh FakeRuntime for this process: CPU fp32 inputs
    accepted, the Python autograd functions instead of the native step."""
    from slope_megatron.sparsity.backends import cusparselt, cusparselt_runtime
    rt = FakeRuntime()
    cusparselt_runtime.runtime = lambda: rt
    cusparselt.input_unsupported_reason = lambda layer, x: None
    cusparselt.native_ops = lambda: None
    return rt
