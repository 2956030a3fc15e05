"""Host (CPU) time per SLoPe layer call, by piece: where a host-bound training step goes.

Why: a sparse model's step can be slower than dense's although its GPU kernels take less
time, because the host cannot issue them fast enough (docs/RESULTS.md). This times, on a
CUDA machine, the host side of one layer step (forward + backward through autograd) for
dense `nn.Linear`, the reference, cublas and cusparselt backends (native step, and again
through the Python autograd functions), then the pieces of the cusparselt call, at a small
token count so the GPU never makes the host wait. A cProfile of the cusparselt steps lists the
Python functions that cost the most.

    python -m benchmarks.host_overhead [--features 2048] [--tokens 64] [--reps 300]
"""
from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import statistics
import sys
import time
from pathlib import Path

from benchmarks.common import require_cuda
from slope_megatron.errors import EXIT_USER_ERROR


def host_us(fn, reps: int) -> float:
    """Median host microseconds per call of fn() (GPU drained before each batch of 10)."""
    import torch

    for _ in range(5):
        fn()
    times = []
    for _ in range(reps // 10):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(10):
            fn()
        times.append((time.perf_counter() - t0) / 10 * 1e6)
    torch.cuda.synchronize()
    return statistics.median(times)


def argument_error(args) -> str | None:
    """What is wrong with the numbers given (None when nothing)."""
    if args.features < 4 or args.features % 4:
        return (f"--features must be a positive multiple of 4 (the layer is 2:4 sparse), "
                f"got {args.features}")
    if args.tokens < 1:
        return f"--tokens must be at least 1, got {args.tokens}"
    if args.reps < 10:
        return f"--reps must be at least 10 (calls are timed in batches of 10), got {args.reps}"
    return None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.host_overhead",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--features", type=int, default=2048,
                   help="input and output width of the layer (default: %(default)s)")
    p.add_argument("--tokens", type=int, default=64,
                   help="tokens per call, small so the GPU never makes the host wait "
                        "(default: %(default)s)")
    p.add_argument("--reps", type=int, default=300,
                   help="calls timed per row, in batches of 10 (default: %(default)s)")
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args(argv)
    problem = argument_error(args)  # before the GPU check: a fix the user can make anywhere
    if problem is not None:
        print(f"error: {problem}", file=sys.stderr)
        return EXIT_USER_ERROR
    require_cuda("benchmarks.host_overhead")
    import torch
    from torch import nn

    from slope_megatron.sparsity import SlopeLinear
    from slope_megatron.sparsity.backends import get_backend

    f, t, dev, bf16 = args.features, args.tokens, "cuda", torch.bfloat16
    x = torch.randn(t, f, device=dev, dtype=bf16, requires_grad=True)
    g = torch.randn(t, f, device=dev, dtype=bf16)

    def layer_step(layer):
        def run():
            y = layer(x)
            y.backward(g)
        return run

    dense = nn.Linear(f, f, device=dev, dtype=bf16)
    layers = {name: SlopeLinear(f, f, backend=name, device=dev, dtype=bf16)
              for name in ("reference", "cublas", "cusparselt")}
    rows = {"dense nn.Linear step": host_us(layer_step(dense), args.reps)}
    for name, layer in layers.items():
        rows[f"{name} step"] = host_us(layer_step(layer), args.reps)
        rows[f"{name} after_optimizer_step"] = host_us(layer.after_optimizer_step, args.reps)
    from slope_megatron.sparsity.backends import cublas, cusparselt
    native = (cublas.native_ops, cusparselt.native_ops)
    cublas.native_ops = cusparselt.native_ops = lambda: None  # the Python autograd functions
    for name in ("cublas", "cusparselt"):
        rows[f"{name} step, Python function"] = host_us(layer_step(layers[name]), args.reps)
    cublas.native_ops, cusparselt.native_ops = native
    rows["dense forward (no grad)"] = host_us(lambda: dense(x.detach()), args.reps)

    # pieces of the cusparselt call
    layer = layers["cusparselt"]
    cache = layer.__dict__.get("_cslt_cache")
    if cache is None:  # the backend fell back to the reference path (its log line says why)
        print("error: the cusparselt backend did not take this layer (see the warning above); "
              "no per-piece times", file=sys.stderr)
        return 1
    x2 = x.detach()
    backend = get_backend("cusparselt")
    from slope_megatron.kernels.nm_triton import gather_kept_2to4
    from slope_megatron.sparsity.backends.cusparselt_function import CsltSlopeLinearFunction

    with torch.no_grad():
        rows["cusparselt backend.linear (no grad)"] = host_us(
            lambda: backend.linear(layer, x2), args.reps)
        rows["  column_mask_for_backward"] = host_us(layer.column_mask_for_backward, args.reps)
        rows["  cache.accepts"] = host_us(lambda: cache.accepts(layer, x2), args.reps)
        rows["  cache.sync_forward"] = host_us(lambda: cache.sync_forward(layer), args.reps)
        rows["  cache.forward (plan matmul)"] = host_us(
            lambda: cache.forward(x2, layer.bias), args.reps)
        rows["  cache.grad_input (plan matmul)"] = host_us(lambda: cache.grad_input(g), args.reps)
        rows["  torch.mm dY^T X"] = host_us(lambda: torch.mm(g.t(), x2), args.reps)
        dw = torch.mm(g.t(), x2)
        rows["  gather_kept_2to4 (Triton launch)"] = host_us(
            lambda: gather_kept_2to4(dw, layer.mask_bits), args.reps)
        ext = cache.rt.ext
        rows["  gather_kept_2to4 (native CUDA)"] = host_us(
            lambda: ext.gather_kept_2to4(dw, layer.mask_bits), args.reps)
        rows["  bias grad gy.sum(0)"] = host_us(lambda: g.sum(0), args.reps)
    rows["  CsltSlopeLinearFunction fwd+bwd"] = host_us(
        lambda: CsltSlopeLinearFunction.apply(x, layer.weight, layer.bias, cache,
                                              layer).backward(g), args.reps)

    print(f"host time per call, {f}x{f} bf16, T={t} (us, median)")
    for k, v in rows.items():
        print(f"{k:42s} {v:9.1f}")

    prof = cProfile.Profile()
    run = layer_step(layer)
    prof.enable()
    for _ in range(200):
        run()
    prof.disable()
    torch.cuda.synchronize()
    s = io.StringIO()
    pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(25)
    print(s.getvalue())
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"features": f, "tokens": t, "host_us": rows,
                                               "gpu": torch.cuda.get_device_name(),
                                               "torch": torch.__version__,
                                               "cprofile_cusparselt_step": s.getvalue()},
                                              indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
