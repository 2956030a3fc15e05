"""The `auto` backend: per (layer shape, token count, dtype, device), sparse only where it wins.

Why: the cusparselt backend's layer step beats dense for large layers at large token counts
but loses to it for small layers or small token counts (host-bound; docs/KERNELS.md). So
`sparsity.backend: auto` does not run every supported shape sparse. The first time a call
with a new key (out, in, tokens, dtypes, device, bias, double pruning, grad mode) arrives, it
times the whole SLoPe layer step on the real operands -- forward + backward (dX and the dW
gather) + the after-step refresh of the compressed copies, as `benchmarks.bench kernels`
does -- for the cusparselt path and for the cublas path (the reference's dense cuBLAS GEMMs on
operands built by Triton, near plain `F.linear` GPU time): 2 warm-up reps, then the median of 5
interleaved, CUDA-event-timed reps each (a few ms per shape; 15 for the re-timing below, which
decides for good). The key is routed to cusparselt
only if its step is at least `min_speedup` (default 1.05, env SLOPE_AUTO_MIN_SPEEDUP) times
faster, else to cublas. One INFO line per decision:
"auto: 768x3072 T=16384 -> cublas (sparse step 0.91x dense)". Calls without gradients
(evaluation) are keyed and timed separately, forward only. Layers trained without double
pruning, and calls cusparselt cannot take, go to cublas untimed (the kernels need W_RC to be
N:M along `out`); cublas runs the reference where it cannot take them either.

Semantics are those of the reference backend either way: both paths compute the same function
(both backends are tested against the reference). Different ranks of a data- or
tensor-parallel job time independently and may route the same shape differently; their
results then differ only within bf16 rounding, which is accepted (no collective is added to
make the decision agree).

Every timed decision is provisional at first: the first call of its key after the layer has
taken `SETTLE_STEPS` (2) more optimizer steps times both paths again, with a median of 15 reps,
and that timing decides for good (logged as "re-timed"). Why: a key is first timed while the
run is not settled -- the first training step (or the first evaluation) compiles its regions
and grows the allocator -- and it misjudged shapes there that a quiet process times
consistently (docs/RESULTS.md). Single 5-rep timings stray even in a quiet process, hence the
longer median of the decisive timing. Counting
steps from the decision, not from the start, makes resumed runs re-time too. Untimed
decisions are final, and so are timings of layers that count no optimizer steps (they are
taken with 15 reps at once).

Decisions live in memory for the life of the process (not persisted: a decision costs a few
ms per shape, and a stored one could outlive a change of kernels, driver or clocks). The
explicit `cusparselt` backend never consults any of this: it stays always-sparse (benchmarks).

Staleness: while a layer's shapes are routed to cublas, its kernel cache
(`layer._cslt_cache`, built by the timing) is not refreshed after optimizer steps. That is
safe: every compressed buffer records the (data_ptr, version) of the weight / mask / column
mask it came from, for the weight also the layer's optimizer-step count, and `sync_forward` /
`sync_backward` re-copy or rebuild at the next sparse call when they differ (an optimizer
step advances the count even where it writes through `.data`, as DeepSpeed's bf16 optimizer
does; ZeRO re-pointing changes data_ptr). With the adapter on, the timings still compare the
plain layer steps, without the adapter.
"""
from __future__ import annotations

import logging
import os
import statistics
from typing import Callable, Optional

import torch

from .base import SparseLinearBackend

log = logging.getLogger(__name__)

WARMUP = 2
REPS = 5
SETTLED_REPS = 15  # the re-timing that decides for good: a median over three times as many
DEFAULT_MIN_SPEEDUP = 1.05
SETTLE_STEPS = 2  # optimizer steps after a provisional decision before it is timed again

Step = Callable[[], None]
Measure = Callable[..., "tuple[float, float]"]  # (sparse_step, dense_step, reps=) -> seconds


def cuda_event_measure(sparse_step: Callable[[], None], dense_step: Callable[[], None],
                       warmup: int = WARMUP, reps: int = REPS) -> tuple[float, float]:
    """Median GPU time (s) between CUDA events around each step, reps interleaved.

    Each rep starts from an idle GPU (synchronize first), so a host-bound step is charged its
    host time, as it is in training when the GPU waits for the host.
    """
    for _ in range(warmup):
        sparse_step()
        dense_step()
    events: list[list] = [[], []]
    for _ in range(reps):
        for i, step in enumerate((sparse_step, dense_step)):
            torch.cuda.synchronize()
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            events[i].append((start, end))
    torch.cuda.synchronize()
    med = [statistics.median(s.elapsed_time(e) for s, e in ev) / 1e3 for ev in events]
    return med[0], med[1]


def _min_speedup() -> float:
    raw = os.environ.get("SLOPE_AUTO_MIN_SPEEDUP")
    if raw is None:
        return DEFAULT_MIN_SPEEDUP
    try:
        return float(raw)
    except ValueError:
        log.warning("ignoring SLOPE_AUTO_MIN_SPEEDUP=%r (not a number)", raw)
        return DEFAULT_MIN_SPEEDUP


class Decision:
    """Where one key runs, and why (for logs and tests)."""

    __slots__ = ("backend", "sparse", "sparse_s", "dense_s", "reason", "final", "step", "first")

    def __init__(self, backend: str, sparse: bool = False, sparse_s: Optional[float] = None,
                 dense_s: Optional[float] = None, reason: str = "", final: bool = True,
                 step: int = 0):
        self.backend, self.sparse = backend, sparse  # backend's name; whether it is the sparse one
        self.sparse_s, self.dense_s, self.reason = sparse_s, dense_s, reason
        self.final = final                    # False: to be timed again once the run settles
        self.step = step                      # the layer's optimizer steps when it was taken
        self.first: Optional[Decision] = None  # the provisional decision a re-timing replaced

    @property
    def speedup(self) -> Optional[float]:
        """Dense time / sparse time (> 1: sparse is faster), None if not timed."""
        if self.sparse_s is None or self.dense_s is None or self.sparse_s <= 0:
            return None
        return self.dense_s / self.sparse_s

    def __repr__(self) -> str:
        return (f"Decision({self.backend!r}, sparse={self.sparse}, speedup={self.speedup}, "
                f"reason={self.reason!r}, final={self.final})")


class AutoBackend(SparseLinearBackend):
    """Delegates each call to the cusparselt or the cublas backend, chosen per key by timing.

    `sparse`, `dense`, `measure` and `eligible` are injectable for tests: `measure(sparse_step,
    dense_step, reps=n) -> (sparse_s, dense_s)`; `eligible(layer, x) -> reason or None` says
    whether the sparse backend can take the call at all (default: the cusparselt backend's own
    checks)."""

    name = "auto"

    def __init__(self, sparse: Optional[SparseLinearBackend] = None,
                 dense: Optional[SparseLinearBackend] = None,
                 measure: Optional[Measure] = None,
                 eligible: Optional[Callable] = None,
                 min_speedup: Optional[float] = None):
        if sparse is None or dense is None:
            from . import get_backend
            sparse = get_backend("cusparselt") if sparse is None else sparse
            dense = get_backend("cublas") if dense is None else dense
        self.sparse, self.dense = sparse, dense
        self.measure = measure if measure is not None else cuda_event_measure
        self.eligible = eligible if eligible is not None else self._cusparselt_eligible
        self.min_speedup = _min_speedup() if min_speedup is None else float(min_speedup)
        self.decisions: dict[tuple, Decision] = {}

    # ---- routing -------------------------------------------------------------------------
    @staticmethod
    def key(layer, x: torch.Tensor) -> tuple:
        tokens = x.numel() // x.shape[-1] if x.shape[-1] else 0
        bias = layer.bias
        return (layer.out_features, layer.in_features, tokens, x.dtype, layer.weight.dtype,
                x.device, None if bias is None else bias.dtype, layer.n, layer.m,
                getattr(layer, "double_prune", True), torch.is_grad_enabled())

    def choose(self, layer, x: torch.Tensor) -> SparseLinearBackend:
        """The backend for this call: both paths are timed on the first call with a new key,
        and once more on its first call `SETTLE_STEPS` optimizer steps later."""
        key = self.key(layer, x)
        decision = self.decisions.get(key)
        if decision is None or (not decision.final
                                and _steps(layer) - decision.step >= SETTLE_STEPS):
            if x.is_cuda and torch.cuda.is_current_stream_capturing():
                # never time inside a CUDA graph capture; decide (or re-time) later
                return self.dense if decision is None else self._route(layer, key, decision)
            decision = self.decisions[key] = self._decide(layer, x, key, first=decision)
        return self._route(layer, key, decision)

    def _route(self, layer, key: tuple, decision: Decision) -> SparseLinearBackend:
        # The training keys this layer now runs sparse: while there are any, its optimizer-step
        # hook refreshes the kernel cache eagerly (no-grad keys re-sync it lazily instead).
        sparse_keys = layer.__dict__.setdefault("_auto_sparse_keys", set())
        if decision.sparse and key[-1]:
            sparse_keys.add(key)
        else:
            sparse_keys.discard(key)
        return self.sparse if decision.sparse else self.dense

    def linear(self, layer, x: torch.Tensor) -> torch.Tensor:
        return self.choose(layer, x).linear(layer, x)

    def linear_with_adapter(self, layer, x: torch.Tensor) -> torch.Tensor:
        return self.choose(layer, x).linear_with_adapter(layer, x)

    def after_optimizer_step(self, layer) -> None:
        # Layers whose training calls do not run sparse now skip the eager refresh; their
        # cache (if the timing built one) re-syncs from the weight's (data_ptr, version) at
        # the next sparse call.
        if routes_sparse(layer):
            self.sparse.after_optimizer_step(layer)

    def on_column_mask_change(self, layer) -> None:
        self.sparse.on_column_mask_change(layer)  # cheap: marks W^T stale if a cache exists

    # ---- deciding -------------------------------------------------------------------------
    def _cusparselt_eligible(self, layer, x: torch.Tensor) -> Optional[str]:
        from . import cusparselt as cslt
        reason = cslt.input_unsupported_reason(layer, x)
        if reason is None:
            reason = self.sparse._plans_reason(layer, x)
        return reason

    def _decide(self, layer, x: torch.Tensor, key: tuple,
                first: Optional[Decision] = None) -> Decision:
        """Time both paths (or refuse untimed); `first` is the provisional decision being
        re-timed, if any (the result is then final)."""
        shape = f"{layer.in_features}x{layer.out_features} T={key[2]}"
        from .cusparselt import NO_DOUBLE_PRUNING
        reason = NO_DOUBLE_PRUNING if not getattr(layer, "double_prune", True) \
            else self.eligible(layer, x)
        if reason is not None:
            decision = Decision(self.dense.name, reason=f"cusparselt cannot take it: {reason}")
            log.info("auto: %s -> %s (%s)", shape, decision.backend, decision.reason)
            return decision
        with_grad = torch.is_grad_enabled()
        sparse_step = self._step(self.sparse, layer, x, with_grad, refresh=True)
        dense_step = self._step(self.dense, layer, x, with_grad, refresh=False)
        # provisional unless re-timing, or the layer counts no optimizer steps to wait for
        final = first is not None or not _counts_steps(layer)
        sparse_s, dense_s = self.measure(sparse_step, dense_step,
                                         reps=SETTLED_REPS if final else REPS)
        if first is not None:
            was = first.speedup
            note = (f"re-timed {_steps(layer) - first.step} optimizer steps later; first "
                    f"timing {was if was is not None else 0:.2f}x")
        else:
            note = "" if final else \
                f"provisional: timed again after {SETTLE_STEPS} more optimizer steps"
        decision = self.decide_from_times(shape, sparse_s, dense_s, with_grad, final=final,
                                          note=note)
        decision.step, decision.first = _steps(layer), first
        return decision

    def decide_from_times(self, shape: str, sparse_s: float, dense_s: float,
                          with_grad: bool = True, final: bool = True,
                          note: str = "") -> Decision:
        """The rule: sparse iff dense_s / sparse_s >= min_speedup (one log line)."""
        decision = Decision(self.dense.name, sparse_s=sparse_s, dense_s=dense_s, final=final)
        speedup = decision.speedup
        if speedup is not None and speedup >= self.min_speedup:
            decision.backend, decision.sparse = self.sparse.name, True
        what = "step" if with_grad else "forward"
        decision.reason = f"sparse {what} {speedup if speedup is not None else 0:.2f}x dense"
        log.info("auto: %s -> %s (%s; %.3f vs %.3f ms%s)", shape, decision.backend,
                 decision.reason, sparse_s * 1e3, dense_s * 1e3, f"; {note}" if note else "")
        return decision

    @staticmethod
    def _step(backend: SparseLinearBackend, layer, x: torch.Tensor, with_grad: bool,
              refresh: bool) -> Callable[[], None]:
        """One layer step on the real operands through `backend`, touching no `.grad`.

        With gradients: forward, then dX, dW (and db) by `torch.autograd.grad` (which does not
        accumulate into the parameters' .grad), then for the sparse path the refresh of the
        compressed copies that follows an optimizer step. Without: the forward only.
        """
        if not with_grad:
            xd = x.detach()

            def fwd() -> None:
                with torch.no_grad():
                    backend.linear(layer, xd)
            return fwd
        xg = x.detach().requires_grad_()
        params = [p for p in (layer.weight, layer.bias) if p is not None and p.requires_grad]

        def step() -> None:
            with torch.enable_grad():
                y = backend.linear(layer, xg)
                torch.autograd.grad(y, [xg, *params], torch.ones_like(y))
                if refresh:
                    backend.after_optimizer_step(layer)
        return step


def _counts_steps(layer) -> bool:
    """Whether the layer counts its optimizer steps (SlopeLinear does), so a provisional
    decision can wait for some."""
    return hasattr(layer, "optimizer_steps")


def _steps(layer) -> int:
    """Optimizer steps the layer has taken (SlopeLinear counts them; 0 for anything else)."""
    return int(getattr(layer, "optimizer_steps", 0))


def routes_sparse(layer) -> bool:
    """Whether `auto` runs any of this layer's training calls on the sparse path now."""
    return bool(layer.__dict__.get("_auto_sparse_keys"))
