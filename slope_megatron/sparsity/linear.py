"""SlopeLinear: an N:M-sparse linear layer trained with SLoPe, plus its lazy adapter.

Storage is chosen so that ZeRO can own it like any tensor:
- `weight`: Parameter of shape (out, in*n/m) holding only the kept values, in row-major
  order of the mask. Optimizer state therefore exists only for kept entries, and pruned
  entries cannot become non-zero: they are not stored at all.
- `mask`: bool (out, in), chosen once from the initial weights, never changed.
- `column_mask`: bool (out, in), the double-pruned mask used for dX, recomputed from
  the current weights every `column_mask_refresh` optimizer steps. With
  `double_prune=False` (plain static N:M training, the ablation of the paper) it is a copy
  of `mask`, never recomputed, and dX = dY (W*M) exactly; it stays so that state
  dicts have the same keys either way (a load re-copies it from the loaded `mask`, whatever
  column mask the state dict had, or none).
  Both masks are held packed, 8 entries per byte (`mask_bits`, `column_mask_bits`): as bool
  tensors they cost 2 bytes per weight entry, more than the kept values' bf16 copy. `mask` /
  `column_mask` unpack them; the unpacked pair is kept (`_unpacked`) for layers whose calls
  use it (the reference path) and released by backends that do not (cusparselt). State dicts
  carry the bool masks, as before, so checkpoints and artifacts do not change.
- `adapter_a` (in, r) / `adapter_b` (r, out): the lazy low-rank adapter, created inactive
  (zero compute) and switched on by `enable_adapter()`; Y += (X A) B / r.
Counters and the adapter switch live in the module's extra state, so a checkpoint resumes
the refresh schedule and the adapter phase exactly.
"""
from __future__ import annotations

import math
import os
from typing import Callable, Optional

import torch
from torch import nn

from .backends import get_backend
from .functional import dense_from_values, values_from_dense
from .masks import check_nm, double_prune_mask, nm_mask, pack_bits, unpack_bits

InitFn = Callable[[torch.Tensor], None]


def adapter_rank(width: int, rank_ratio: float = 0.02, rank: Optional[int] = None) -> int:
    """Adapter rank: `rank` if given, else rank_ratio * width rounded, at least 1 (`width`:
    the hidden size, or the layer's input width; `adapters.rank_of`)."""
    if rank is not None:
        if rank < 1:
            raise ValueError(f"adapter rank must be >= 1, got {rank}")
        return int(rank)
    if not 0.0 < rank_ratio <= 1.0:
        raise ValueError(f"adapter rank_ratio must be in (0, 1], got {rank_ratio}")
    return max(1, round(rank_ratio * width))


def initial_adapter_a(in_features: int, rank: int) -> torch.Tensor:
    """A ~ N(0, 1), shape (in, rank), on the CPU, drawn without advancing the global RNG.

    Its generator is seeded from a draw of a *fork* of the global CPU RNG, so creating
    adapters changes no other parameter's initial value: a model built with adapters has
    exactly the base weights of the same model built without (the quality study
    compares such arms from one seed). Consecutive calls with no draw in between would get
    the same A; model construction always initialises a weight between two adapters.
    """
    with torch.random.fork_rng(devices=[]):
        seed = int(torch.randint(0, 2 ** 62, (), device="cpu"))  # even under a device context
    gen = torch.Generator().manual_seed(seed ^ 0x5A0BE)  # another stream than the weights'
    return torch.randn(in_features, rank, generator=gen, device="cpu")


class SlopeLinear(nn.Module):
    """Y = X (W*M)^T + b with SLoPe's double-pruned backward and an optional lazy adapter."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, n: int = 2,
                 m: int = 4, column_mask_refresh: int = 100, backend: str = "reference",
                 adapter_rank: Optional[int] = None, init_method: Optional[InitFn] = None,
                 device=None, dtype=None, double_prune: bool = True,
                 keep_compressed: bool = True):
        super().__init__()
        check_nm(n, m)
        for name, dim in (("in_features", in_features), ("out_features", out_features)):
            if dim % m != 0:
                raise ValueError(f"SlopeLinear {name}={dim} must be divisible by m={m}: N:M "
                                 f"groups run along `in` (forward) and `out` (double pruning)")
        if column_mask_refresh < 1:
            raise ValueError(f"column_mask_refresh must be >= 1, got {column_mask_refresh}")
        self.in_features, self.out_features = in_features, out_features
        self.n, self.m = n, m
        self.column_mask_refresh = column_mask_refresh
        self.double_prune = bool(double_prune)
        self.keep_compressed = bool(keep_compressed)  # cusparselt: operands kept or per call
        self.backend_name = backend
        self.backend = get_backend(backend)

        dense = torch.empty(out_features, in_features, device=device, dtype=dtype)
        if init_method is None:
            nn.init.kaiming_uniform_(dense, a=math.sqrt(5))  # nn.Linear's default
        else:
            init_method(dense)
        mask = nm_mask(dense, n, m)
        self.weight = nn.Parameter(values_from_dense(dense, mask))
        # packed masks; state_dict carries them unpacked (_save_to_state_dict)
        self.register_buffer("mask_bits", pack_bits(mask), persistent=False)
        self.register_buffer("column_mask_bits", pack_bits(
            torch.zeros_like(mask) if self.double_prune else mask), persistent=False)
        self._unpacked: dict = {}
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype))
        else:
            self.register_parameter("bias", None)

        self.optimizer_steps = 0    # optimizer steps seen (drives the column-mask refresh)
        self.column_mask_step = -1  # step at which column_mask was computed; -1: never
        self.adapter_active = False
        self.adapter_rank = None
        self.adapter_a = self.adapter_b = None
        if adapter_rank is not None:
            self.create_adapter(adapter_rank)

    # ---- masks --------------------------------------------------------------------------
    def _unpack(self, name: str) -> torch.Tensor:
        bits = getattr(self, name + "_bits")
        if torch.is_inference_mode_enabled() or bits.is_inference():
            return unpack_bits(bits, self.in_features)  # no version counter; not kept
        key = (bits.data_ptr(), bits._version, bits.device)
        hit = self._unpacked.get(name)
        if hit is not None and hit[0] == key:
            return hit[1]
        mask = unpack_bits(bits, self.in_features)
        self._unpacked[name] = (key, mask)
        return mask

    @property
    def mask(self) -> torch.Tensor:
        """The static N:M mask, bool (out, in) (unpacked from `mask_bits`, kept until
        `release_unpacked_masks`)."""
        return self._unpack("mask")

    @property
    def column_mask(self) -> torch.Tensor:
        """The double-pruned mask as last computed, bool (out, in) (see `mask`)."""
        return self._unpack("column_mask")

    def release_unpacked_masks(self) -> None:
        """Drop the unpacked bool masks (2 bytes per weight entry); the next use re-unpacks.
        Backends whose calls never read them (cusparselt) call this after building."""
        self._unpacked.clear()

    def _apply(self, fn, recurse=True):
        self._unpacked.clear()  # .to() / .cuda(): unpack again on the new device
        return super()._apply(fn, recurse)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        for name in ("mask", "column_mask"):  # bool, like every checkpoint before packing
            bits = getattr(self, name + "_bits")
            if bits.numel():  # inference models drop what they never use
                # unpacked on the CPU: a state dict of every layer's bool masks on the GPU
                # would hold 2 bytes per weight entry at once while it is saved
                destination[prefix + name] = unpack_bits(bits.cpu(), self.in_features)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        # parameters and extra state first: its checks refuse a foreign layer before the
        # masks are overwritten
        try:
            super()._load_from_state_dict(state_dict, prefix, local_metadata, strict,
                                          missing_keys, unexpected_keys, error_msgs)
        except ValueError as e:  # set_extra_state's refusals: say which layer
            raise ValueError(f"SlopeLinear {prefix.rstrip('.') or '(root module)'}: {e}") \
                from None
        column_loaded = False
        for name in ("mask", "column_mask"):
            key, bits = prefix + name, getattr(self, name + "_bits")
            if key not in state_dict:
                if strict:
                    missing_keys.append(key)
                continue
            value = state_dict[key]
            if tuple(value.shape) != (self.out_features, self.in_features):
                error_msgs.append(f"size mismatch for {key}: copying a param with shape "
                                  f"{tuple(value.shape)} from checkpoint, the shape in current "
                                  f"model is {(self.out_features, self.in_features)}.")
                continue
            row = state_dict.get(prefix + "mask")
            if row is None or tuple(row.shape) != tuple(value.shape):
                row = unpack_bits(self.mask_bits, self.in_features) \
                    if self.mask_bits.numel() else None  # the layer's own (not kept)
            bad = self._mask_problem(name, value, row)
            if bad:
                error_msgs.append(f"{key} {bad}; it does not come from a "
                                  f"{self.n}:{self.m} SlopeLinear of this shape: load a state "
                                  f"dict saved by one (a missing column_mask is recomputed "
                                  f"from the weights)")
                continue
            if name == "column_mask":
                if not self.double_prune:
                    continue  # this layer's column mask is its row mask (synced below)
                column_loaded = not self._static_column_mask_form(value)
            with torch.no_grad():
                packed = pack_bits(value.to(device=bits.device, dtype=torch.bool))
                if bits.shape == packed.shape:
                    bits.copy_(packed)
                else:  # e.g. an inference model that had emptied it
                    setattr(self, name + "_bits", packed)
        ours = {prefix + "mask", prefix + "column_mask"}
        unexpected_keys[:] = [k for k in unexpected_keys if k not in ours]
        if self.double_prune and not column_loaded:
            # no double-pruned mask came with the weights (absent, or the row mask that a
            # layer without double pruning saves): recompute it at the next training forward
            self.column_mask_step = -1
        self._sync_static_column_mask()
        self.backend.on_column_mask_change(self)  # caches follow the loaded weights and masks

    def _static_column_mask_form(self, value: torch.Tensor) -> bool:
        """Whether a loaded column mask keeps more than n of some m along `out` (the row
        mask that a layer without double pruning saves as its column mask)."""
        per_group = value.to(torch.bool).reshape(-1, self.m, self.in_features).sum(1)
        return bool((per_group > self.n).any())

    def _sync_static_column_mask(self) -> None:
        """Without double pruning the column mask *is* the row mask: make `column_mask_bits`
        equal `mask_bits` (the cublas / torch-semi / native backends read the bits for dX).
        An emptied column mask (inference models) stays empty."""
        if self.double_prune or not self.column_mask_bits.numel():
            return
        with torch.no_grad():
            if self.column_mask_bits.shape == self.mask_bits.shape \
                    and self.column_mask_bits.device == self.mask_bits.device:
                self.column_mask_bits.copy_(self.mask_bits)  # bumps its version: caches see it
            else:
                self.column_mask_bits = self.mask_bits.clone()

    def _mask_problem(self, name: str, value: torch.Tensor, mask) -> Optional[str]:
        """Why a loaded mask cannot be this layer's, or None. The kernels read the packed
        masks assuming exactly n kept entries per group along `in`, and a column mask inside
        the row mask keeping at most n of every m along `out` (or equal to the row mask: what
        a layer without double pruning saves); anything else would be silently misplaced, so
        it is refused here. `mask`: the row mask the column mask must lie in, or None."""
        value = value.to(torch.bool)
        if name == "mask":
            per_group = value.reshape(self.out_features, -1, self.m).sum(-1)
            if not bool((per_group == self.n).all()):
                return f"does not keep exactly {self.n} of every {self.m} entries along `in`"
            return None
        row = None if mask is None else mask.to(device=value.device, dtype=torch.bool)
        if row is not None and bool((value & ~row).any()):
            return "keeps entries the row mask prunes"
        per_group = value.reshape(-1, self.m, self.in_features).sum(1)
        over = (per_group > self.n).nonzero()
        if len(over) and not (row is not None and torch.equal(value, row)):
            g, col = (int(i) for i in over[0])
            return (f"keeps more than {self.n} of every {self.m} entries along `out` ({len(over)} "
                    f"groups, first: rows {g * self.m}-{g * self.m + self.m - 1} of column {col}) "
                    f"and is not the row mask")
        return None

    # ---- weights ----------------------------------------------------------------------
    @classmethod
    def from_dense(cls, weight: torch.Tensor, bias: Optional[torch.Tensor] = None, **kw):
        """Build a layer whose mask is chosen from `weight` (out, in) by magnitude."""
        out_features, in_features = weight.shape
        layer = cls(in_features, out_features, bias=bias is not None,
                    init_method=lambda t: t.copy_(weight), device=weight.device,
                    dtype=weight.dtype, **kw)
        if bias is not None:
            with torch.no_grad():
                layer.bias.copy_(bias)
        return layer

    def dense_weight(self) -> torch.Tensor:
        """W * M as a dense (out, in) tensor (differentiable w.r.t. the kept values)."""
        return dense_from_values(self.weight, self.mask)

    def double_pruned_weight(self) -> torch.Tensor:
        """W_RC = W * M * M_C, the operand of the input-gradient GEMM (W * M without
        double pruning)."""
        return self.dense_weight() * self._current_column_mask()

    # ---- double pruning ----------------------------------------------------------------
    def _column_mask_is_stale(self) -> bool:
        if not self.double_prune:
            return False  # the static mask stands in for it; never recomputed
        return (self.column_mask_step < 0
                or self.optimizer_steps - self.column_mask_step >= self.column_mask_refresh)

    @torch.no_grad()
    def refresh_column_mask(self) -> None:
        """Recompute the double-pruned mask from the current weights (without double
        pruning: copy the static mask)."""
        if self.double_prune and self._fast_double_prune():
            # one pass over the kept values and packed mask (kernels/double_prune_triton.py),
            # bit for bit the masks.double_prune_mask below; copy_ bumps the bits' version
            from slope_megatron.kernels.double_prune_triton import double_prune_bits_2to4
            self.column_mask_bits.copy_(double_prune_bits_2to4(self.weight.detach(),
                                                               self.mask_bits))
        elif self.double_prune:
            mask = unpack_bits(self.mask_bits, self.in_features)  # transient: not kept
            dense = dense_from_values(self.weight.detach(), mask)
            self.column_mask_bits.copy_(pack_bits(
                double_prune_mask(dense, self.n, self.m, row_mask=mask)))
        else:
            self._sync_static_column_mask()
        self.column_mask_step = self.optimizer_steps
        self.backend.on_column_mask_change(self)

    def _fast_double_prune(self) -> bool:
        """Whether the Triton kernel computes the double-pruned mask: 2:4 on a contiguous CUDA
        weight where Triton imports and launches (`backends.cublas.unavailable_reason`, the
        check that makes `auto` fall back to the reference; else the torch path).
        `SLOPE_TRITON_DOUBLE_PRUNE=0` forces the torch path, for comparisons."""
        if not ((self.n, self.m) == (2, 4) and self.weight.is_cuda
                and self.weight.is_contiguous()
                and os.environ.get("SLOPE_TRITON_DOUBLE_PRUNE", "1") != "0"):
            return False
        from .backends.cublas import unavailable_reason  # lazily: no GPU code on CPU imports
        return unavailable_reason() is None

    def refresh_column_mask_if_stale(self) -> None:
        """Recompute the double-pruned mask if its refresh is due (no unpacking otherwise)."""
        if self.double_prune and self._column_mask_is_stale():
            self.refresh_column_mask()

    def _current_column_mask(self) -> torch.Tensor:
        if not self.double_prune:
            return self.mask  # plain static N:M: dX = dY (W*M), nothing to recompute
        self.refresh_column_mask_if_stale()
        return self.column_mask

    def column_mask_for_backward(self) -> Optional[torch.Tensor]:
        """The column mask when an input gradient may be needed, else None (no work)."""
        return self._current_column_mask() if torch.is_grad_enabled() else None

    def after_optimizer_step(self) -> None:
        """Advance the step counter and let the backend refresh its compressed copies."""
        self.optimizer_steps += 1
        self.backend.after_optimizer_step(self)

    # ---- lazy adapter -----------------------------------------------------------------
    def create_adapter(self, rank: int, a: Optional[torch.Tensor] = None) -> None:
        """Create the (inactive) adapter: A ~ N(0, 1), B = 0, scale 1/rank (as the paper).

        `a` supplies A's initial value (tensor-parallel layers pass their slice of a full A);
        by default it comes from `initial_adapter_a`, which leaves the global RNG untouched.
        """
        if self.adapter_a is not None:
            raise RuntimeError("this SlopeLinear already has an adapter")
        if rank < 1:
            raise ValueError(f"adapter rank must be >= 1, got {rank}")
        kw = dict(device=self.weight.device, dtype=self.weight.dtype)
        self.adapter_rank = int(rank)
        if a is None:
            a = initial_adapter_a(self.in_features, rank)
        elif a.shape != (self.in_features, rank):
            raise ValueError(f"adapter A must have shape {(self.in_features, rank)}, got "
                             f"{tuple(a.shape)}")
        self.adapter_a = nn.Parameter(a.to(**kw).clone())
        self.adapter_b = nn.Parameter(torch.zeros(rank, self.out_features, **kw))

    def enable_adapter(self, rank: Optional[int] = None) -> None:
        """Switch the adapter on (creating it with `rank` if it does not exist yet)."""
        if self.adapter_a is None:
            if rank is None:
                raise ValueError("enable_adapter() needs a rank: this layer has no adapter yet")
            self.create_adapter(rank)
        elif rank is not None and int(rank) != self.adapter_rank:
            raise ValueError(f"enable_adapter(rank={rank}): this SlopeLinear already has an "
                             f"adapter of rank {self.adapter_rank}; call enable_adapter() (or "
                             f"with rank={self.adapter_rank}) to switch it on, or build the "
                             f"layer with adapter_rank={rank}")
        self.adapter_active = True

    @property
    def adapter_scale(self) -> float:
        return 1.0 / self.adapter_rank if self.adapter_rank else 0.0

    # ---- forward ------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.adapter_active:
            return self.backend.linear_with_adapter(self, x)
        return self.backend.linear(self, x)

    # ---- state ----------------------------------------------------------------------------
    def get_extra_state(self) -> dict:
        return {"optimizer_steps": self.optimizer_steps, "column_mask_step": self.column_mask_step,
                "adapter_active": self.adapter_active, "n": self.n, "m": self.m}

    def set_extra_state(self, state: dict) -> None:
        if (state["n"], state["m"]) != (self.n, self.m):
            raise ValueError(f"checkpoint has {state['n']}:{state['m']} sparsity but this layer "
                             f"is {self.n}:{self.m}")
        if state["adapter_active"] and self.adapter_a is None:
            raise ValueError("checkpoint has the lazy adapter switched on (adapter_active) but "
                             "this layer has no adapter: build the model with the checkpoint's "
                             "adapter settings (adapters.* in its config) before loading")
        self.optimizer_steps = int(state["optimizer_steps"])
        self.column_mask_step = int(state["column_mask_step"])
        self.adapter_active = bool(state["adapter_active"])

    def extra_repr(self) -> str:
        adapter = f", adapter_rank={self.adapter_rank}" if self.adapter_rank else ""
        single = "" if self.double_prune else ", double_prune=False"
        single += "" if self.keep_compressed else ", keep_compressed=False"
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, sparsity={self.n}:{self.m}{single}, "
                f"backend={self.backend.name}{adapter}")
