"""Timing primitives of `bench.py kernels` (launch/bench.py), following the device method:
warm-up, medians, inputs rotated past the L2 cache, correctness by relative error.

Why a module: the layer table (bench.py) and the adapter benchmark (bench_adapters.py) time
the same way.
"""
from __future__ import annotations

import math

L2_ROTATE_BYTES = 256 << 20


def rel_err(a, b) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


class Rotor:
    """Cycles through copies of a tensor so that a timed call does not read it from L2."""

    def __init__(self, make, nbytes_each):
        self.items = [make() for _ in range(max(1, min(8, math.ceil(L2_ROTATE_BYTES /
                                                                   max(1, nbytes_each)))))]
        self.i = 0

    def __call__(self):
        self.i = (self.i + 1) % len(self.items)
        return self.items[self.i]


def bench_ms(fn) -> float:
    from triton.testing import do_bench
    return float(do_bench(fn, warmup=10, rep=40, return_mode="median"))


def loop_ms(fn, calls: int = 16, reps: int = 9) -> float:
    """Per-call ms of `calls` back-to-back calls (median of `reps` loops, after a warm-up
    loop), timed by events around the loop: the stream's throughput, where a call's host
    work overlaps the GPU work queued before it. `bench_ms` times each call alone after an
    L2 flush, so host work longer than the flush shows there."""
    import torch
    times = []
    for i in range(reps + 1):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        end.synchronize()
        if i:
            times.append(start.elapsed_time(end) / calls)
    return float(sorted(times)[len(times) // 2])
