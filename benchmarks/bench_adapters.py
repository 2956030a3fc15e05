"""The lazy adapter's forward overhead for `bench kernels` (docs/KERNELS.md, section "The
adapter inside the sparse GEMM"): the adapter inside the widened sparse GEMM vs added after it,
timed alone and back to back, with the pieces each path is made of.
"""
from __future__ import annotations

from benchmarks.common import bench_ms, loop_ms, rel_err


def bench_adapter(layer, xs, torch):
    """Forward with the lazy adapter (rank 2% of in) vs without. Two ways: the layer's forward
    (the cusparselt backend puts the adapter inside the sparse GEMM, `cusparselt_adapter`) and
    the adapter added after the GEMM (`lowrank.add_adapter`: X A, then one Triton pass
    Y + (X A)(B / r)); plus the pieces: X A by cuBLAS, the widening pass, the plain and the
    widened sparse GEMM, the Triton pass."""
    from slope_megatron.kernels.lowrank_triton import lowrank_add, widen_with_lowrank
    from slope_megatron.sparsity.backends.cusparselt_adapter import (augmented_linear,
                                                                     inside_pays, padded_rank)
    from slope_megatron.sparsity.backends.lowrank import add_adapter
    rank = max(1, round(0.02 * layer.in_features))

    def fwd():
        with torch.no_grad():
            return layer(xs())

    def inside():
        with torch.no_grad():
            x = xs()
            return augmented_linear(layer.backend.cache(layer), layer, x, only_if_it_pays=False)

    def after(x=None):
        with torch.no_grad():
            x = xs() if x is None else x
            return add_adapter(layer, x, layer.backend.linear(layer, x))

    cache = layer.backend.cache(layer)
    x0 = xs.items[0]
    base, gemm_ms = bench_ms(fwd), bench_ms(lambda: cache.forward(xs()))
    layer.enable_adapter(rank)
    with torch.no_grad():
        layer.adapter_b.normal_()
        want = (x0.float() @ layer.dense_weight().float().t()
                + (x0.float() @ layer.adapter_a.float()) @ layer.adapter_b.float()
                * layer.adapter_scale)
        if layer.bias is not None:
            want += layer.bias.float()
        err = rel_err(augmented_linear(cache, layer, x0, only_if_it_pays=False), want)
        err_after = rel_err(after(x0), want)
    chosen, inside_ms, after_ms = bench_ms(fwd), bench_ms(inside), bench_ms(after)
    loops = {"loop_inside_ms": loop_ms(inside), "loop_after_ms": loop_ms(after)}
    layer.adapter_active = False
    loops["loop_base_ms"] = loop_ms(fwd)
    layer.adapter_active = True
    r16 = padded_rank(rank)
    a = torch.randn(layer.in_features, r16, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(r16, layer.out_features, device="cuda", dtype=torch.bfloat16)
    op = cache.adapter_operand
    wide, xa = widen_with_lowrank(x0, a)
    buf = op.sync(layer)
    y0 = torch.randn(x0.shape[0], layer.out_features, device="cuda", dtype=torch.bfloat16)
    parts = {"gemm_ms": gemm_ms,
             "xa_ms": bench_ms(lambda: torch.mm(xs(), a)),
             "widen_ms": bench_ms(lambda: widen_with_lowrank(xs(), a)),
             "wide_gemm_ms": bench_ms(lambda: op.matmul(buf, wide, None)),
             "lowrank_add_ms": bench_ms(lambda: lowrank_add(y0, xa, b))}
    layer.adapter_active = False
    return {"rank": rank, "rank_padded": r16, "fwd_no_adapter": base,
            "inside_chosen": inside_pays(layer), "fwd_adapter": chosen,
            "fwd_adapter_inside": inside_ms, "fwd_adapter_after": after_ms,
            "overhead_pct": 100 * (chosen / base - 1),
            "overhead_inside_pct": 100 * (inside_ms / base - 1),
            "overhead_after_pct": 100 * (after_ms / base - 1), "err": err,
            "err_after": err_after, **loops,
            "loop_overhead_inside_pct": 100 * (loops["loop_inside_ms"] / loops["loop_base_ms"] - 1),
            "loop_overhead_after_pct": 100 * (loops["loop_after_ms"] / loops["loop_base_ms"] - 1),
            **parts}
