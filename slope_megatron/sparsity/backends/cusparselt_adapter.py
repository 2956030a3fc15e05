"""The lazy adapter inside the sparse GEMM (cusparselt backend): K-augmentation.

Why: adding (X A)(B / r) after the sparse GEMM costs at least one more read and write of the
T x out output, a large share of the layer's forward at rank 2% (docs/KERNELS.md). Here the
adapter becomes extra reduction columns of the one sparse GEMM:

    [X | (X A) / r spread 2:4] @ [W*M | B^T spread 2:4]^T  =  X (W*M)^T + (X A)(B / r)

"Spread 2:4": rank entries 2g and 2g+1 sit in positions 0 and 1 of group g, positions 2 and 3
are zero, so the adapter's columns are 2:4 like W's and the GEMM stays on sparse tensor cores.
It costs 2R more of `in` (R: the rank padded to a multiple of 16, so that in + 2R keeps
cuSPARSELt's alignment) plus one pass over X (`slope_megatron.kernels.lowrank_triton.widen_with_lowrank`
writes the wide input and X A together). The compressed operand is never compressed again
after its metadata is made from the pattern: its values block is, row by row, W's kept values
followed by B's column (the row-major layout `cusparselt_runtime` checks at start-up; the 1/r
is applied by the widening pass), so a refresh is two copies, needed only after an optimizer
step. The backward is the SLoPe layer's (dX by the double-pruned W_RC^T, dW gathered at the
mask) plus the adapter's small GEMMs. Where the adapter does not pay inside (`inside_pays`) or
cuSPARSELt refuses the widened GEMM, it is added after the plain sparse GEMM, in an autograd
function with the same backward (`AfterAdapterFunction`).
"""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from .base import log_fallback_once
from .cusparselt_cache import _key, weight_key
from .cusparselt_runtime import is_rejection

log = logging.getLogger(__name__)

RANK_MULTIPLE = 16  # in + 2R stays a multiple of 32, as cuSPARSELt wants


def padded_rank(rank: int) -> int:
    return rank + (-rank % RANK_MULTIPLE)


def inside_pays(layer) -> bool:
    """Whether the adapter is cheaper inside the GEMM than after it, by memory traffic: inside
    costs a pass that reads and writes X (2 T in, plus 2R/in more GEMM); after it, X A reads X
    and the Triton pass reads and writes Y (T in + 2 T out). So inside wins when in < 2 out
    (projections, MLP up), after when the layer narrows (MLP down: in = 2.7-4x out), which
    the H100 measurements bear out (docs/KERNELS.md)."""
    return layer.in_features < 2 * layer.out_features


def adapter_key(layer) -> tuple:
    """What the adapter's values are identified by (as `weight_key`: storage, version
    counters and the optimizer-step count, since optimizers may write through `.data`)."""
    a, b = layer.adapter_a, layer.adapter_b
    return (a.data_ptr(), a._version, b.data_ptr(), b._version, layer.optimizer_steps)


def _pad_to(t: torch.Tensor, dim: int, size: int) -> torch.Tensor:
    """A copy of t zero-padded along dim to `size`. Always a copy: the backward reads it, and
    a parameter's storage may be re-pointed or reused in between (ZeRO-3 gathers and frees
    parameters around each forward)."""
    t = t.detach()
    pad = size - t.shape[dim]
    if not pad:
        return t.clone(memory_format=torch.contiguous_format)
    return F.pad(t, (0, pad) if dim == 1 else (0, 0, 0, pad))


class PaddedFactors:
    """The adapter's A (in, R) and B (R, out), zero-padded to R: the widening pass and the
    backward's small GEMMs then run on aligned shapes (cuBLAS takes a slow unaligned kernel for
    N = 41). Copies, refreshed when the adapter changed (`adapter_key`); the padding's rows and
    columns stay zero, so X A, d(X A) and the gradients are padded with zeros."""

    def __init__(self, rank: int):
        self.rank = rank
        self.a = self.b = None
        self.key = None

    def sync(self, layer) -> bool:
        """Make a and b current; whether they changed."""
        key = adapter_key(layer)
        if key == self.key:
            return False
        self.a = _pad_to(layer.adapter_a, 1, self.rank)
        self.b = _pad_to(layer.adapter_b, 0, self.rank)
        self.key = key
        return True


class AugmentedOperand:
    """Compressed [W*M | B^T spread 2:4] of one layer, kept in its kernel cache, plus the
    adapter's A and B padded to the rank R. The scale 1/r is applied to X A when the
    widening pass writes it, so the operand holds B as it is and changes only when an
    optimizer step changes W or B.

    Operands kept (the cache's mode): a buffer of its own, refreshed by copies after W or B
    changed; the layer's plain forward operand is released meanwhile (the adapter phase
    never uses it). Per call: only the metadata is kept and the values are copied into the
    shared scratch before each GEMM, as the plain forward does."""

    def __init__(self, cache, layer):
        self.cache = cache
        self.rank = padded_rank(layer.adapter_rank)
        self.k = cache.inp + 2 * self.rank
        self.row_len = cache.inp // 2 + self.rank  # kept values per row
        self.val_bytes = cache.out * self.row_len * torch.finfo(cache.dtype).bits // 8
        self.buf = self.vals = self.meta = None
        self.factors = PaddedFactors(self.rank)
        self.mask_key = self.weight_key = None
        self.tail_fresh = False  # the kept operand holds the current B
        self.tokens_ok: set[int] = set()  # token counts whose widened GEMM ran
        self.tokens_refused: set[int] = set()  # ... that cuSPARSELt refused: adapter after

    def _pattern(self, layer) -> torch.Tensor:
        c = self.cache
        tail = torch.zeros(c.out, self.rank // 2, 4, dtype=c.dtype, device=c.device)
        tail[..., :2] = 1
        return torch.cat([layer.mask.to(c.dtype), tail.view(c.out, 2 * self.rank)], dim=1)

    def _views(self, buf: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return buf, buf[:self.val_bytes].view(self.cache.dtype).view(self.cache.out, -1)

    def _build(self, layer) -> None:
        c = self.cache
        size = c.rt.compressed_buffer_size(c.out, self.k, c.dtype, c.device)
        if c.keep:
            buf = torch.empty(size, dtype=torch.uint8, device=c.device)
            c.release_forward()  # the adapter phase multiplies by this operand only
        else:
            buf = c.rt.scratch("aug", size, c.device)
        c.rt.ext.compress(self._pattern(layer), buf)  # metadata from the pattern
        if c.keep:
            self.buf, self.vals = self._views(buf)
        else:
            self.meta = buf[self.val_bytes:].clone()
        layer.release_unpacked_masks()
        self.mask_key, self.weight_key, self.tail_fresh = _key(layer.mask_bits), None, False

    def sync(self, layer) -> torch.Tensor:
        """The compressed operand for the current mask, weight and adapter (cheap if it is
        current); also makes the padded A and B current."""
        if _key(layer.mask_bits) != self.mask_key:
            self._build(layer)
        elif self.cache.keep and self.cache.fwd_buf is not None:
            self.cache.release_forward()  # a plain call rebuilt it (`auto`'s timing, ...)
        if self.factors.sync(layer):
            self.tail_fresh = False
        c = self.cache
        if c.keep:
            buf, vals = self.buf, self.vals
        else:
            base = c.rt.scratch_base("aug", self.val_bytes + self.meta.numel(), c.device)
            buf, vals = self._views(base[:self.val_bytes + self.meta.numel()])
            buf[self.val_bytes:].copy_(self.meta)
        half = c.inp // 2
        if not c.keep or weight_key(layer) != self.weight_key:
            vals[:, :half].copy_(layer.weight.detach().view(c.out, half))
            self.weight_key = weight_key(layer) if c.keep else None
        if not (c.keep and self.tail_fresh):
            vals[:, half:].copy_(self.factors.b.t())
            self.tail_fresh = c.keep
        return buf

    def matmul(self, buf: torch.Tensor, wide: torch.Tensor, bias: torch.Tensor | None):
        c = self.cache
        fused = bias is not None and c.bias_fused
        y = c.rt.plans.matmul(buf, c.out, self.k, wide, None, 0.0, bias if fused else None)
        if bias is not None and not fused:
            y.add_(bias)
        return y


def _rows(t: torch.Tensor) -> torch.Tensor:
    t = t.reshape(-1, t.shape[-1])
    return t if t.is_contiguous() else t.contiguous()


class _AdapterLayerFunction(torch.autograd.Function):
    """Y = X (W*M)^T + b + s (X A) B (s = 1/r) as one autograd function: the SLoPe layer's
    backward (dX by the double-pruned W_RC^T, dW gathered at the mask) and the adapter's,
    with d(X A) A^T accumulated into the sparse dX by `addmm_` (as separate autograd nodes
    it was another T x in tensor and an add). The forwards (subclasses) save
    X, X A (unscaled, padded to R), the weight and the padded A and B."""

    @staticmethod
    def _save(ctx, x, x2, xa, weight, factors, cache, layer, scale, has_bias):
        # weight: autograd then refuses a backward after an in-place change, as for the plain
        # layer; a and b: the padded copies this forward used (replaced, never modified)
        ctx.save_for_backward(x2, xa, weight, factors.a, factors.b)
        ctx.cache, ctx.layer, ctx.scale = cache, layer, scale
        ctx.rank, ctx.has_bias, ctx.x_shape = layer.adapter_a.shape[1], has_bias, x.shape

    @staticmethod
    def backward(ctx, grad_out):
        x2, xa, _weight, a, b = ctx.saved_tensors
        cache, layer, scale, rank = ctx.cache, ctx.layer, ctx.scale, ctx.rank
        gy2 = _rows(grad_out)
        need_x, need_w, need_b, need_a, need_bb = ctx.needs_input_grad[:5]
        grad_x = grad_w = grad_bias = grad_a = grad_bb = None
        gxa = None  # d(X A) = s dY B^T, (T, R); zero in the padding's columns
        if need_x or need_a:
            gxa = torch.mm(gy2, b.t()).mul_(scale)
        if need_x:
            cache.sync_backward(layer)
            grad_x = cache.grad_input(gy2)
            grad_x.addmm_(gxa, a.t())
            grad_x = grad_x.view(ctx.x_shape)
        if need_w:
            grad_w = cache.grad_weight(gy2, x2, layer.mask_bits)
        if ctx.has_bias and need_b:
            grad_bias = gy2.sum(0)
        # the small GEMMs at the padded rank (aligned), cut to the rank after
        if need_a:
            grad_a = torch.mm(x2.t(), gxa)[:, :rank].contiguous()
        if need_bb:
            grad_bb = torch.mm(xa.t(), gy2)[:rank].mul_(scale)
        return grad_x, grad_w, grad_bias, grad_a, grad_bb, None, None


class AugmentedAdapterFunction(_AdapterLayerFunction):
    """The adapter inside the sparse forward GEMM (K-augmentation, see the module's doc)."""

    @staticmethod
    def forward(ctx, x, weight, bias, adapter_a, adapter_b, operand, layer):
        from slope_megatron.kernels.lowrank_triton import widen_with_lowrank
        x2 = _rows(x)
        buf = operand.sync(layer)
        scale = layer.adapter_scale
        wide, xa = widen_with_lowrank(x2, operand.factors.a, scale)
        y = operand.matmul(buf, wide, bias)
        _AdapterLayerFunction._save(ctx, x, x2, xa, weight, operand.factors, operand.cache,
                                    layer, scale, bias is not None)
        return y.view(*x.shape[:-1], y.shape[-1])


class AfterAdapterFunction(_AdapterLayerFunction):
    """The adapter added after the plain sparse GEMM, by one Triton pass over Y
    (`slope_megatron.kernels.lowrank_triton.lowrank_add`): where it does not pay inside (narrowing layers)
    or cuSPARSELt refused the widened GEMM."""

    @staticmethod
    def forward(ctx, x, weight, bias, adapter_a, adapter_b, cache, layer):
        from slope_megatron.kernels.lowrank_triton import lowrank_add
        x2 = _rows(x)
        factors = after_factors(cache, layer)
        cache.sync_forward(layer)
        scale = layer.adapter_scale
        xa = torch.mm(x2, factors.a)
        y = lowrank_add(cache.forward(x2, bias), xa, factors.b * scale)
        _AdapterLayerFunction._save(ctx, x, x2, xa, weight, factors, cache, layer, scale,
                                    bias is not None)
        return y.view(*x.shape[:-1], y.shape[-1])


def after_factors(cache, layer) -> PaddedFactors:
    """The padded A and B of the after-GEMM path (the cache's; its own, so that they never
    hide a change from the augmented operand's)."""
    f = cache.adapter_factors
    if f is None or f.rank != padded_rank(layer.adapter_rank):
        f = cache.adapter_factors = PaddedFactors(padded_rank(layer.adapter_rank))
    f.sync(layer)
    return f


def after_linear(cache, layer, x: torch.Tensor) -> torch.Tensor:
    """SLoPe layer + active adapter, the adapter added after the sparse GEMM."""
    return AfterAdapterFunction.apply(x, layer.weight, layer.bias, layer.adapter_a,
                                      layer.adapter_b, cache, layer)


def augmented_operand(cache, layer) -> AugmentedOperand | None:
    """The layer's augmented operand (made on first use), or None where it cannot run: the
    values layout is not row-major (then every refresh compresses)."""
    op = cache.adapter_operand
    if op is not None and op.rank == padded_rank(layer.adapter_rank):
        return op
    if not cache.row_major:
        return None
    op = cache.adapter_operand = AugmentedOperand(cache, layer)
    return op


def _refuse(op: AugmentedOperand, layer, tokens: int, reason: str) -> None:
    op.tokens_refused.add(tokens)
    log_fallback_once("cusparselt", layer, f"{tokens} tokens: {reason}",
                      "the adapter added after the sparse GEMM (not inside it)", log)


def augmented_linear(cache, layer, x: torch.Tensor, only_if_it_pays: bool = True
                     ) -> torch.Tensor | None:
    """SLoPe layer + active adapter with the adapter inside the sparse GEMM, or None where
    this cannot run or does not pay (`inside_pays`; the caller adds the adapter after the
    GEMM instead). `only_if_it_pays=False` is for benchmarks comparing the two. A token count
    whose widened plan or first GEMM (the algorithm search) cuSPARSELt refuses adds the
    adapter after the GEMM from then on (logged once per layer shape and reason). Any other
    error of that first call (an out-of-memory above all) propagates and records nothing:
    the next call tries the widened GEMM again."""
    if only_if_it_pays and not inside_pays(layer):
        return None
    op = augmented_operand(cache, layer)
    if op is None:
        return None
    tokens = x.numel() // x.shape[-1]
    if tokens in op.tokens_ok:
        return AugmentedAdapterFunction.apply(x, layer.weight, layer.bias, layer.adapter_a,
                                              layer.adapter_b, op, layer)
    if tokens in op.tokens_refused:
        return None
    try:
        y = AugmentedAdapterFunction.apply(x, layer.weight, layer.bias, layer.adapter_a,
                                           layer.adapter_b, op, layer)
    except RuntimeError as e:
        if not is_rejection(e):  # out of memory, or not cuSPARSELt's verdict on the shape
            raise
        _refuse(op, layer, tokens, f"cuSPARSELt rejected the widened shape "
                                   f"{cache.out}x{op.k} ({e})")
        return None
    op.tokens_ok.add(tokens)
    return y
