"""`python -m benchmarks.bench inference gemm`: the 2:4 decode GEMM alone, against cuBLAS and
cuSPARSELt, for 1 to 64 tokens at the layer shapes of 7B-13B models.

Per (layer shape, token count M) it times, in one process and on the same random bf16 data
(no zeros): dense `F.linear` (cuBLAS) on W*M held dense, cuSPARSELt on the compressed operand
(the `cusparselt` inference kernels, token count padded as they pad it), and our kernel
(`kernels/decode24_triton.py`) with the fastest of the configs the load-time plan would time
(`decode24_plans.candidate_configs`), or with `--tune` the fastest of a wide grid, and where
the cuSPARSELt operand's metadata is in the layout the kernel can read in place
(`kernels/decode24_cslt_meta.py`) that config again on it (`decode24_in_place_ms`). Each time
is the median of triton.testing.do_bench (CUDA events, the L2 cache emptied before every
call). Bytes streamed per call give the achieved GB/s, shown against the
GPU's measured copy bandwidth (`benchmarks.common.gpu_speed`): the kernel's limit is the
bytes ratio, 2 / 1.125 = 1.78x of dense in bf16. Every kernel result is checked against
F.linear(x, W*M) before it is timed (rel. err below the load-time plan's tolerance).

The kernels to time (the candidates, or `--tune`'s grid) are compiled first in parallel
worker processes (Triton's on-disk cache), so the timing process only loads them.
"""
from __future__ import annotations

import itertools
import json
import os
import sys
import time
from pathlib import Path

from benchmarks.common import (argument_check_then_cuda, bench_ms, gpu_speed, rel_err,
                               run_environment)

# (out_features, in_features) of the sparse linears of each model (bias: OPT's linears have one)
# as this project's blocks hold them: fused qkv, attention out, fused gate+up (llama) or fc1, fc2
SHAPES = {
    "llama-7b": dict(bias=False, shapes=[(12288, 4096), (4096, 4096), (22016, 4096),
                                         (4096, 11008)]),
    "llama-13b": dict(bias=False, shapes=[(15360, 5120), (5120, 5120), (27648, 5120),
                                          (5120, 13824)]),
    "opt-6.7b": dict(bias=True, shapes=[(12288, 4096), (4096, 4096), (16384, 4096),
                                        (4096, 16384)]),
}
TOKENS = (1, 2, 4, 8, 16, 32, 64)


def add_arguments(p) -> None:
    p.add_argument("--models", nargs="+", default=list(SHAPES), choices=list(SHAPES),
                   metavar="MODEL", help=f"layer shapes of: {', '.join(SHAPES)}")
    p.add_argument("--tokens", nargs="+", type=int, default=list(TOKENS), metavar="M",
                   help="token counts (rows of x), 1 to 64")
    p.add_argument("--tune", action="store_true",
                   help="time a grid of kernel configs and report the fastest (slow: compiles "
                        "every config)")
    p.add_argument("--save-configs", metavar="PATH",
                   help="with --tune: write the two fastest configs of every (shape, token "
                        "count) here, grouped by token bucket, for SLOPE_DECODE24_CONFIGS")
    p.add_argument("--deadline", type=float, default=0.0,
                   help="stop starting new shapes after this many seconds (0: no limit)")
    p.add_argument("--json", default="docs/results/decode_gemm_bench.json",
                   help="write the results (with the GPU name and versions) here")


def argument_error(args) -> str | None:
    bad = [m for m in args.tokens if not 1 <= m <= 64]
    if bad:
        return f"--tokens takes token counts in 1..64, got {bad[0]}"
    if args.save_configs and not args.tune:
        return "--save-configs writes what --tune found: add --tune (or drop --save-configs)"
    return None


def tune_grid(tokens: int) -> list:
    """The configs `--tune` times for a call of `tokens` rows: the modes the load-time plan
    would time, over block sizes, splits and warps."""
    from slope_megatron.inference.decode24_plans import suited_modes
    from slope_megatron.kernels.decode24_config import Decode24Config, rows_block
    rows = rows_block(tokens)
    grid = []
    for mode in suited_modes(rows):
        bks = ((max(32, 256 // rows), max(32, 512 // rows)) if mode == "gatherT"
               else (128, 256))
        bm = max(16, rows) if mode in ("dot", "dotT") else rows
        for bn, bk, split, warps in itertools.product((32, 64, 128), dict.fromkeys(bks),
                                                      (1, 4, 8, 16), (4, 8)):
            grid.append(Decode24Config(bm, bn, bk, split, mode, warps))
    return grid


def _operands(out: int, inp: int, bias: bool, seed: int = 0):
    """Random bf16 W*M (dense), its kept values, metadata, mask and a bias (or None)."""
    import torch

    from slope_megatron.kernels.decode24_layout import pack_meta
    from slope_megatron.sparsity.masks import nm_mask
    gen = torch.Generator(device="cuda").manual_seed(seed)
    w = torch.randn(out, inp, device="cuda", generator=gen).to(torch.bfloat16)
    mask = nm_mask(w)
    values = w[mask].view(out, -1).contiguous()
    b = torch.randn(out, device="cuda", generator=gen).to(torch.bfloat16) if bias else None
    return w * mask, values, pack_meta(mask), mask, b


def _precompile(jobs: list, workers: int) -> None:
    """Compile every (config, tokens, shape) kernel once in worker processes (Triton caches
    compiled kernels on disk), so timing them later loads instead of compiling."""
    import multiprocessing as mp
    ctx = mp.get_context("spawn")
    chunks = [jobs[i::workers] for i in range(workers)]
    with ctx.Pool(workers) as pool:
        pool.map(_compile_chunk, [c for c in chunks if c])


def _compile_chunk(chunk: list) -> None:
    import torch

    from slope_megatron.kernels.decode24_triton import decode24_linear
    made = {}  # one shape's operands at a time: a worker per CPU core shares the GPU's memory
    for cfg, tokens, out, inp, bias in sorted(chunk, key=lambda job: job[2:]):
        if (out, inp, bias) not in made:
            made.clear()
            torch.cuda.empty_cache()
            made[(out, inp, bias)] = _operands(out, inp, bias)
        _, values, meta, _, b = made[(out, inp, bias)]
        x = torch.randn(tokens, inp, device="cuda", dtype=torch.bfloat16)
        try:
            decode24_linear(x, values, meta, b, cfg)
        except Exception:  # noqa: BLE001 - a config the GPU cannot run is skipped when timed
            pass
    torch.cuda.synchronize()


def _bytes(out: int, inp: int, tokens: int, sparse: bool) -> int:
    weight = out * inp * 2 * (9 / 16 if sparse else 1)  # bf16 values + 1 bit per dense entry
    return int(weight + 2 * tokens * (inp + out))


def measure_shape(out, inp, bias, tokens_list, tune, log=print) -> list:
    """Rows of one layer shape: dense, cuSPARSELt and the kernel for every token count."""
    import torch
    import torch.nn.functional as F

    from slope_megatron.inference.compressed import CompressedBackend
    from slope_megatron.inference.decode24_plans import PLAN_TOLERANCE, candidate_configs
    from slope_megatron.kernels.decode24_cslt_meta import in_place_meta
    from slope_megatron.kernels.decode24_triton import decode24_linear
    from slope_megatron.sparsity import SlopeLinear
    dense, values, meta, mask, b = _operands(out, inp, bias)
    layer = SlopeLinear.from_dense(dense, b, backend="reference")  # mask: dense's kept entries
    if not torch.equal(layer.mask, mask):
        raise RuntimeError("the layer chose a different mask from W*M")
    cslt = CompressedBackend()
    cslt.compress(layer)
    # the operand's own metadata, where the kernel can read it in place (else None)
    shared_meta = in_place_meta(layer.__dict__["_compressed"].buf, mask)
    rows = []
    for m in tokens_list:
        x = torch.randn(m, inp, device="cuda", dtype=torch.bfloat16)
        want = F.linear(x.float(), dense.float(), None if b is None else b.float())
        t_dense = bench_ms(lambda: F.linear(x, dense, b))
        got_cslt = cslt.linear(layer, x)
        t_cslt = bench_ms(lambda: cslt.linear(layer, x))
        candidates = tune_grid(m) if tune else candidate_configs(m, out, inp)
        timed = []
        for cfg in candidates:
            try:
                got = decode24_linear(x, values, meta, b, cfg)
            except Exception as e:  # noqa: BLE001 - e.g. more shared memory than the GPU has
                log(f"#   {cfg}: cannot run ({type(e).__name__})")
                continue
            err = rel_err(got, want)
            if not err < PLAN_TOLERANCE:
                raise RuntimeError(f"decode24 {cfg} on ({out}, {inp}) M={m}: rel err {err:.2e}")
            t = bench_ms(lambda: decode24_linear(x, values, meta, b, cfg), warmup=5, rep=20)
            timed.append((t, len(timed), cfg, err))
        timed.sort()
        _, _, cfg, err = timed[0]
        t = bench_ms(lambda: decode24_linear(x, values, meta, b, cfg))  # as long as the others
        t_shared = err_shared = None
        if shared_meta is not None:  # the same config on cuSPARSELt's metadata, read in place
            err_shared = rel_err(decode24_linear(x, values, shared_meta, b, cfg), want)
            if not err_shared < PLAN_TOLERANCE:
                raise RuntimeError(f"decode24 {cfg} on cuSPARSELt's metadata, ({out}, {inp}) "
                                   f"M={m}: rel err {err_shared:.2e}")
            t_shared = bench_ms(lambda: decode24_linear(x, values, shared_meta, b, cfg))
        row = {"out": out, "in": inp, "bias": bias, "tokens": m, "dense_ms": t_dense,
               "cusparselt_ms": t_cslt, "decode24_ms": t, "config": cfg.__dict__,
               "runner_up": timed[1][2].__dict__ if len(timed) > 1 else None,
               "timed": [[c.__dict__, ms] for ms, _, c, _ in timed],  # fastest first
               "err": err, "cusparselt_err": rel_err(got_cslt, want),
               "decode24_in_place_ms": t_shared, "in_place_err": err_shared,
               "dense_gbps": _bytes(out, inp, m, False) / t_dense / 1e6,
               "decode24_gbps": _bytes(out, inp, m, True) / t / 1e6,
               "cusparselt_gbps": _bytes(out, inp, m, True) / t_cslt / 1e6}
        rows.append(row)
        log(f"({out:5d}, {inp:5d}) M={m:2d} | cuBLAS {1e3 * t_dense:7.1f} us "
            f"{row['dense_gbps']:5.0f} GB/s | cuSPARSELt {1e3 * t_cslt:7.1f} us "
            f"({t_dense / t_cslt:4.2f}x) | decode24 {1e3 * t:7.1f} us {row['decode24_gbps']:5.0f}"
            f" GB/s ({t_dense / t:4.2f}x) {cfg.mode} bm{cfg.block_m} bn{cfg.block_n} "
            f"bk{cfg.block_k} s{cfg.split_k} w{cfg.num_warps}"
            + ("" if t_shared is None else f" | in place {1e3 * t_shared:7.1f} us"))
    return rows


def run_gemm(args) -> int:
    refused = argument_check_then_cuda(argument_error(args), "`bench inference gemm`")
    if refused is not None:
        return refused
    import triton
    t0 = time.time()
    speed = gpu_speed()
    meta = {**run_environment(), "triton": triton.__version__, **speed,
            "command": " ".join(sys.argv)}
    print(f"# {meta['gpu']} | torch {meta['torch']} | triton {meta['triton']} | copy "
          f"{speed['copy_gbps']:.0f} GB/s | bf16, medians of do_bench (L2 emptied per call)",
          flush=True)
    jobs = [(s, SHAPES[name]["bias"]) for name in args.models for s in SHAPES[name]["shapes"]]
    seen, todo = set(), []
    for (out, inp), bias in jobs:
        if (out, inp, bias) not in seen:
            seen.add((out, inp, bias))
            todo.append((out, inp, bias))
    if args.tune:  # the grid's kernels do not depend on the shape (split-K is an argument)
        work = [(cfg, m, out, inp, bias) for out, inp, bias in todo[:1] for m in args.tokens
                for cfg in tune_grid(m)]
    else:
        from slope_megatron.inference.decode24_plans import candidate_configs
        work = [(cfg, m, out, inp, bias) for out, inp, bias in todo for m in args.tokens
                for cfg in candidate_configs(m, out, inp)]
    _precompile(work, max(1, min(16, (os.cpu_count() or 2) - 1)))
    print(f"# compiled {len(work)} kernels in {time.time() - t0:.0f} s", flush=True)
    results = {"meta": meta, "rows": []}
    for out, inp, bias in todo:
        if args.deadline and time.time() - t0 > args.deadline:
            print(f"# deadline: ({out}, {inp}) not measured", flush=True)
            continue
        results["rows"] += measure_shape(out, inp, bias, args.tokens, args.tune,
                                         log=lambda s: print(s, flush=True))
        if args.json:
            os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
            Path(args.json).write_text(json.dumps(results, indent=1))
    print(f"# wrote {args.json} ({time.time() - t0:.0f} s)")
    if args.tune and args.save_configs:
        save_configs(results, args.save_configs)
        print(f"# wrote {args.save_configs}: SLOPE_DECODE24_CONFIGS={args.save_configs} makes "
              f"the load-time plans time these configs")
    return 0


def save_configs(results: dict, path: str) -> None:
    """The winners and runners-up of every measured (shape, tokens), per token bucket."""
    from slope_megatron.kernels.decode24_config import rows_block
    buckets: dict = {}
    for row in results["rows"]:
        for cfg in (row["config"], row["runner_up"]):
            if cfg is not None and cfg not in buckets.setdefault(str(rows_block(row["tokens"])),
                                                                  []):
                buckets[str(rows_block(row["tokens"]))].append(cfg)
    Path(path).write_text(json.dumps({"gpu": results["meta"]["gpu"],
                                      "triton": results["meta"]["triton"],
                                      "configs": buckets}, indent=1))

