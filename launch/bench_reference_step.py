"""GPU microbench: where the reference (masked-dense) SLoPe layer step loses to F.linear.

    python launch/bench_reference_step.py   (one CUDA GPU; results in docs/KERNELS.md)
"""
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from triton.testing import do_bench

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout
from slope_megatron.sparsity import SlopeLinear  # noqa: E402
from slope_megatron.sparsity.functional import dense_from_values, values_from_dense  # noqa: E402

torch.manual_seed(0)
dev = "cuda"
for inn, out, T in [(768, 768, 1024), (768, 3072, 16384), (4096, 11008, 8192)]:
    layer = SlopeLinear(inn, out, bias=True, backend="reference").to(dev, torch.bfloat16)
    x = torch.randn(T, inn, device=dev, dtype=torch.bfloat16, requires_grad=True)
    gy = torch.randn(T, out, device=dev, dtype=torch.bfloat16)
    w = layer.dense_weight().detach().clone().requires_grad_(True)
    b = layer.bias.detach().clone().requires_grad_(True)
    def dense_step():
        torch.autograd.grad(F.linear(x, w, b), (x, w, b), gy)
    def ref_step():
        torch.autograd.grad(layer(x), (x, layer.weight, layer.bias), gy)
    mask, vals = layer.mask, layer.weight.detach()
    k = vals.shape[1]
    flat = mask.view(-1).nonzero_static(size=out * k).view(-1)
    def scatter_ms():
        dense_from_values(vals, mask)
    def gather_bool():
        values_from_dense(w.detach(), mask)
    def gather_static():
        w.detach().view(-1)[mask.view(-1).nonzero_static(size=out * k).view(-1)].view(out, k)
    def gather_cached():
        w.detach().view(-1).index_select(0, flat).view(out, k)
    res = {f.__name__: do_bench(f, warmup=20, rep=100, return_mode="median")
           for f in (dense_step, ref_step, scatter_ms, gather_bool, gather_static, gather_cached)}
    print(f"{inn}x{out} T={T}: " + ", ".join(f"{n} {v:.3f}ms" for n, v in res.items()), flush=True)
