"""GPU microbench: the dense-GEMM SLoPe layer step (reference and cublas backends) vs F.linear.

    python -m benchmarks.bench_reference_step [--json out.json]  (one CUDA GPU; docs/KERNELS.md)

Times with `triton.testing.do_bench` (median) one bf16 layer step (forward + dX + dW + db
through autograd) of `F.linear` on the dense W*M ("plain"), of the reference SlopeLinear and
of the cublas one, plus the pieces that separate them: building W*M by `masked_scatter` vs the
Triton scatter, and the dW gather by index vs the Triton gather.
"""
import argparse
import json
import sys
from pathlib import Path

from benchmarks.common import bench_ms, require_cuda

SHAPES = [(768, 768, 1024), (768, 3072, 16384), (2048, 2048, 16384), (4096, 11008, 8192)]


def bench_shape(inn: int, out: int, tokens: int) -> dict:
    import torch
    import torch.nn.functional as F

    from slope_megatron.kernels.nm_triton import gather_kept_2to4, scatter_kept_2to4
    from slope_megatron.sparsity import SlopeLinear
    from slope_megatron.sparsity.functional import dense_from_values, values_from_dense

    dev = "cuda"
    ref = SlopeLinear(inn, out, bias=True, backend="reference").to(dev, torch.bfloat16)
    fast = SlopeLinear(inn, out, bias=True, backend="cublas").to(dev, torch.bfloat16)
    fast.load_state_dict(ref.state_dict())
    x = torch.randn(tokens, inn, device=dev, dtype=torch.bfloat16, requires_grad=True)
    gy = torch.randn(tokens, out, device=dev, dtype=torch.bfloat16)
    w = ref.dense_weight().detach().clone().requires_grad_(True)
    b = ref.bias.detach().clone().requires_grad_(True)
    mask, vals, bits = ref.mask, ref.weight.detach(), ref.mask_bits

    def plain_step():
        torch.autograd.grad(F.linear(x, w, b), (x, w, b), gy)

    def ref_step():
        torch.autograd.grad(ref(x), (x, ref.weight, ref.bias), gy)

    def cublas_step():
        torch.autograd.grad(fast(x), (x, fast.weight, fast.bias), gy)

    def scatter_masked():
        dense_from_values(vals, mask)

    def scatter_triton():
        scatter_kept_2to4(vals, bits)

    def gather_index():
        values_from_dense(w.detach(), mask, vals.shape[1])

    def gather_triton():
        gather_kept_2to4(w.detach(), bits)

    fns = (plain_step, ref_step, cublas_step, scatter_masked, scatter_triton, gather_index,
           gather_triton)
    ms = {f.__name__: bench_ms(f, warmup=20, rep=100) for f in fns}
    return {"in": inn, "out": out, "tokens": tokens, "ms": ms,
            "cublas_vs_plain": ms["plain_step"] / ms["cublas_step"],
            "reference_vs_plain": ms["plain_step"] / ms["ref_step"]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_reference_step",
                                description=__doc__.splitlines()[0])
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    require_cuda("benchmarks.bench_reference_step")  # before triton: a CPU machine may lack it
    import torch

    torch.manual_seed(0)
    rows = []
    for inn, out, tokens in SHAPES:
        row = bench_shape(inn, out, tokens)
        rows.append(row)
        print(f"{inn}x{out} T={tokens}: " + ", ".join(f"{n} {v:.3f}ms" for n, v in
                                                      row["ms"].items())
              + f"; cublas {row['cublas_vs_plain']:.2f}x plain, reference "
                f"{row['reference_vs_plain']:.2f}x plain", flush=True)
    if args.json:
        meta = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__}
        Path(args.json).write_text(json.dumps({"meta": meta, "results": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
