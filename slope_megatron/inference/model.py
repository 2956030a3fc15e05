"""Inference model: the training GPTModel's own modules, driven by a KV-cached forward.

Why reuse GPTModel: one source of truth for the math. The embedding, norms, MLPs, head and
every linear (dense or SlopeLinear, adapter included) are the training modules themselves;
only the attention wiring is re-done here, to read and append the KV cache and to take
per-sequence positions (left-padded batches). Tests pin this to GPTModel.forward.

Which sparse path (`kernels`): "cusparselt" compresses every 2:4 sparse linear at load time
(`compressed.py`: the layer then holds one cuSPARSELt operand, 0.5625x of its dense bf16
bytes, and runs on sparse tensor cores; CUDA + bf16 only); "reference" keeps the kept values
and masks and emulates the sparse GEMM densely (below); "decode24" is cusparselt plus our
Triton 2:4 decode GEMM for the small calls where it measured faster at load (`decode24.py`).
"auto" (default) takes decode24 where cuSPARSELt and Triton can run, cusparselt where only
cuSPARSELt can, the reference elsewhere, and says which and why (`kernels_note`).

How `generate` decodes (`decode`): "eager", a cache sliced to the current length and every op
launched from Python, or "static", a fixed-shape step over a full-capacity cache captured as
a CUDA graph (`static_decode.py`, `static_decoder`); "auto" (default) is static where CUDA
graphs can be used and eager elsewhere (a CPU).

Whether the static step's work between the GEMMs is torch.compile'd (`compile`): the residual
adds fused into the next norm, q and k rotated in one kernel, the SwiGLU/GELU in one
(`model/regions.py`). "auto" (default) compiles where the step is captured in a CUDA graph:
compiled on a decoder's warm-up (a second batch size compiles one graph with a dynamic batch,
which later ones reuse), replayed for every token. "on" also compiles an uncaptured
static step, "off" never compiles. Prefill and eager decoding always run eagerly (their
shapes change with every prompt or token).

What the reference path keeps in memory, honestly (forward-only `InferenceBackend`):
- sparse linears keep only their kept values (out, in*n/m) in the model dtype and their
  static (out, in) bool mask; the double-pruned column masks (training only) are dropped.
  For bf16 2:4 that is 1 (values) + 1 (bool mask) bytes per dense entry: as much as dense
  bf16. The compressed 0.5625x and sparse-GEMM speed belong to the cusparselt backend.
- the model never keeps a dense copy. The sparse GEMM is emulated with a dense one on
  W*M = dense_from_values(values, mask): with `dense_cache=True` (default) W*M of every
  sparse layer is built once per `generate` call and freed when it returns (peak memory +
  the dense weights; decoding is GEMM-bound); with False it is rebuilt inside every layer
  call (peak memory + one layer's dense weight; decoding is far slower).
- active adapters are applied as (x A) B / r by SlopeLinear.forward, never merged.
- construction runs GPTModel's random init once, on the target device (then overwrites it):
  it transiently allocates the model's dense fp32 init tensors there.
"""
from __future__ import annotations

import contextlib
import copy
import logging
from collections import OrderedDict
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..config import Config
from ..model import GPTModel
from ..model import regions
from ..sparsity import SlopeLinear, slope_layers
from .backend import InferenceBackend
from .kv_cache import KVCache

log = logging.getLogger(__name__)
KERNELS = ("auto", "cusparselt", "reference", "decode24")
DECODES = ("auto", "eager", "static")
COMPILES = ("auto", "on", "off")
STATIC_DECODERS_KEPT = 4  # graphed decoders (each with its full-capacity cache) kept per model

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def parse_dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def load_slope_state_dict(model: nn.Module, state_dict: dict) -> None:
    """Strictly load an artifact state dict (which has no column masks) into `model`.

    Column masks are the only keys allowed to be absent; every SlopeLinear is marked so that
    its column mask is recomputed from the loaded weights if it is ever used for training.
    """
    optional = {f"{name}.column_mask" for name, mod in model.named_modules()
                if isinstance(mod, SlopeLinear)}
    try:
        missing, unexpected = model.load_state_dict(state_dict, strict=False)
    except RuntimeError as e:
        raise ValueError(f"the artifact's weights do not fit the model its config describes: "
                         f"{e}") from None
    missing = [k for k in missing if k not in optional]
    if missing or unexpected:
        raise ValueError(f"the artifact's weights do not fit the model its config describes: "
                         f"missing {missing[:8]}, unexpected {unexpected[:8]}")
    for layer in slope_layers(model):
        layer.column_mask_step = -1


class InferenceModel(nn.Module):
    """A frozen GPTModel (compressed or reference sparse linears) with a KV-cached forward."""

    def __init__(self, config: Config, state_dict: dict, dtype="fp32",
                 device: torch.device | str = "cpu", dense_cache: bool = True,
                 kernels: str = "auto", decode: str = "auto", compile: str = "auto"):
        super().__init__()
        if kernels not in KERNELS:
            raise ValueError(f"unknown kernels {kernels!r}; use one of {', '.join(KERNELS)}")
        if decode not in DECODES:
            raise ValueError(f"unknown decode {decode!r}; use one of {', '.join(DECODES)}")
        if compile not in COMPILES:
            raise ValueError(f"unknown compile {compile!r}; use one of {', '.join(COMPILES)}")
        self.compile_mode = compile  # whether static steps run the regions compiled (`compiles`)
        # generate()'s default decoding loop (`decoding`); `static_graphs=False` runs the
        # static step without capturing it
        self.decode, self.static_graphs = decode, True
        self._decoders: OrderedDict = OrderedDict()  # (batch, capacity) -> graphed decoder
        self.dtype = parse_dtype(dtype)
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        cfg = copy.deepcopy(config)
        cfg.sparsity.backend = "reference"
        cfg.model.dropout = 0.0
        # The throw-away init runs on the target device (fast on a GPU) and must not move
        # any RNG the caller relies on.
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), \
                torch.device(device):
            model = GPTModel.from_config(cfg)
        self._backend = InferenceBackend()
        for layer in slope_layers(model):
            # training-only, not loaded
            layer.column_mask_bits = torch.zeros(0, 0, dtype=torch.uint8)
            layer.backend = self._backend  # forward-only: never touches the column mask
        load_slope_state_dict(model, {k: v for k, v in state_dict.items()
                                      if not k.endswith(".column_mask")})
        model.to(device)
        for p in model.parameters():  # buffers keep theirs: packed masks, fp32 rotary tables
            p.requires_grad_(False)
            p.data = p.data.to(self.dtype)
        self.model = model.eval()
        self.config = cfg
        self.seq_len, self.vocab_size = cfg.model.seq_len, cfg.model.vocab_size
        self.dense_cache = dense_cache
        self.kernels, self.kernels_note = self._select_kernels(kernels, device)

    def _select_kernels(self, kernels: str, device: torch.device) -> tuple[str, str]:
        """Set up the sparse linears' kernels; (choice, why). "auto" takes decode24 (cuSPARSELt
        plus the decode kernel where it measures faster at load) where both can run,
        cusparselt where only cuSPARSELt can, else the reference."""
        layers = list(slope_layers(self.model))
        if kernels == "reference" or not layers:
            return "reference", "reference kernels asked for" if layers else "no sparse layers"
        from .compressed import CompressedBackend, compress_model, unavailable_reason
        from .decode24 import install, unavailable_reason as decode24_reason
        reason = unavailable_reason(device, self.dtype)
        if kernels == "decode24" or (kernels == "auto" and reason is None
                                     and decode24_reason(device) is None):
            return "decode24", install(self.model, device, self.dtype)
        if reason is not None:
            if kernels == "cusparselt":
                raise ValueError(f"kernels='cusparselt' cannot run here: {reason}")
            return "reference", f"cusparselt unavailable: {reason}"
        done, skipped = compress_model(self.model, CompressedBackend())
        for why in skipped:
            log.warning("inference: %s stays on the reference path: %s", *why.split(": ", 1))
        note = f"{done} of {len(layers)} sparse linears compressed for cuSPARSELt"
        if kernels == "auto":
            note += f" (no decode kernel: {decode24_reason(device)})"
        return ("cusparselt" if done else "reference"), note

    def _reference_layers(self) -> list:
        return [layer for layer in slope_layers(self.model) if layer.backend is self._backend]

    @contextlib.contextmanager
    def generation_scope(self):
        """Context for one generation call: holds dense W*M copies if `dense_cache`.

        Graphs captured inside it read those copies, so decoders graphed while reference
        layers exist are dropped when it ends (the next call captures again)."""
        if not self.dense_cache:
            yield
            return
        layers = self._reference_layers()
        try:
            with self._backend.dense_cache(layers):
                yield
        finally:
            if layers:
                self._decoders.clear()

    def static_decoder(self, batch: int, slots: int):
        """A `StaticDecoder` for `batch` sequences with at least `slots` cache slots.

        The capacity is rounded up like the compressed path's token buckets (at most 12.5%
        more slots, few distinct sizes). On CUDA the decoder's step is captured in a CUDA
        graph and the decoder is kept for later calls with the same (batch, capacity) (the
        last STATIC_DECODERS_KEPT of them; `release_decoders` frees them); elsewhere it runs
        eagerly and is built per call."""
        from .compressed import token_bucket
        from .static_decode import StaticDecoder
        capacity = token_bucket(slots)
        if not self._graphs_usable():
            return StaticDecoder(self, batch, capacity)
        key = (batch, capacity, self.compiles(True))  # a changed setting: a new decoder
        decoder = self._decoders.pop(key, None)
        if decoder is None:
            decoder = StaticDecoder(self, batch, capacity, graph=True)
        self._decoders[key] = decoder
        while len(self._decoders) > STATIC_DECODERS_KEPT:
            self._decoders.popitem(last=False)
        return decoder

    def decoding(self, decode: Optional[str] = None) -> str:
        """The decoding loop `generate` runs for `decode` (None: this model's setting):
        'auto' is 'static' where the step can be captured in a CUDA graph and 'eager'
        elsewhere (on a CPU the fixed-shape step would only attend over more slots)."""
        decode = self.decode if decode is None else decode
        if decode not in DECODES:
            raise ValueError(f"unknown decode {decode!r}; use one of {', '.join(DECODES)}")
        if decode == "auto":
            return "static" if self._graphs_usable() else "eager"
        return decode

    def describe_decoding(self) -> str:
        """`decoding()` with how a static step runs, e.g. 'static (CUDA graph, compiled)'."""
        mode = self.decoding()
        if mode != "static":
            return mode
        graphed = self._graphs_usable()
        how = ["CUDA graph" if graphed else "no graph"]
        how += ["compiled"] if self.compiles(graphed) else []
        return f"static ({', '.join(how)})"

    def compiles(self, graphed: bool) -> bool:
        """Whether a static step (captured in a CUDA graph or not) runs compiled regions."""
        return self.compile_mode == "on" or (self.compile_mode == "auto" and graphed)

    def release_decoders(self) -> None:
        """Free the kept graphed decoders (their caches and graphs)."""
        self._decoders.clear()

    def _graphs_usable(self) -> bool:
        """CUDA graphs on a CUDA device, unless reference layers rebuild W*M inside each call
        (`dense_cache=False`: a masked scatter per layer, not worth capturing)."""
        from .decode_graph import graphs_available
        if not (self.static_graphs and graphs_available(self.device)):
            return False
        return self.dense_cache or not self._reference_layers()

    @property
    def device(self) -> torch.device:
        return self.model.embedding.tokens.weight.device

    def weight_bytes(self) -> dict:
        """Bytes held per kind: sparse weights (kept values, or the compressed cuSPARSELt
        operands with their metadata), masks (with the decode kernel's own copies of the
        metadata), adapters, everything else (dense). Each storage is counted once (a
        compressed layer's `weight`, and decode metadata read in place, are views into its
        buffer)."""
        out = {"sparse_values": 0, "masks": 0, "adapters": 0, "dense": 0}
        kinds = {}
        for layer in slope_layers(self.model):
            st = layer.__dict__.get("_compressed")
            for kind, t in (("sparse_values", st.buf if st is not None else layer.weight),
                            ("masks", layer.mask_bits), ("adapters", layer.adapter_a),
                            ("adapters", layer.adapter_b),
                            ("masks", layer.__dict__.get("_decode24"))):  # decode metadata
                if t is not None:  # a view into a storage already counted stays its kind
                    kinds.setdefault(t.untyped_storage().data_ptr(), (kind, t))
        for t in [*self.model.parameters(), *self.model.buffers()]:
            ptr = t.untyped_storage().data_ptr()
            if ptr not in kinds:
                kinds[ptr] = ("dense", t)
        for kind, t in kinds.values():
            out[kind] += t.untyped_storage().nbytes()
        return out

    def new_cache(self, batch: int, capacity: int) -> KVCache:
        c = self.config.model
        return KVCache(c.num_layers, batch, c.num_heads, c.hidden_size // c.num_heads,
                       capacity, self.dtype, self.device)

    @torch.inference_mode()
    @regions.eager()
    def full_logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Logits of the plain training forward (no cache); the reference for tests."""
        return self.model(input_ids).float()

    @torch.inference_mode()
    @regions.eager()  # prefill and eager decoding: a new shape at every call
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, cache: KVCache,
                valid: Optional[torch.Tensor] = None, last_only: bool = False) -> torch.Tensor:
        """Logits (batch, t, vocab) in float32 for `t` new tokens appended to `cache`.

        positions: (batch, t) token positions of each sequence; valid: (batch, t) False for
        left padding (None: all valid, which lets attention use its fastest kernels);
        last_only: logits of the last token only (batch, 1, vocab), which spares a
        prompt-long LM-head GEMM when prefilling.
        """
        if int(positions.max()) >= self.seq_len:
            raise ValueError(f"position {int(positions.max())} is beyond the model's context "
                             f"(model.seq_len = {self.seq_len})")
        return self.step(input_ids, positions, cache, valid, last_only)

    @torch.inference_mode()
    def step(self, input_ids: torch.Tensor, positions: torch.Tensor, cache: KVCache,
             valid: Optional[torch.Tensor] = None, last_only: bool = False) -> torch.Tensor:
        """`forward` without its position check: no host synchronisation, so one step can be
        captured in a CUDA graph once its shapes and plans are warm. `cache` may also be a
        `StaticKVCache` (static decoding: fixed shapes, the slot a device tensor). The
        regions run as the caller's `regions.scope` says, else as the process-wide setting
        (`regions.enable_compile`) says."""
        attn_mask = cache.begin(input_ids.shape[1], valid)
        emb, blocks, head = self.model.embedding, self.model.blocks, self.model.head
        x = emb.tokens(input_ids)
        if emb.positions is not None:
            x = x + emb.positions(positions)
        rope: dict = {}  # the rotary tables at `positions`, gathered once for all blocks
        h = blocks[0].norm1(x) if len(blocks) else head.norm(x)
        for i, block in enumerate(blocks):  # each residual add fused into the next norm
            attended = self._attention(block.attn, h, i, positions, rope, cache, attn_mask)
            x, h = block.norm2(x, attended)
            following = blocks[i + 1].norm1 if i + 1 < len(blocks) else head.norm
            x, h = following(x, block.mlp(h))
        cache.end(input_ids.shape[1])
        if last_only:
            h = h[:, -1:]
        return head.project(h, emb.tokens.weight).float()

    @staticmethod
    def _rotate_qk(rotary, qk: torch.Tensor, positions: torch.Tensor, rope: dict):
        """q and k (2, b, heads, t, head_dim) rotated (rotate-half form) at per-sequence
        positions, in one pass over both. The cos/sin rows are gathered by the first block
        and kept in `rope` for the others: every block's Rotary is built from the same config,
        and a decode step would otherwise spend four gathers and four casts per block."""
        if qk.dtype not in rope:
            rope[qk.dtype] = (rotary.cos[positions].unsqueeze(1).to(qk.dtype),  # (b, 1, t, d)
                              rotary.sin[positions].unsqueeze(1).to(qk.dtype))
        return regions.rotate_pair(qk, *rope[qk.dtype])

    def _attention(self, attn, x, layer: int, positions, rope: dict, cache: KVCache,
                   attn_mask):
        b, t, _ = x.shape
        qkv = attn.stacked_heads(attn.qkv(x))  # (3, b, heads, t, head_dim)
        q, k, v = qkv
        if attn.rotary is not None:
            q, k = self._rotate_qk(attn.rotary, qkv[:2], positions, rope)
        k_all, v_all = cache.write(layer, k, v)
        y = F.scaled_dot_product_attention(q, k_all, v_all, attn_mask=attn_mask,
                                           is_causal=attn_mask is None and t > 1)
        return attn.proj(y.transpose(1, 2).reshape(b, t, attn.num_heads * attn.head_dim))
