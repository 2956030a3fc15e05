"""Per-layer kernel state of the cusparselt backend (kept in `layer._cslt_cache`).

Why a cache: cuSPARSELt multiplies only compressed operands, and compressing costs as much as
a matmul. Because the mask is static, the compressed forward operand W (out x in) never needs
compressing again: its values block IS the kept-values parameter (row-major mask order), so a
refresh is one copy. The double-pruned W_RC^T (in x out, 2:4 along `out`) is compressed only
when its column mask changes; in between, its values block is refreshed by a gather
(`slope_megatron.kernels.nm_triton.gather_wt_values`). Every buffer records the (data_ptr, version) of the
tensor it was made from (for the weight also the layer's optimizer-step count:
`weight_key`), so a re-pointed (ZeRO), updated or externally modified weight is noticed.

Two ways to hold the operands (`SlopeLinear.keep_compressed`, config
`sparsity.keep_compressed`):
- kept (default): each layer owns both compressed buffers (2.25 bytes per weight entry in
  bf16), refreshed once after every optimizer step.
- per call: each layer keeps only the metadata blocks (0.25 bytes per entry) and the W^T
  gather codes; the values are copied/gathered from the kept-values parameter into one
  scratch buffer per device and role right before each GEMM. The GEMMs of one stream run in
  issue order, so layers can share the scratch. Costs a copy (forward) and a gather (dX) per
  call instead of both per optimizer step.

The cache is a plain attribute, not a buffer: state_dict and checkpoints never see it.
"""
from __future__ import annotations

import logging

import torch

from ..functional import dense_from_values

log = logging.getLogger(__name__)


def _key(t: torch.Tensor) -> tuple[int, int]:
    return (t.data_ptr(), t._version)


def weight_key(layer) -> tuple[int, int, int]:
    """What the layer's weight values are identified by: its storage and version counter,
    plus the layer's optimizer-step count. The count is needed because optimizers may write
    through `.data` (DeepSpeed's bf16/fp16 optimizers copy the updated master weights with
    `param.data.copy_()`), which leaves the version counter unchanged."""
    w = layer.weight
    return (w.data_ptr(), w._version, layer.optimizer_steps)


class LayerKernelCache:
    """Compressed W and W_RC^T of one SlopeLinear plus the codes for its gathers."""

    def __init__(self, rt, layer):
        w = layer.weight
        self.rt = rt
        self.out, self.inp = layer.out_features, layer.in_features
        self.dtype, self.device = w.dtype, w.device
        self.n_val = self.out * self.inp // 2
        self.val_bytes = self.n_val * torch.finfo(self.dtype).bits // 8
        self.row_major = rt.values_row_major(self.device, self.dtype)
        self.requested_keep = bool(getattr(layer, "keep_compressed", True))
        self.keep = self.requested_keep
        if not self.keep and not self.row_major:
            log.warning("sparsity.keep_compressed=false needs cuSPARSELt's row-major values "
                        "layout, which this library version does not have: keeping them")
            self.keep = True
        self.bias_fused = layer.bias is not None and rt.bias_epilogue_ok(self.device, self.dtype)
        self.fwd_buf = self.fwd_vals = None  # per-call mode: views into the scratch
        if self.keep:
            self.fwd_buf = rt.compressed_buffer(self.out, self.inp, self.dtype, self.device)
            self.fwd_vals = self._values(self.fwd_buf, self.out)  # views made once (host time)
        self.fwd_meta = self.wt_meta = None  # metadata blocks (per-call mode)
        self._scratch_views: dict = {}  # role -> (scratch tensor, buffer, values, metadata)
        self.wt_buf = self.wt_codes = self.wt_vals = None
        self.wt_row_major = self.row_major
        self.wt_layout_checked = False  # the first W^T build checks the layout (a sync)
        self.mask_key = self.fwd_key = self.wt_mask_key = self.wt_values_key = None
        self.accepted_tokens: set[int] = set()  # token counts that passed the full checks
        self._native_plans: dict[tuple, tuple] = {}  # (tokens, bias, grad) -> plans
        self.adapter_operand = None  # cusparselt_adapter.AugmentedOperand, once adapters run
        self.adapter_factors = None  # cusparselt_adapter.PaddedFactors of the after-GEMM path
        self._build_forward(layer)

    def accepts(self, layer, x: torch.Tensor) -> bool:
        """Cheap re-check for a call like one that already passed the backend's full checks."""
        bias = layer.bias
        return (x.dtype == self.dtype and x.device == self.device and self.matches(layer)
                and (bias is None or bias.dtype == self.dtype)
                and x.numel() // max(1, x.shape[-1]) in self.accepted_tokens)

    def matches(self, layer) -> bool:
        w = layer.weight
        return (w.dtype == self.dtype and w.device == self.device
                and (layer.out_features, layer.in_features) == (self.out, self.inp)
                and bool(getattr(layer, "keep_compressed", True)) == self.requested_keep)

    def _values(self, buf: torch.Tensor, rows: int) -> torch.Tensor:
        """The values block of a compressed buffer, as a (rows, cols/2) view."""
        return buf[:self.val_bytes].view(self.dtype).view(rows, -1)

    def _scratch_for_build(self, role: str, rows: int, cols: int) -> tuple:
        """(buffer, values view) of the scratch for `role`, sized for compressing a (rows,
        cols) operand into it (the metadata is then cloned out)."""
        size = self.rt.compressed_buffer_size(rows, cols, self.dtype, self.device)
        buf = self.rt.scratch(role, size, self.device)
        return buf, self._values(buf, rows)

    def _scratch(self, role: str, meta: torch.Tensor, rows: int) -> tuple:
        """(buffer, values view) of the shared scratch for `role`, metadata block filled in.
        The views are made once per scratch tensor (host time: this runs at every call)."""
        base = self.rt.scratch_base(role, self.val_bytes + meta.numel(), self.device)
        views = self._scratch_views.get(role)
        if views is None or views[0] is not base:
            buf = base[:self.val_bytes + meta.numel()]
            views = self._scratch_views[role] = (base, buf, self._values(buf, rows),
                                                 buf[self.val_bytes:])
        views[3].copy_(meta)
        return views[1], views[2]

    # ---- forward operand W ------------------------------------------------------------
    def _build_forward(self, layer) -> None:
        if self.keep and self.fwd_buf is None:  # released while the adapter ran
            self.fwd_buf = self.rt.compressed_buffer(self.out, self.inp, self.dtype, self.device)
            self.fwd_vals = self._values(self.fwd_buf, self.out)
        if not self.keep:  # per-call: compress into the scratch, keep the metadata only
            self.fwd_buf, self.fwd_vals = self._scratch_for_build("fwd", self.out, self.inp)
        self.rt.ext.compress(layer.mask.to(self.dtype), self.fwd_buf)  # metadata from the pattern
        self.mask_key = _key(layer.mask_bits)
        self.wt_mask_key = None  # the W^T metadata depends on the mask too
        if not self.keep:
            self.fwd_meta = self.fwd_buf[self.val_bytes:].clone()  # refresh fills the scratch
        self.refresh_forward(layer)
        layer.release_unpacked_masks()  # the GEMMs never read the bool masks

    def release_forward(self) -> None:
        """Free the kept forward operand (the adapter phase multiplies by W widened with the
        adapter instead, `cusparselt_adapter`); the next plain forward rebuilds it."""
        if self.keep:
            self.fwd_buf = self.fwd_vals = None
            self.mask_key = None

    def refresh_forward(self, layer) -> None:
        w = layer.weight.detach()
        if not self.keep:
            self.fwd_buf, self.fwd_vals = self._scratch("fwd", self.fwd_meta, self.out)
        if self.row_major:
            self.fwd_vals.copy_(w.view(self.out, -1))
        else:
            self.rt.ext.compress(dense_from_values(w, layer.mask), self.fwd_buf)
        self.fwd_key = weight_key(layer)

    def sync_forward(self, layer) -> None:
        """Make the forward operand match layer.mask and layer.weight (cheap if it does; in
        per-call mode it is built now, for the GEMM that follows)."""
        if _key(layer.mask_bits) != self.mask_key:
            self._build_forward(layer)
        elif not self.keep or weight_key(layer) != self.fwd_key:
            self.refresh_forward(layer)

    # ---- input-gradient operand W_RC^T ---------------------------------------------------
    def _build_wt(self, layer) -> None:
        from slope_megatron.kernels.double_prune_triton import wt_tag_from_bits
        in_scratch = not self._wt_owned()
        if in_scratch:  # per-call: compress into the scratch, keep metadata and codes only
            buf, _ = self._scratch_for_build("wt", self.inp, self.out)
        else:
            buf = self.wt_buf if self.wt_buf is not None else self.rt.compressed_buffer(
                self.inp, self.out, self.dtype, self.device)
        if self.wt_row_major:
            self.rt.ext.compress(wt_tag_from_bits(layer.mask_bits, layer.column_mask_bits,
                                                  self.inp, self.dtype), buf)
            codes = self._values(buf, self.inp).to(torch.uint8)
            if self.wt_layout_checked or self._wt_layout_ok(codes, layer):
                self.wt_codes = codes
            else:
                self.wt_row_major = False
        if not self._wt_owned():
            self.wt_meta = buf[self.val_bytes:].clone()  # refresh_wt fills the scratch
        else:
            if in_scratch:  # the layout check just failed: own the buffer from now on
                buf = self.rt.compressed_buffer(self.inp, self.out, self.dtype, self.device)
            self.wt_buf, self.wt_vals = buf, self._values(buf, self.inp)
        self.wt_mask_key = _key(layer.column_mask_bits)
        self.refresh_wt(layer)
        layer.release_unpacked_masks()

    def _wt_layout_ok(self, codes: torch.Tensor, layer) -> bool:
        """The layout check of the first W^T build: every kept entry has a coded slot, and no
        slot is empty. It reads counts back (a sync), so later rebuilds of this layer (a
        column mask refreshed as often as every step) trust it: the layout belongs to the
        library and the shape, not to the mask."""
        rc = layer.column_mask
        kept, empty, want = torch.stack([((codes >= 1) & (codes <= 8)).sum(), (codes == 0).sum(),
                                         rc.sum()]).tolist()
        if kept != want or empty != 0:
            log.warning("cuSPARSELt W^T layout check failed (%d coded slots for %d kept "
                        "entries, %d empty slots): this layer compresses W^T on every "
                        "refresh, in a buffer of its own", kept, want, empty)
            return False
        self.wt_layout_checked = True
        return True

    def _wt_owned(self) -> bool:
        """Whether W_RC^T lives in this layer's own buffer: kept mode, or a failed layout
        check (then it is compressed at each refresh, which needs the whole buffer)."""
        return self.keep or not self.wt_row_major

    def refresh_wt(self, layer) -> None:
        w = layer.weight.detach()
        if not self._wt_owned():
            self.wt_buf, self.wt_vals = self._scratch("wt", self.wt_meta, self.inp)
        if self.wt_row_major:
            from slope_megatron.kernels.nm_triton import gather_wt_values
            gather_wt_values(w, self.wt_codes, self.wt_vals)
        else:
            w_rc = dense_from_values(w, layer.mask) * layer.column_mask
            self.rt.ext.compress(w_rc.t().contiguous(), self.wt_buf)
        self.wt_values_key = weight_key(layer)

    def sync_backward(self, layer) -> None:
        """Make W_RC^T match layer.column_mask and layer.weight (per-call mode: build it now)."""
        if self.wt_buf is None or _key(layer.column_mask_bits) != self.wt_mask_key:
            self._build_wt(layer)
        elif not self._wt_owned() or weight_key(layer) != self.wt_values_key:
            self.refresh_wt(layer)

    def invalidate_wt(self) -> None:
        self.wt_mask_key = None

    def weight_materialized(self, layer) -> bool:
        """Whether layer.weight holds this layer's kept values now. Not between the forwards
        under DeepSpeed ZeRO-3, which partitions the parameter (`weight.data =
        torch.empty(0)`) and gathers it again in the module's forward hook."""
        return layer.weight.numel() == self.n_val

    def after_step(self, layer, column_mask_will_change: bool) -> None:
        """Refresh after an optimizer step (the weights changed): copy for W, gather for W^T
        (skipped when the column mask is about to be recomputed, which rebuilds W^T anyway).
        Per-call mode has nothing to refresh: the next call builds from the new weights.
        Nor is there anything to copy from while the weight is partitioned (ZeRO-3: the
        optimizer step runs outside forward): the next call's syncs then refresh, as
        `weight_key` counts the optimizer step (`sync_forward`, `sync_backward`, the
        adapter's operand)."""
        if not self.keep or not self.weight_materialized(layer):
            return
        if self.fwd_buf is not None:  # released while the adapter runs
            self.refresh_forward(layer)
        if self.wt_buf is not None and not column_mask_will_change:
            if _key(layer.column_mask_bits) != self.wt_mask_key:
                self._build_wt(layer)
            else:
                self.refresh_wt(layer)

    # ---- the native step ---------------------------------------------------------------
    def native_plans(self, tokens: int, has_bias: bool, with_grad: bool) -> tuple | None:
        """(forward plan, dX plan) for the native layer step (`backends.native`) at this token
        count, once the ones the call uses are tuned (both with gradients, the forward's
        without); None before that. The first call of a token count runs the Python function,
        whose GEMMs search the algorithms. The plan cache never drops a plan, so the raw
        pointers the C++ step keeps for its backward stay valid."""
        key = (tokens, has_bias, with_grad)
        hit = self._native_plans.get(key)
        if hit is None:
            plans, dev = self.rt.plans, self.device.index
            fwd = plans.get(self.out, self.inp, tokens, self.dtype, dev,
                            has_bias and self.bias_fused)
            wt = plans.get(self.inp, self.out, tokens, self.dtype, dev)
            if fwd.tuned and (wt.tuned or not with_grad):
                hit = self._native_plans[key] = (fwd.plan, wt.plan)
        return hit

    def native_wt(self, layer) -> tuple:
        """(W_RC^T operand, codes, metadata) for a native step about to run with gradients (its
        backward runs in C++, so nothing can be prepared there from Python). Operands kept: the
        layer's own buffer, made current now. Per call: the codes and metadata made current
        now, and the shared scratch, which the C++ backward fills right before its GEMM (other
        layers' calls reuse it in between)."""
        if not self._wt_owned() and (self.wt_meta is None
                                     or _key(layer.column_mask_bits) != self.wt_mask_key):
            self._build_wt(layer)  # may find the layout check failing: then owned from now on
        if self._wt_owned():
            self.sync_backward(layer)
            return self.wt_buf, None, None
        scratch = self.rt.scratch_base("wt", self.val_bytes + self.wt_meta.numel(), self.device)
        return scratch, self.wt_codes, self.wt_meta

    # ---- the three GEMMs ------------------------------------------------------------------
    def forward(self, x2: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """Y (T, out) = X (T, in) @ (W*M)^T (+ bias), the bias added in the GEMM epilogue (by
        a separate pass if the epilogue check failed)."""
        fused = bias is not None and self.bias_fused
        y = self.rt.plans.matmul(self.fwd_buf, self.out, self.inp, x2, None, 0.0,
                                 bias if fused else None)
        if bias is not None and not fused:
            y.add_(bias)
        return y

    def grad_input(self, gy2: torch.Tensor) -> torch.Tensor:
        """dX (T, in) = dY (T, out) @ W_RC."""
        return self.rt.plans.matmul(self.wt_buf, self.inp, self.out, gy2)

    def grad_weight(self, gy2: torch.Tensor, x2: torch.Tensor, mask_bits: torch.Tensor
                    ) -> torch.Tensor:
        """d(kept values) (out, in/2) = (dY^T X) at the mask's positions (the packed mask)."""
        from slope_megatron.kernels.nm_triton import gather_kept_2to4
        return gather_kept_2to4(torch.mm(gy2.t(), x2), mask_bits)
