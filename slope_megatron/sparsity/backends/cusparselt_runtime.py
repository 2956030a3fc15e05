"""Process-wide state of the cusparselt backend: the native binding, the plan cache and the
start-up check of the compressed layout.

Why a start-up check: the fast refresh (copy the kept values into the compressed buffer, no
compress per step) relies on cuSPARSELt storing a 2:4 matrix's values as the kept entries in
plain row-major order, followed by metadata that depends only on the sparsity pattern. That
was measured on cuSPARSELt 0.8 (shared/probes/cslt_value_refresh.py) but is undocumented, so
it is checked once per (device, dtype) and the backend compresses on every refresh instead if
a library version ever differs.
"""
from __future__ import annotations

import functools
import logging

import torch

log = logging.getLogger(__name__)

# the start-up checks' product (out, in, tokens): small enough to cost nothing, on the
# multiples cuSPARSELt needs (FEATURE_MULTIPLE, TOKEN_MULTIPLE), and more than one row block
# and several 2:4 groups per row, so a misplaced value or bias shows in the error
PROBE_SHAPE = (128, 256, 64)
CALL_FAILED = "cuSPARSELt call "  # how the binding's CSLT_CHECK starts its errors (cslt_plan.h)


def is_rejection(e: BaseException) -> bool:
    """Whether `e` is cuSPARSELt refusing a shape or configuration: a library call that
    returned an error status (plan creation, algorithm search, the matmul), as the binding's
    CSLT_CHECK reports it. Not an out-of-memory (PyTorch's allocator, or the library's own
    CUSPARSE_STATUS_ALLOC_FAILED): that is transient, and treating it as a refusal would move
    the shape to a slower path for good. Not any other error either (a bug, a bad operand)."""
    if not isinstance(e, RuntimeError) or isinstance(e, torch.OutOfMemoryError):
        return False
    text = str(e)
    return CALL_FAILED in text and "ALLOC_FAILED" not in text


class Runtime:
    """The loaded binding, the plan cache, and the per-(device, dtype) layout verdicts."""

    def __init__(self, ext, plans):
        self.ext, self.plans = ext, plans
        self._layout: dict[tuple[int, torch.dtype], bool] = {}
        self._bias: dict[tuple[int, torch.dtype], bool] = {}
        self._scratch: dict[tuple[str, int], torch.Tensor] = {}

    def scratch(self, role: str, nbytes: int, device: torch.device) -> torch.Tensor:
        """The first `nbytes` of the per-device scratch for `role` ("fwd": compressed W, "wt":
        compressed W_RC^T), grown to the largest request. Layers share it in per-call mode:
        each fills it right before its GEMM on the same stream, so no GEMM sees another's
        operand (a replaced buffer is reused only after the work queued on it)."""
        return self.scratch_base(role, nbytes, device)[:nbytes]

    def scratch_base(self, role: str, nbytes: int, device: torch.device) -> torch.Tensor:
        """The whole scratch tensor for `role` (at least `nbytes`); the same object until it
        has to grow, so callers may keep views into it while it is."""
        key = (role, device.index)
        buf = self._scratch.get(key)
        if buf is None or buf.numel() < nbytes:
            buf = self._scratch[key] = torch.empty(nbytes, dtype=torch.uint8, device=device)
        return buf

    def compressed_buffer_size(self, rows: int, cols: int, dtype: torch.dtype,
                               device: torch.device) -> int:
        from slope_megatron.kernels.cslt_plans import dtype_name
        size, _ = self.ext.compressed_size(rows, cols, dtype_name(dtype), device.index)
        return size

    def compressed_buffer(self, rows: int, cols: int, dtype: torch.dtype,
                          device: torch.device) -> torch.Tensor:
        return torch.empty(self.compressed_buffer_size(rows, cols, dtype, device),
                           dtype=torch.uint8, device=device)

    def values_row_major(self, device: torch.device, dtype: torch.dtype) -> bool:
        """True if compressed values == kept values in row-major order (checked once)."""
        key = (device.index, dtype)
        if key not in self._layout:
            ok, why = self._check_layout(device, dtype)
            if not ok:
                log.warning("cuSPARSELt compressed layout differs from the kept-values order "
                            "(%s): the cusparselt backend will compress on every refresh "
                            "(slower, still correct)", why)
            self._layout[key] = ok
        return self._layout[key]

    def bias_epilogue_ok(self, device: torch.device, dtype: torch.dtype) -> bool:
        """True if a plan's bias pointer can change between calls (checked once): then the
        bias is added in the sparse GEMM's epilogue instead of by a pass over Y."""
        key = (device.index, dtype)
        if key not in self._bias:
            try:
                ok, why = self._check_bias(device, dtype)
            except RuntimeError as e:
                ok, why = False, str(e)
            if not ok:
                log.warning("cuSPARSELt bias epilogue unusable (%s): biases are added by a "
                            "separate pass", why)
            self._bias[key] = ok
        return self._bias[key]

    def _check_bias(self, device, dtype) -> tuple[bool, str]:
        from slope_megatron.kernels.cslt_plans import dtype_name
        rows, cols, tokens = PROBE_SHAPE
        gen = torch.Generator(device=device).manual_seed(4321)
        w = torch.randn(rows, cols, device=device, dtype=dtype, generator=gen)
        keep = torch.rand(rows, cols // 4, 4, device=device, generator=gen).argsort(-1)[..., :2]
        mask = torch.zeros(rows, cols // 4, 4, dtype=torch.bool, device=device)
        dense = w * mask.scatter_(-1, keep, True).view(rows, cols)
        buf = self.compressed_buffer(rows, cols, dtype, device)
        self.ext.compress(dense, buf)
        plan = self.ext.Plan(rows, cols, tokens, dtype_name(dtype), device.index, with_bias=True)
        x = torch.randn(tokens, cols, device=device, dtype=dtype, generator=gen)
        for trial in range(3):  # a different bias vector each call, same plan
            bias = torch.randn(rows, device=device, dtype=dtype, generator=gen) * (trial + 1)
            y = plan.matmul(buf, x, None, 0.0, bias)
            ref = x.float() @ dense.float().t() + bias.float()
            err = ((y.float() - ref).norm() / ref.norm()).item()
            if not err < 1e-2:
                return False, f"call {trial} with a new bias vector has rel. error {err:.2e}"
        return True, ""

    def _check_layout(self, device, dtype) -> tuple[bool, str]:
        rows, cols, tokens = PROBE_SHAPE
        gen = torch.Generator(device=device).manual_seed(1234)
        w = torch.randn(rows, cols, device=device, dtype=dtype, generator=gen)
        w = torch.where(w == 0, torch.ones_like(w), w)
        keep = torch.rand(rows, cols // 4, 4, device=device, generator=gen).argsort(-1)[..., :2]
        mask = torch.zeros(rows, cols // 4, 4, dtype=torch.bool, device=device)
        mask = mask.scatter_(-1, keep, True).view(rows, cols)
        dense = w * mask
        n_val = rows * cols // 2
        by_values = self.compressed_buffer(rows, cols, dtype, device)
        by_pattern = torch.empty_like(by_values)
        self.ext.compress(dense, by_values)
        self.ext.compress(mask.to(dtype), by_pattern)
        if not torch.equal(by_values[: n_val * dense.element_size()].view(dtype), dense[mask]):
            return False, "values block is not the kept values in row-major order"
        meta = slice(n_val * dense.element_size(), None)
        if not torch.equal(by_values[meta], by_pattern[meta]):
            return False, "metadata depends on the values, not only on the pattern"
        by_pattern[: n_val * dense.element_size()].view(dtype).copy_(dense[mask])
        x = torch.randn(tokens, cols, device=device, dtype=dtype, generator=gen)
        from slope_megatron.kernels.cslt_plans import dtype_name
        y = self.ext.Plan(rows, cols, tokens, dtype_name(dtype), device.index).matmul(by_pattern, x)
        ref = x.float() @ dense.float().t()
        err = ((y.float() - ref).norm() / ref.norm()).item()
        if not err < 1e-2:
            return False, f"a matmul through a value-refreshed buffer has rel. error {err:.2e}"
        return True, ""


@functools.lru_cache(maxsize=None)
def runtime() -> Runtime:
    """Build/load the binding (first call compiles it) and create the plan cache."""
    from slope_megatron.kernels.cslt_loader import load_extension
    from slope_megatron.kernels.cslt_plans import PlanCache
    ext = load_extension()
    return Runtime(ext, PlanCache(ext))
