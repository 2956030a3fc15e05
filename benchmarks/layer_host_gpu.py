"""Host time vs GPU time of one bf16 layer step: plain F.linear, reference and cublas SlopeLinear.

    python -m benchmarks.layer_host_gpu [--shapes 768x3072 2048x2048] [--tokens 16384]

`do_bench` starts each rep from an idle GPU, so for a host-bound step it measures host time.
This separates the two: the host time to issue 50 steps (no waiting on the GPU), then the GPU
time of 50 steps queued behind a sleep kernel (so the host is never what the GPU waits for).
Numbers in docs/KERNELS.md, "The dense path".
"""
import argparse
import sys
import time

from benchmarks.common import require_cuda


def host_and_gpu_us(fn, n: int = 50) -> tuple[float, float]:
    """(host us to issue one call, GPU us of one call) of fn, over n calls each."""
    import torch
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    host = (time.perf_counter() - t0) / n
    torch.cuda.synchronize()
    torch.cuda._sleep(int(2e9))  # ~1 s of GPU work first: the host queues everything
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(n):
        fn()
    end.record()
    torch.cuda.synchronize()
    return host * 1e6, start.elapsed_time(end) / n * 1e3


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.layer_host_gpu",
                                description=__doc__.splitlines()[0])
    p.add_argument("--shapes", nargs="+", default=["768x3072", "2048x2048"], help="INxOUT")
    p.add_argument("--tokens", type=int, default=16384)
    args = p.parse_args(argv)
    require_cuda("benchmarks.layer_host_gpu")
    import torch
    import torch.nn.functional as F

    from slope_megatron.sparsity import SlopeLinear

    torch.manual_seed(0)
    for shape in args.shapes:
        inn, out = map(int, shape.split("x"))
        kw = dict(bias=True, device="cuda", dtype=torch.bfloat16)
        ref = SlopeLinear(inn, out, backend="reference", **kw)
        fast = SlopeLinear(inn, out, backend="cublas", **kw)
        fast.load_state_dict(ref.state_dict())
        x = torch.randn(args.tokens, inn, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        gy = torch.randn(args.tokens, out, device="cuda", dtype=torch.bfloat16)
        w = ref.dense_weight().detach().clone().requires_grad_()
        b = ref.bias.detach().clone().requires_grad_()
        steps = {
            "plain": lambda: torch.autograd.grad(F.linear(x, w, b), (x, w, b), gy),
            "reference": lambda: torch.autograd.grad(ref(x), (x, ref.weight, ref.bias), gy),
            "cublas": lambda: torch.autograd.grad(fast(x), (x, fast.weight, fast.bias), gy),
        }
        for name, fn in steps.items():
            host, gpu = host_and_gpu_us(fn)
            print(f"{inn}x{out} T={args.tokens} {name}: host {host:.1f} us, gpu {gpu:.1f} us",
                  flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
