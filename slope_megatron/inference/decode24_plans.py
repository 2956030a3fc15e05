"""Which GEMM runs each small sparse-linear call: a timing table filled at load on CUDA.

Why measured: whether the Triton decode kernel (`kernels/decode24_triton.py`) beats the GEMM
a layer would otherwise run (cuSPARSELt's), and with which block sizes and split, depends on
the GPU, the layer's shape and the token count. So at load time every distinct (out, in) of
the model's sparse layers is timed, for each token bucket of TIMED_BUCKETS, with a few
candidate configs against the fallback; only configs whose result matches the fallback's
(rel. error < PLAN_TOLERANCE) are timed, and the table keeps a config only where it won.
Only 1-8 tokens are timed: the kernel's tensor-core modes lost to cuSPARSELt at 8 and 16
tokens on an H100 (docs/INFERENCE.md), so timing larger buckets would only cost load time
(compiles) for a kernel that is not chosen. A call of t tokens looks up the bucket t rounds
up to (the bucket was timed at its largest count). Where the table has no entry the fallback
runs, so a kernel that loses is never used. On a CPU nothing is measured and nothing chosen.

`SLOPE_DECODE24_PLAN=always` skips the timing and runs the kernel (default config) for every
call of at most 64 tokens: for checks and benchmarks of the kernel itself.
`SLOPE_DECODE24_CONFIGS=FILE` replaces the built-in candidates by the configs of a file
written by `python -m benchmarks.bench inference gemm --tune --save-configs FILE` (tuned on
one GPU: {"configs": {token bucket: [config fields, ...]}}).
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional

import torch

log = logging.getLogger(__name__)

TOKEN_BUCKETS = (1, 2, 4, 8, 16, 32, 64)  # the kernel's token counts, as powers of two
TIMED_BUCKETS = (1, 2, 4, 8)  # the buckets timed at load (module docstring)
PLAN_MODES = ("measure", "always")
CUDA_CORE_MODES = ("gather", "gatherS", "gatherT", "fma", "select")  # loop pipelined only if asked
PLAN_TOLERANCE = 1e-2  # rel. error vs the fallback above which a config is refused (bf16: ~3e-3)


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """||got - want|| / ||want|| in fp32 (inf where want is all zeros and got is not)."""
    diff = (got.float() - want.float()).norm().item()
    norm = want.float().norm().item()
    return diff / norm if norm else (0.0 if diff == 0 else float("inf"))


def plan_mode() -> str:
    """`SLOPE_DECODE24_PLAN`: 'measure' (default) or 'always'."""
    mode = os.environ.get("SLOPE_DECODE24_PLAN", "measure")
    if mode not in PLAN_MODES:
        raise ValueError(f"SLOPE_DECODE24_PLAN={mode!r}; use one of {', '.join(PLAN_MODES)}")
    return mode


def tuned_configs(path: str, tokens: int) -> list:
    """The configs a `--save-configs` file lists for the bucket of `tokens`."""
    import json

    from slope_megatron.kernels.decode24_config import Decode24Config, rows_block
    try:
        listed = json.loads(open(path).read())["configs"].get(str(rows_block(tokens)), [])
        return [Decode24Config(**fields) for fields in listed]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"SLOPE_DECODE24_CONFIGS={path}: not a readable config file written "
                         f"by `bench inference gemm --tune --save-configs` ({e})") from e


def candidate_configs(tokens: int, out: int, inp: int) -> list:
    """The configs timed for one (shape, bucket): the default first, then for each mode that
    suits the bucket (`suited_modes`) its base tile with 4 and with 8 warps (more warps:
    fewer registers per thread, more loads in flight), twice the split, and twice the output
    rows with 8 warps (each unpipelined in the CUDA-core modes, `stage_count`); for the
    CUDA-core modes also the base tile pipelined three stages deep. With
    SLOPE_DECODE24_CONFIGS: the default and the file's configs."""
    from slope_megatron.kernels.decode24_config import default_config, mode_config, rows_block
    base = default_config(tokens, out, inp)
    path = os.environ.get("SLOPE_DECODE24_CONFIGS")
    if path:
        return list(dict.fromkeys([base, *tuned_configs(path, tokens)]))
    rows = rows_block(min(tokens, 64))
    configs = [base]
    for mode in suited_modes(rows):
        bn, bk = base_tile(mode, rows)
        for block_n, scale, warps in ((bn, 1, 4), (bn, 1, 8), (bn, 2, 4), (2 * bn, 1, 8)):
            configs.append(mode_config(tokens, out, inp, mode, block_n, bk, scale, warps))
        if mode in CUDA_CORE_MODES:
            configs.append(mode_config(tokens, out, inp, mode, bn, bk, num_stages=3))
    return list(dict.fromkeys(configs))


def suited_modes(rows: int) -> tuple:
    """The kernel's modes worth timing for a block of `rows` x rows: the CUDA-core modes up
    to 4 rows (select: one; gatherS where Triton has tl.gather), the vector gather from 2 to
    8 rows (16 rows make its registers spill), the tensor-core ones from 8."""
    from slope_megatron.kernels.decode24_config import HAS_TL_GATHER
    modes = ("select",) if rows == 1 else ()
    if rows <= 4:
        modes += ("gather", "gatherS", "fma") if HAS_TL_GATHER else ("gather", "fma")
    if 2 <= rows <= 8:
        modes += ("gatherT",)
    if rows >= 8:
        modes += ("dotT", "dot")
    return modes


def base_tile(mode: str, rows: int) -> tuple:
    """(block_n, block_k) to start from; gatherT holds block_n * block_k / 2 * rows
    products in registers, so its block_k shrinks as the rows grow."""
    if mode == "gatherT":
        return 32, max(32, 512 // rows)
    return {"gather": (32, 256), "gatherS": (32, 256), "select": (32, 256), "fma": (32, 128),
            "dotT": (64, 128), "dot": (32, 128)}[mode]


@dataclass
class Decode24Plans:
    """(out, in, token bucket) -> the decode-kernel config to run; no entry: the fallback."""

    table: dict = field(default_factory=dict)
    always: bool = False  # every call of <= 64 tokens runs the kernel (table or default)

    def choose(self, out: int, inp: int, tokens: int):
        """The config for a call of `tokens` rows, or None (run the fallback)."""
        from slope_megatron.kernels.decode24_config import (MAX_TOKENS, default_config,
                                                             rows_block)
        if tokens > MAX_TOKENS or tokens < 1:
            return None
        cfg = self.table.get((out, inp, rows_block(tokens)))
        if cfg is None and self.always:
            cfg = default_config(tokens, out, inp)
        return cfg

    def describe(self) -> str:
        if self.always:
            from slope_megatron.kernels.decode24_config import MAX_TOKENS
            return f"every call of <= {MAX_TOKENS} tokens"
        return f"where it measured faster: {len(self.table)} (shape, tokens) cases"


def run_kernel(layer, x2: torch.Tensor, meta: torch.Tensor, cfg,
               adapter: Optional[tuple] = None) -> torch.Tensor:
    """The decode kernel's y for x2 (tokens, in) on `layer`'s kept values and `meta`; an
    adapter = (A (in, r), B (r, out), scale) adds its (x2 A) B * scale in the epilogue."""
    from slope_megatron.kernels.decode24_triton import decode24_linear
    lowrank = None
    if adapter is not None:
        a, b, scale = adapter
        lowrank = (x2 @ a, b, scale)
    return decode24_linear(x2, layer.weight, meta, layer.bias, cfg, lowrank)


def measure_plans(shapes: Iterable[tuple], time_decode: Callable, time_fallback: Callable,
                  candidates: Callable = candidate_configs,
                  buckets: Iterable[int] = TIMED_BUCKETS) -> Decode24Plans:
    """Fill the table: time_decode(out, in, tokens, cfg) and time_fallback(out, in, tokens)
    return seconds (any unit, the same for both; inf for a config that cannot run)."""
    table = {}
    for out, inp in sorted(set(shapes)):
        for tokens in buckets:
            fallback = time_fallback(out, inp, tokens)
            timed = [(time_decode(out, inp, tokens, c), i, c)
                     for i, c in enumerate(candidates(tokens, out, inp))]
            best, _, cfg = min(timed)
            if best < fallback:
                table[(out, inp, tokens)] = cfg
            log.info("decode24 plan (out=%d, in=%d, tokens=%d): %s (%.4g vs fallback %.4g)",
                     out, inp, tokens, cfg if best < fallback else "fallback", best, fallback)
    return Decode24Plans(table)


def measure_on_gpu(layers: list, fallback: Callable[[object, torch.Tensor], torch.Tensor],
                   meta_of: Callable[[object], torch.Tensor],
                   adapter_of: Callable[[object], Optional[tuple]] = lambda layer: None
                   ) -> Decode24Plans:
    """Time one layer of each shape on its GPU (median of triton.testing.do_bench, which
    empties the L2 cache before every run, on random inputs) and fill the table. Both sides
    are timed as the layer's calls run: `fallback` includes an active adapter's term, and
    the kernel then runs with its adapter epilogue (adapter_of(layer) = (A, B, scale) or
    None), since the adapter's cost differs between the two paths."""
    from triton.testing import do_bench

    by_shape = {}
    for layer in layers:
        by_shape.setdefault((layer.out_features, layer.in_features), layer)
    inputs, wanted = {}, {}

    def want_for(layer, tokens):  # the fallback's y, which every candidate must match
        key = (layer.out_features, layer.in_features, tokens)
        if key not in wanted:
            wanted[key] = fallback(layer, x_for(layer, tokens))
        return wanted[key]

    def x_for(layer, tokens):
        key = (layer.in_features, tokens)
        if key not in inputs:
            w = layer.weight
            gen = torch.Generator(device=w.device).manual_seed(tokens)
            inputs[key] = torch.randn(tokens, layer.in_features, generator=gen,
                                      device=w.device).to(w.dtype)
        return inputs[key]

    def decode(layer, x, meta, cfg):
        return run_kernel(layer, x, meta, cfg, adapter_of(layer))

    def time_decode(out, inp, tokens, cfg):
        layer = by_shape[(out, inp)]
        x, meta = x_for(layer, tokens), meta_of(layer)
        try:
            got = decode(layer, x, meta, cfg)
        except Exception as e:  # e.g. a config needing more shared memory than the GPU has
            log.info("decode24 config %s cannot run on (%d, %d): %s", cfg, out, inp, e)
            return float("inf")
        err = relative_error(got, want_for(layer, tokens))
        if not err < PLAN_TOLERANCE:  # never choose a config that computes something else
            log.warning("decode24 config %s on (%d, %d) x %d tokens differs from cuSPARSELt "
                        "(rel. err %.2e): not used", cfg, out, inp, tokens, err)
            return float("inf")
        return do_bench(lambda: decode(layer, x, meta, cfg), warmup=5, rep=20,
                        return_mode="median")

    def time_fallback(out, inp, tokens):
        layer = by_shape[(out, inp)]
        x = x_for(layer, tokens)
        return do_bench(lambda: fallback(layer, x), warmup=5, rep=20, return_mode="median")

    log.info("decode24: timing the decode kernel against cuSPARSELt for %d layer shapes x %d "
             "token buckets (the first run on a machine also compiles the candidate kernels)",
             len(by_shape), len(TIMED_BUCKETS))
    with torch.inference_mode():
        return measure_plans(by_shape, time_decode, time_fallback)
