"""How much `auto`'s per-shape timing varies when nothing else runs: repeated decisions.

Why: `sparsity.backend: auto` routes each layer shape by short timings (2 warm-up reps, then
the median of 5 for the provisional decision and of 15 for the one that decides for good). In
training runs the same shape was timed on either side of 1x in different runs, which flips it
between the sparse and the dense path (docs/RESULTS.md). This repeats exactly those timings
(`AutoBackend._step` + `cuda_event_measure`, 5 and 15 reps) several times per shape in a quiet
process, for operands kept and per call, and once more with 41 reps, so a decision's spread
can be told from a disturbed measurement.

    python -m benchmarks.auto_timing_spread [--shapes 2048x8192 2048x2048] [--tokens 16384]
        [--repeats 8] [--json out.json]      (the defaults: ~1.3B's four shapes)
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from benchmarks.common import require_cuda

DEFAULT_SHAPES = ["2048x8192", "2048x2048", "2048x6144", "8192x2048"]  # ~1.3B: fc1 proj qkv fc2


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.auto_timing_spread",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", nargs="+", default=DEFAULT_SHAPES, metavar="INxOUT")
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--repeats", type=int, default=8, help="timings per shape and rep count")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if args.repeats < 1 or args.tokens < 1:
        p.error("--repeats and --tokens must be at least 1")
    try:
        args.shapes = [tuple(int(v) for v in s.lower().split("x")) for s in args.shapes]
    except ValueError:
        p.error("--shapes takes IN x OUT pairs such as 2048x8192")
    if any(len(s) != 2 for s in args.shapes):
        p.error("--shapes takes IN x OUT pairs such as 2048x8192")
    return args


def spread(inn: int, out: int, tokens: int, keep: bool, repeats: int) -> dict:
    import torch

    from slope_megatron.sparsity import SlopeLinear
    from slope_megatron.sparsity.backends.auto import (REPS, SETTLED_REPS, AutoBackend,
                                                       cuda_event_measure)

    torch.manual_seed(0)
    layer = SlopeLinear(inn, out, bias=True, column_mask_refresh=100, device="cuda",
                        dtype=torch.bfloat16, keep_compressed=keep)
    auto = AutoBackend()
    layer.backend = auto
    x = torch.randn(tokens, inn, device="cuda", dtype=torch.bfloat16)
    sparse = auto._step(auto.sparse, layer, x, True, refresh=True)
    dense = auto._step(auto.dense, layer, x, True, refresh=False)
    speedups: dict[int, list[float]] = {REPS: [], SETTLED_REPS: []}
    for _ in range(repeats):
        for reps, got in speedups.items():
            sparse_s, dense_s = cuda_event_measure(sparse, dense, reps=reps)
            got.append(dense_s / sparse_s)
    long_sparse, long_dense = cuda_event_measure(sparse, dense, warmup=3, reps=41)
    return {"in": inn, "out": out, "tokens": tokens, "keep_compressed": keep,
            "speedups": speedups[REPS], "speedups_settled": speedups[SETTLED_REPS],
            "reps": [REPS, SETTLED_REPS], "long_speedup": long_dense / long_sparse,
            "long_ms": [long_sparse * 1e3, long_dense * 1e3]}


def main(argv=None) -> int:
    args = parse_args(argv)
    require_cuda("benchmarks.auto_timing_spread")
    import torch
    rows = []
    for inn, out in args.shapes:
        for keep in (True, False):
            r = spread(inn, out, args.tokens, keep, args.repeats)
            rows.append(r)
            five, fifteen = r["speedups"], r["speedups_settled"]
            print(f"{inn}x{out} T={args.tokens} {'kept' if keep else 'per call'}: "
                  f"{args.repeats} timings of {r['reps'][0]} reps {min(five):.2f}-"
                  f"{max(five):.2f}x, of {r['reps'][1]} reps {min(fifteen):.2f}-"
                  f"{max(fifteen):.2f}x; 41 reps {r['long_speedup']:.3f}x "
                  f"({r['long_ms'][0]:.3f} vs {r['long_ms'][1]:.3f} ms)", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"gpu": torch.cuda.get_device_name(),
                                               "torch": torch.__version__, "rows": rows},
                                              indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
