"""The `cublas` backend on a GPU: bit for bit the reference's results, in bf16.

Its GEMMs are the reference's own torch calls; only the operands (W*M, W*M*M_C) and the dW
gather come from its own kernels (Triton, or CUDA in the native step), so on one device every output and gradient must equal the
reference's exactly, across optimizer steps that change the weights and the column mask.
Also: no-grad forwards, plain static N:M (no double pruning), the adapter path, the explicit
cusparselt backend's fallback for token counts its kernels cannot take, and that the path is
not slower than the reference it replaces in `auto` (GPU time).
"""
import pytest
import torch
import torch.nn.functional as F

from helpers.layer import compare_step, make_pair
from helpers.launch import load_benchmark

pytestmark = pytest.mark.gpu


def step_exact(lay, ref, shape, what):
    compare_step(lay, ref, shape, what)  # bit for bit


@pytest.mark.parametrize("inn,out,bias,shape", [
    (768, 768, True, (1024, 768)),
    (768, 3072, False, (4, 256, 768)),
    (3072, 768, True, (2048, 3072)),
    (2048, 2048, True, (8, 512, 2048)),
    (4096, 11008, False, (2048, 4096)),
    (96, 64, True, (24, 96)),  # rows of 12 mask bytes; an odd token count
])
@pytest.mark.parametrize("native", [True, False], ids=["native", "python"])
def test_cublas_equals_reference_over_steps(inn, out, bias, shape, native, monkeypatch):
    from slope_megatron.sparsity.backends import cublas
    if not native:  # the Python autograd function (what runs where the extension cannot build)
        monkeypatch.setattr(cublas, "native_ops", lambda: None)
    lay, ref = make_pair(inn, out, bias, "cublas")
    for step in range(4):  # column mask recomputed at steps 0 and 2
        step_exact(lay, ref, shape, f"{inn}x{out} step {step}")
    assert not lay._unpacked  # this path reads the packed masks only


def test_cublas_without_double_pruning_equals_reference():
    lay, ref = make_pair(512, 256, True, "cublas", double_prune=False)
    for step in range(2):
        step_exact(lay, ref, (128, 512), f"static 2:4 step {step}")


def test_cublas_no_grad_forward_equals_reference():
    lay, ref = make_pair(1024, 512, True, "cublas")
    x = torch.randn(64, 1024, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(lay(x), ref(x))
    with torch.inference_mode():
        assert torch.equal(lay(x), ref(x))


def test_cublas_with_adapter_matches_reference():
    lay, ref = make_pair(1024, 512, True, "cublas")
    lay.enable_adapter(24)
    ref.enable_adapter(24)
    with torch.no_grad():
        ref.adapter_a.copy_(lay.adapter_a)
        lay.adapter_b.normal_()
        ref.adapter_b.copy_(lay.adapter_b)
    x = torch.randn(512, 1024, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    xr = x.detach().clone().requires_grad_()
    y, yr = lay(x), ref(xr)
    dy = torch.randn_like(y)
    y.backward(dy)
    yr.backward(dy)
    for a, b in [(y, yr), (x.grad, xr.grad), (lay.adapter_b.grad, ref.adapter_b.grad),
                 (lay.adapter_a.grad, ref.adapter_a.grad), (lay.weight.grad, ref.weight.grad)]:
        err = ((a.float() - b.float()).norm() / b.float().norm()).item()
        assert err < 1e-2, err


def test_cusparselt_fallback_runs_cublas(monkeypatch):
    """24 tokens is not a multiple of 16: the cusparselt backend hands the call to cublas."""
    from slope_megatron.sparsity.backends import cublas
    lay, ref = make_pair(512, 256, True, "cusparselt")
    calls = []
    real = cublas.CublasBackend.linear
    monkeypatch.setattr(cublas.CublasBackend, "linear",
                        lambda self, *a: calls.append(self.name) or real(self, *a))
    step_exact(lay, ref, (24, 512), "fallback")
    assert calls == ["cublas"]


def gpu_ms_per_step(fn) -> float:
    """GPU time of one step with the host queued ahead (benchmarks.layer_host_gpu), so the number
    is the kernels' time, not the host's time to issue them (docs/KERNELS.md has both)."""
    return load_benchmark("layer_host_gpu").host_and_gpu_us(fn, n=20)[1] / 1e3


def test_cublas_step_gpu_time_near_plain_dense():
    """The point of the backend: the reference step's GPU time is ~1.3x a plain F.linear step
    (masked_scatter twice, index gather); cublas must beat it and be near F.linear."""
    lay, ref = make_pair(2048, 2048, True, "cublas")
    x = torch.randn(16384, 2048, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    gy = torch.randn(16384, 2048, device="cuda", dtype=torch.bfloat16)
    w = ref.dense_weight().detach().clone().requires_grad_()
    b = ref.bias.detach().clone().requires_grad_()

    def step(layer):
        return lambda: torch.autograd.grad(layer(x), (x, layer.weight, layer.bias), gy)

    def plain():
        torch.autograd.grad(F.linear(x, w, b), (x, w, b), gy)

    ms = {name: gpu_ms_per_step(fn)
          for name, fn in (("cublas", step(lay)), ("reference", step(ref)), ("plain", plain))}
    print(f"2048x2048 T=16384 GPU ms per step: {ms}")
    assert ms["cublas"] < ms["reference"], ms
    assert ms["cublas"] < 1.2 * ms["plain"], ms
