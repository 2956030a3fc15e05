"""Benchmarks. `kernels`: SLoPe's sparse linear on a GPU vs dense and vs torch's built-in 2:4.
`train`: whole-model training throughput, dense vs SLoPe (see benchmarks/bench_train.py).
`inference gemm|generate|blocks`: the decode GEMM, whole-model generation and per-block
latency, dense vs SLoPe (benchmarks/bench_decode_gemm.py, bench_generate.py, bench_inference.py).

    python -m benchmarks.bench kernels [--tokens 1024 8192 16384] [--models gpt2-small llama-7b]
                                       [--json docs/kernels_bench.json]
    python -m benchmarks.bench train [--config configs/gpt2-small.yaml] [--arms dense slope]
    python -m benchmarks.bench inference gemm [--models llama-7b] [--tune]
    python -m benchmarks.bench inference generate [--arms dense slope] [--batches 1 8 32]
    python -m benchmarks.bench inference blocks [--models llama-7b] [--prefill 512 2048]

For every (model, layer shape, T) it times, in one process and with the same random bf16 data:
  dense   torch matmuls (cuBLAS): forward, dX = dY W, dW = dY^T X, and the autograd step
  torch   torch.sparse.to_sparse_semi_structured + F.linear (torch's cuSPARSELt path, plan built
          per call): forward, dX, and a step that re-compresses W and W_RC^T as its refresh
  ours    the `cusparselt` backend: forward, dX, dW (dense GEMM + Triton gather), the refresh
          after an optimizer step (copy + gather), and the whole layer step (autograd
          forward + backward + refresh)
and checks ours against the reference backend (rel. err < 1e-2) before timing. Also: per-call
overhead at 128^3, and the lazy adapter's cost at rank 2% for T >= 4096. Times are medians of
triton.testing.do_bench (CUDA events), inputs rotated so each timed call reads data not in L2.
Prints a table and writes JSON with the GPU name and torch / cuSPARSELt / triton versions.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time

from benchmarks.common import Rotor, bench_ms, rel_err, require_cuda, source_identity
from slope_megatron.errors import EXIT_USER_ERROR

# (model, layer, in_features, out_features, bias)
MODELS = {
    "gpt2-small": [("qkv", 768, 2304, True), ("attn-out", 768, 768, True),
                   ("mlp-up", 768, 3072, True), ("mlp-down", 3072, 768, True)],
    "opt-1.3b": [("qkv", 2048, 6144, True), ("attn-out", 2048, 2048, True),
                 ("fc1", 2048, 8192, True), ("fc2", 8192, 2048, True)],
    "opt-2.7b": [("qkv", 2560, 7680, True), ("attn-out", 2560, 2560, True),
                 ("fc1", 2560, 10240, True), ("fc2", 10240, 2560, True)],
    "opt-6.7b": [("qkv", 4096, 12288, True), ("attn-out", 4096, 4096, True),
                 ("fc1", 4096, 16384, True), ("fc2", 16384, 4096, True)],
    "llama-7b": [("attn-q/k/v/o", 4096, 4096, False), ("mlp-gate/up", 4096, 11008, False),
                 ("mlp-down", 11008, 4096, False)],
}


def layer_pair(inn, out, bias, torch):
    from slope_megatron.sparsity import SlopeLinear
    # operands kept between steps: the per-step refresh is timed as its own row
    kw = dict(bias=bias, device="cuda", dtype=torch.bfloat16, column_mask_refresh=100,
              keep_compressed=True)
    fast = SlopeLinear(inn, out, backend="cusparselt", **kw)
    if bias:
        with torch.no_grad():
            fast.bias.normal_()
    ref = SlopeLinear(inn, out, backend="reference", **kw)
    ref.load_state_dict(fast.state_dict())
    return fast, ref


def check(fast, ref, x, gy):
    """Forward + backward of both backends on the same data: rel. errors per output."""
    xa, xb = x.detach().clone().requires_grad_(), x.detach().clone().requires_grad_()
    ya, yb = fast(xa), ref(xb)
    ya.backward(gy)
    yb.backward(gy)
    errs = {"y": rel_err(ya, yb), "dx": rel_err(xa.grad, xb.grad),
            "dw": rel_err(fast.weight.grad, ref.weight.grad)}
    if fast.bias is not None:
        errs["db"] = rel_err(fast.bias.grad, ref.bias.grad)
    fast.zero_grad(set_to_none=True)
    ref.zero_grad(set_to_none=True)
    return errs


def bench_dense(w, b, xs, gys, torch):
    import torch.nn.functional as F
    wp = w.detach().clone().requires_grad_()
    bp = b.detach().clone().requires_grad_() if b is not None else None
    xg = [x.detach().clone().requires_grad_() for x in xs.items]
    it = iter(range(1 << 62))

    def step():
        i = next(it) % len(xg)
        wp.grad = None
        if bp is not None:
            bp.grad = None
        xg[i].grad = None
        F.linear(xg[i], wp, bp).backward(gys.items[i % len(gys.items)])

    return {"fwd": bench_ms(lambda: F.linear(xs(), w, b)),
            "dx": bench_ms(lambda: torch.mm(gys(), w)),
            "dw": bench_ms(lambda: torch.mm(gys().t(), xs())),
            "step": bench_ms(step)}


def bench_torch_semi(layer, xs, gys, torch):
    """torch's built-in 2:4 path (cuSPARSELt with a plan per call), errors caught."""
    import torch.nn.functional as F
    from torch.sparse import SparseSemiStructuredTensor, to_sparse_semi_structured
    SparseSemiStructuredTensor._FORCE_CUTLASS = False  # CUTLASS refuses sm90
    try:
        w = layer.dense_weight().detach()
        w_rc_t = (w * layer.column_mask).t().contiguous()
        ws, wts = to_sparse_semi_structured(w), to_sparse_semi_structured(w_rc_t)
        b = layer.bias.detach() if layer.bias is not None else None
        err = rel_err(F.linear(xs.items[0], ws, b), F.linear(xs.items[0], w, b))
        mask = layer.mask

        def step():
            x, gy = xs(), gys()
            F.linear(x, ws, b)
            F.linear(gy, wts)
            torch.mm(gy.t(), x)[mask]
            if b is not None:
                gy.sum(0)
            to_sparse_semi_structured(w)
            to_sparse_semi_structured(w_rc_t)

        return {"fwd": bench_ms(lambda: F.linear(xs(), ws, b)),
                "dx": bench_ms(lambda: F.linear(gys(), wts)),
                "step": bench_ms(step), "err_fwd": err}
    except Exception as e:  # report, do not abort the run
        return {"error": f"{type(e).__name__}: {e}"[:300]}


def bench_ours(layer, xs, gys, torch):
    cache = layer.backend.cache(layer)
    with torch.no_grad():
        layer(xs())  # builds/tunes the forward plan
    xg = [x.detach().clone().requires_grad_() for x in xs.items]
    it = iter(range(1 << 62))
    stale = layer._column_mask_is_stale

    def step():
        i = next(it) % len(xg)
        layer.weight.grad = None
        if layer.bias is not None:
            layer.bias.grad = None
        xg[i].grad = None
        layer(xg[i]).backward(gys.items[i % len(gys.items)])
        cache.after_step(layer, column_mask_will_change=stale())

    step()  # builds W^T, tunes the dX plan

    def fwd():
        with torch.no_grad():
            return layer(xs())

    out = {"fwd": bench_ms(fwd),
           "fwd_kernel": bench_ms(lambda: cache.forward(xs())),
           "dx": bench_ms(lambda: cache.grad_input(gys())),
           "dw": bench_ms(lambda: cache.grad_weight(gys(), xs(), layer.mask_bits)),
           "refresh": bench_ms(lambda: cache.after_step(layer, column_mask_will_change=False)),
           "step": bench_ms(step)}

    def rebuild():
        cache.invalidate_wt()
        cache.sync_backward(layer)

    out["wt_recompress"] = bench_ms(rebuild)  # cost when the column mask is refreshed
    return out


def bench_overhead(torch):
    """Per-call cost at 128^3, where launch and host overhead dominate."""
    fast, _ = layer_pair(128, 128, False, torch)
    x = torch.randn(128, 128, device="cuda", dtype=torch.bfloat16)
    w = fast.dense_weight().detach()
    cache = fast.backend.cache(fast)
    with torch.no_grad():
        fast(x)
    ws = None
    try:
        from torch.sparse import to_sparse_semi_structured
        ws = to_sparse_semi_structured(w)
    except Exception:
        pass
    import torch.nn.functional as F

    def layer_fwd():
        with torch.no_grad():
            return fast(x)

    def cpu_us(fn, n=2000):
        """Host time to issue one call (no sync inside the loop)."""
        for _ in range(50):
            fn()
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(n):
            fn()
        issued = time.perf_counter() - t
        torch.cuda.synchronize()
        return 1e6 * issued / n

    calls = {"dense": lambda: torch.mm(x, w.t()), "ours_kernel": lambda: cache.forward(x),
             "ours_layer": layer_fwd}
    if ws is not None:
        calls["torch_semi"] = lambda: F.linear(x, ws)
    # a whole autograd step of a small layer, where the host's issue time is the limit
    small, _ = layer_pair(768, 768, True, torch)
    xg = torch.randn(1024, 768, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    gy = torch.randn(1024, 768, device="cuda", dtype=torch.bfloat16)
    wd = small.dense_weight().detach().clone().requires_grad_()
    bd = small.bias.detach().clone().requires_grad_()
    scache = small.backend.cache(small)

    def ours_step():
        small.weight.grad = small.bias.grad = xg.grad = None
        small(xg).backward(gy)
        scache.after_step(small, column_mask_will_change=False)

    def dense_step():
        wd.grad = bd.grad = xg.grad = None
        F.linear(xg, wd, bd).backward(gy)

    calls["dense_step_768_T1024"] = dense_step
    calls["ours_step_768_T1024"] = ours_step
    res = {}
    for name, fn in calls.items():
        res[f"{name}_us"] = 1e3 * bench_ms(fn)
        res[f"{name}_cpu_us"] = cpu_us(fn, 2000 if name in ("dense", "ours_kernel") else 200)
    return res


def bench_layer(model, name, fast, ref, xs, gys, T, torch) -> dict:
    """One table row: correctness against the reference, then dense / torch's 2:4 path / ours
    for fwd, dX, dW and the whole step (printed as it is measured)."""
    inn, out, bias = fast.in_features, fast.out_features, fast.bias is not None
    errs = check(fast, ref, xs.items[0], gys.items[0])
    w = fast.dense_weight().detach()
    b = fast.bias.detach() if bias else None
    dense = bench_dense(w, b, xs, gys, torch)
    semi = bench_torch_semi(fast, xs, gys, torch)
    ours = bench_ours(fast, xs, gys, torch)
    sp = lambda d, k: (dense[k] / d[k]) if k in d else float("nan")
    print(f"{model:10s} {name:13s} {inn:5d} {out:5d} {T:5d} | {dense['fwd']:6.3f} "
          f"{dense['dx']:6.3f} {dense['dw']:6.3f} {dense['step']:6.3f} | "
          f"{sp(semi, 'fwd'):4.2f} {sp(semi, 'dx'):4.2f} {sp(semi, 'step'):4.2f} | "
          f"{sp(ours, 'fwd'):4.2f} {sp(ours, 'dx'):4.2f} {sp(ours, 'dw'):4.2f} "
          f"{sp(ours, 'step'):4.2f} | {100 * ours['refresh'] / dense['step']:5.1f}% | "
          f"{max(errs.values()):.1e}", flush=True)
    return {"model": model, "layer": name, "in": inn, "out": out, "T": T, "bias": bias,
            "err": errs, "dense": dense, "torch_semi": semi, "ours": ours}


def run_kernels(args) -> int:
    bad = [t for t in args.tokens if t < 1]
    if bad:  # checked before anything is imported or built
        print(f"error: --tokens takes token counts of at least 1, got {bad[0]}",
              file=sys.stderr)
        return EXIT_USER_ERROR
    require_cuda("`bench kernels`")  # before triton: a CPU machine may not have it
    import torch
    import triton

    from slope_megatron.sparsity.backends.cusparselt import unavailable_reason
    t0 = time.time()
    reason = unavailable_reason()
    if reason is not None:
        print(f"error: the cusparselt backend is unavailable: {reason}", file=sys.stderr)
        return EXIT_USER_ERROR
    from slope_megatron.sparsity.backends.cusparselt_runtime import runtime
    rt = runtime()
    dev = torch.cuda.current_device()
    meta = {"gpu": torch.cuda.get_device_name(dev), "torch": torch.__version__,
            "cuda": torch.version.cuda, "cusparselt": rt.ext.library_version(dev),
            "triton": triton.__version__,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
            "command": " ".join(sys.argv), "build_s": time.time() - t0,
            "values_row_major": rt.values_row_major(torch.device("cuda", dev), torch.bfloat16),
            **source_identity()}
    print(f"# {meta['gpu']} | torch {meta['torch']} | cuSPARSELt {meta['cusparselt']} | "
          f"triton {meta['triton']} | build+load {meta['build_s']:.1f}s", flush=True)
    results = {"meta": meta, "overhead_128": bench_overhead(torch), "layers": [], "adapters": []}
    print("# per-call at 128^3 (us; *_cpu_us = host time to issue one call):",
          {k: round(v, 1) for k, v in results["overhead_128"].items()}, flush=True)
    hdr = (f"{'model':10s} {'layer':13s} {'in':>5s} {'out':>5s} {'T':>5s} | dense ms: {'fwd':>6s} "
           f"{'dX':>6s} {'dW':>6s} {'step':>6s} | x dense: torch fwd/dX/step | ours fwd/dX/dW/"
           f"step | refresh%step | max err")
    print(hdr, flush=True)
    for model in args.models:
        for name, inn, out, bias in MODELS[model]:
            for T in args.tokens:
                torch.manual_seed(0)
                fast, ref = layer_pair(inn, out, bias, torch)
                xs = Rotor(lambda: torch.randn(T, inn, device="cuda", dtype=torch.bfloat16),
                           2 * T * (inn + out))
                gys = Rotor(lambda: torch.randn(T, out, device="cuda", dtype=torch.bfloat16),
                            2 * T * (inn + out))
                if not args.adapters_only:
                    results["layers"].append(bench_layer(model, name, fast, ref, xs, gys, T,
                                                         torch))
                if T >= 4096 and args.adapters:
                    from benchmarks.bench_adapters import bench_adapter
                    ad = bench_adapter(fast, xs, torch)
                    ad.update(model=model, layer=name, T=T)
                    results["adapters"].append(ad)
                del fast, ref, xs, gys
                torch.cuda.empty_cache()
    if results["adapters"]:
        print("# adapter forward overhead at rank 2%: the layer's choice (i: inside the sparse "
              "GEMM, a: after it) / inside / after:")
        for ad in results["adapters"]:
            print(f"#   {ad['model']:10s} {ad['layer']:13s} T={ad['T']:5d} r={ad['rank']:3d}: "
                  f"{ad['overhead_pct']:5.1f}% ({'i' if ad['inside_chosen'] else 'a'}) / "
                  f"{ad['overhead_inside_pct']:5.1f}% / {ad['overhead_after_pct']:5.1f}%; "
                  f"back to back {ad['loop_overhead_inside_pct']:5.1f}% / "
                  f"{ad['loop_overhead_after_pct']:5.1f}%  "
                  f"(err {ad['err']:.1e} / {ad['err_after']:.1e}; ms: gemm {ad['gemm_ms']:.3f} "
                  f"widened {ad['wide_gemm_ms']:.3f} widen {ad['widen_ms']:.3f} "
                  f"XA {ad['xa_ms']:.3f} triton {ad['lowrank_add_ms']:.3f})")
    results["plans"] = rt.plans.configs()
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
        print(f"# wrote {args.json}")
    bad = [r for r in results["layers"] if not max(r["err"].values()) < 1e-2]
    bad += [a for a in results["adapters"] if not max(a["err"], a["err_after"]) < 1e-2]
    if bad:
        print(f"# CORRECTNESS FAILED for {len(bad)} rows")
        return 1
    return 0


class DefaultsShown(argparse.HelpFormatter):
    """Help that ends with each option's default (lists as on the command line); flags and
    options without a default show none."""

    def _get_help_string(self, action):
        text, default = action.help or "", action.default
        if action.nargs == 0 or default in (None, [], argparse.SUPPRESS) or "%(default)" in text:
            return text
        shown = " ".join(map(str, default)) if isinstance(default, list) else str(default)
        return f"{text} (default: {shown.replace('%', '%%')})"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench",
                                description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="what", required=True)
    defaults = DefaultsShown  # every option's help shows its default
    k = sub.add_parser("kernels", help="sparse linear kernels vs dense and torch's 2:4 path",
                       description="SLoPe's sparse linear layer on a GPU vs dense matmuls and "
                                   "torch's built-in 2:4 path, per layer shape of each model",
                       formatter_class=defaults)
    k.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS),
                   metavar="MODEL", help=f"models whose layer shapes are timed: "
                                         f"{', '.join(MODELS)}")
    k.add_argument("--tokens", nargs="+", type=int, default=[1024, 8192, 16384], metavar="T",
                   help="token counts (rows of the activations) timed per layer shape")
    k.add_argument("--json", default="docs/kernels_bench.json",
                   help="write the results (with the GPU name and versions) here")
    which = k.add_mutually_exclusive_group()
    which.add_argument("--no-adapters", dest="adapters", action="store_false",
                       help="only the layer table, no adapter forward overhead")
    which.add_argument("--adapters-only", action="store_true",
                       help="only the adapter forward overhead (T >= 4096), no layer table")
    from benchmarks import bench_decode_gemm, bench_generate, bench_inference, bench_train

    bench_train.add_arguments(sub.add_parser(
        "train", help="training throughput, dense vs SLoPe", formatter_class=defaults,
        description="whole-model training throughput and memory, dense vs SLoPe: each arm "
                    "is a `launch/pretrain.py` run on the same config, data and seed"))
    inference = sub.add_parser(
        "inference", help="inference: the decode GEMM, whole-model generation, blocks",
        description="inference on a GPU, dense vs SLoPe: `gemm` the 2:4 decode GEMM alone "
                    "(1-64 tokens), `generate` whole-model generate tokens/s and prefill, "
                    "`blocks` prefill/decode latency and weight bytes per transformer block")
    part = inference.add_subparsers(dest="part", required=True)
    bench_decode_gemm.add_arguments(part.add_parser(
        "gemm", help="the 2:4 decode GEMM vs cuBLAS and cuSPARSELt", formatter_class=defaults,
        description=bench_decode_gemm.__doc__.split("\n\n")[0]))
    bench_generate.add_arguments(part.add_parser(
        "generate", help="whole-model generate tokens/s and prefill, each arm a process",
        formatter_class=defaults, description=bench_generate.__doc__.split("\n\n")[0]))
    bench_inference.add_arguments(part.add_parser(
        "blocks", help="prefill/decode latency and weight memory per block",
        formatter_class=defaults,
        description="prefill and decode latency and weight bytes of whole transformer blocks "
                    "on a GPU, dense vs SLoPe with compressed 2:4 weights"))
    args = p.parse_args(argv)
    if args.what == "kernels":
        return run_kernels(args)
    if args.what == "inference":
        run = {"gemm": bench_decode_gemm.run_gemm, "generate": bench_generate.run_generate,
               "blocks": bench_inference.run_inference}[args.part]
        return run(args)
    return bench_train.run_train(args)


if __name__ == "__main__":
    sys.exit(main())
