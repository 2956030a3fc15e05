"""The non-GEMM regions of a transformer step, as pure tensor functions torch.compile can fuse.

Why: in eager mode a large share of a training step's GPU time is outside the GEMMs (residual
adds, norms, activations, head reshapes, the fp32 cross-entropy; docs/RESULTS.md, per-op
profile), and it is the same for dense and SLoPe - so it caps SLoPe's end-to-end gain. These
functions hold that work; `enable_compile()` makes every later call run a torch.compile'd
version (Inductor fuses each region into a few kernels, forward and backward).

The GEMMs stay outside, opaque to the compiler: SlopeLinear's backends keep per-layer state
(cuSPARSELt plans, compressed operands, refresh counters) that a compiled graph would have to
specialise on layer by layer - 24 blocks would mean 24 graphs. The regions take only tensors
and Python scalars, so one compiled graph serves every block of the model.

Compilation is process-wide (dynamo's caches are) and off by default; the trainer turns it on
per `train.compile` (unset: on for CUDA). Inference runs the regions eagerly (`eager()`),
except in the fixed-shape decode step it captures in a CUDA graph (`scope(True)`): there a
region is compiled once (once more, with a dynamic batch, for a second batch size) and
replayed, and each fused region is a few kernel launches fewer per block and token.
Eager and compiled regions compute the same function, not bitwise: Inductor keeps
intermediates such as x + delta in fp32 inside a fused kernel where eager rounds them.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import os
from typing import Callable, Optional

import torch
import torch._functorch.config  # noqa: F401 - enable_compile sets a flag there
import torch.nn.functional as F

log = logging.getLogger(__name__)

_settings = {"enabled": False, "backend": os.environ.get("SLOPE_COMPILE_BACKEND", "inductor")}
_regions: list["Region"] = []


class Region:
    """A function that runs eagerly, or compiled once `enable_compile()` was called or inside
    `scope(True)`.

    If compiling fails (no working compiler toolchain, an unsupported op on this torch
    version), the region logs one warning with the reason and runs eagerly from then on: the
    result is the same function, only slower, so a run is not lost to a compiler problem.

    Under tensor parallelism the TP ranks agree on it: eager and compiled results are not
    bitwise equal, so one rank running eagerly beside compiled peers would let the
    activations every TP rank holds alike (residual stream, norms) drift apart. At each
    region's first call after `enable_compile()` the TP ranks all-reduce a one-element
    failure flag (one host sync per region, once), and if any rank failed, every rank runs
    that region eagerly. This adds no deadlock the model does not have: TP ranks run the same
    layers in the same order (their row-parallel all-reduces rely on it), so all reach a
    region's first call together. A failure at a later recompilation (a new shape,
    evaluation's no-grad mode) is not agreed on, as that would take a collective at every
    call: a deterministic cause fails on every rank alike, but a one-rank failure there (say,
    a compiler subprocess killed for memory) leaves that rank eager and the TP-replicated
    activations differing by rounding.
    """

    def __init__(self, fn: Callable):
        functools.update_wrapper(self, fn)
        self.fn = fn
        self.compiled: Optional[Callable] = None
        self.backend = None  # the backend `compiled` was built with
        self.failed = False
        self.agreed = False  # whether the TP ranks compared failure flags since enabling
        _regions.append(self)

    def __call__(self, *args):
        if not _settings["enabled"] or self.failed:
            return self.fn(*args)
        if self.compiled is None or self.backend != _settings["backend"]:
            self.backend = _settings["backend"]
            self.compiled = torch.compile(self.fn, fullgraph=True, backend=self.backend)
        out = None
        try:
            out = self.compiled(*args)
        except torch._dynamo.exc.TorchDynamoException as e:  # tracing or backend compile error
            self.failed = True
            cause = getattr(e, "inner_exception", None) or e
            log.warning("torch.compile failed for region %s; it runs eagerly from now on "
                        "(train.compile=false, or generate's --compile off, skips compiling): "
                        "%s: %s",
                        self.fn.__name__, type(cause).__name__, cause)
            log.debug("compile failure of region %s", self.fn.__name__, exc_info=True)
        if not self.agreed:
            self.agreed = True
            if _any_tp_rank(self.failed, args) and not self.failed:
                self.failed = True
                log.warning("torch.compile failed for region %s on another tensor-parallel "
                            "rank; it runs eagerly here too (TP ranks must compute alike)",
                            self.fn.__name__)
        return self.fn(*args) if self.failed else out

    @property
    def is_compiled(self) -> bool:
        """Whether calls run a compiled version (compiled at least once, never failed)."""
        return (self.compiled is not None and not self.failed
                and self.backend == _settings["backend"])


def _any_tp_rank(failed: bool, args: tuple) -> bool:
    """Collective over the TP group (if there is one): whether any TP rank's `failed` is set.
    The flag travels on the device of the region's first tensor argument (NCCL needs GPU
    tensors)."""
    from ..parallel.state import get_parallel_state

    state = get_parallel_state()
    if state is None or state.tp_size == 1 or state.tp_group is None:
        return failed
    import torch.distributed as dist

    device = next((a.device for a in args if torch.is_tensor(a)), torch.device("cpu"))
    flag = torch.tensor([1.0 if failed else 0.0], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=state.tp_group)
    return bool(flag.item())


def region(fn: Callable) -> Region:
    return Region(fn)


def enable_compile(enabled: bool = True, backend: Optional[str] = None) -> None:
    """Run the regions compiled (enabled) or eagerly (not). `backend`: a torch.compile backend,
    default the environment's SLOPE_COMPILE_BACKEND or 'inductor' (CPU tests use 'aot_eager':
    the same graphs without code generation). Enabling starts every region afresh (a region
    that failed to compile before is tried again)."""
    if not enabled:
        _settings["enabled"] = False
        return
    if backend is None:
        backend = os.environ.get("SLOPE_COMPILE_BACKEND", "inductor")
    for r in _regions:
        r.failed = r.agreed = False
    # Compile each backward together with its forward, so that a backward compile error is
    # raised (and caught, see Region) in the forward call rather than inside loss.backward().
    torch._functorch.config.force_non_lazy_backward_lowering = True
    _settings.update(enabled=True, backend=backend)
    log.info("torch.compile on for the block regions (backend %s); the first training step and "
             "the first evaluation compile them (about a minute on a GPU)", backend)


def eager():
    """Run the regions eagerly inside this block (prefill and eager decoding: a new shape at
    every call), whatever the process-wide setting; also a decorator."""
    return scope(False)


@contextlib.contextmanager
def scope(compiled: bool):
    """Run the regions compiled (True) or eagerly (False) inside this block, whatever the
    process-wide setting, with the backend `enable_compile` set last (never set:
    SLOPE_COMPILE_BACKEND, else 'inductor'). A region that failed to compile stays eager."""
    was = _settings["enabled"]
    _settings["enabled"] = compiled
    try:
        yield
    finally:
        _settings["enabled"] = was


def compile_enabled() -> bool:
    return _settings["enabled"]


def resolve_compile(setting: Optional[bool], device: torch.device) -> bool:
    """`train.compile` -> whether to compile: unset means on CUDA devices, off on CPUs (where
    Inductor builds C++ for minutes and a short run would mostly wait for the compiler)."""
    return torch.device(device).type == "cuda" if setting is None else bool(setting)


# ---- the regions ------------------------------------------------------------------------------
@region
def residual_norm(x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor,
                  bias: Optional[torch.Tensor], eps: Optional[float], rms: bool):
    """(x + delta, norm(x + delta)): the residual add and the next pre-norm in one pass."""
    x = x + delta
    if rms:
        return x, F.rms_norm(x, (x.shape[-1],), weight, eps)
    return x, F.layer_norm(x, (x.shape[-1],), weight, bias, eps)


@region
def rotate_pair(qk: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """q and k stacked (2, b, heads, t, head_dim), both rotated in one pass (inference: a
    view into the fused QKV output, rotated without copying q and k out first)."""
    return rotate_half(qk, cos, sin)


def rotate_half(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding, rotate-half form: x * cos + [-x2, x1] * sin (cos/sin in x's dtype)."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * sin


def stacked_heads(qkv: torch.Tensor, num_heads: int) -> torch.Tensor:
    """(b, t, 3*h*d) fused QKV -> a (3, b, h, t, d) view: q, k, v stacked, so that q and k
    can be rotated in one pass (`stacked[:2]`)."""
    b, t, width = qkv.shape
    head_dim = width // (3 * num_heads)
    return qkv.view(b, t, 3, num_heads, head_dim).permute(2, 0, 3, 1, 4)


def split_heads(qkv: torch.Tensor, num_heads: int):
    """(b, t, 3*h*d) fused QKV -> q, k, v of shape (b, h, t, d)."""
    q, k, v = stacked_heads(qkv, num_heads)
    return q, k, v


@region
def causal_attention(qkv: torch.Tensor, num_heads: int, cos: Optional[torch.Tensor],
                     sin: Optional[torch.Tensor], dropout_p: float) -> torch.Tensor:
    """Fused QKV (b, t, 3*h*d) -> causal attention output (b, t, h*d), with rotary when
    cos/sin (t, d) are given. SDPA picks the flash/cuDNN kernel in either mode."""
    b, t, _ = qkv.shape
    q, k, v = split_heads(qkv, num_heads)
    if cos is not None:
        q, k = rotate_half(q, cos, sin), rotate_half(k, cos, sin)
    y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout_p)
    return y.transpose(1, 2).reshape(b, t, -1)


@region
def mlp_activation(a: torch.Tensor, swiglu: bool) -> torch.Tensor:
    """GELU (tanh) for gpt; SwiGLU silu(gate) * up on the fused [gate; up] for llama."""
    if swiglu:
        gate, up = a.chunk(2, dim=-1)
        return F.silu(gate) * up
    return F.gelu(a, approximate="tanh")


@region
def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy in float32 (targets equal to -1 are ignored). Compiled,
    the float32 cast is fused into the softmax reductions instead of materialising fp32
    logits."""
    return F.cross_entropy(logits.float().view(-1, logits.shape[-1]), targets.reshape(-1),
                           ignore_index=-1)
