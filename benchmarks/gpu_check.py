"""Is this GPU at full speed? One bf16 8192^3 matmul's TFLOP/s and a 1 GiB copy's GB/s.

    python launch/gpu_check.py

`launch/bench.py train` runs it before its arms and records the result in its JSON. One H100
machine of a session ran dense 1.3B training at 42% of its usual speed (docs/RESULTS.md, "By
model size"); healthy H100 80GB HBM3 machines gave 700-800 TFLOP/s and 3.0 TB/s here.
"""
import torch


def measure() -> dict:
    """{'gpu', 'matmul_tflops', 'copy_gbps'} of the current CUDA device (a few seconds)."""
    from triton.testing import do_bench
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    mm_ms = do_bench(lambda: a @ b, warmup=50, rep=300, return_mode="median")
    x = torch.empty(2 ** 29, device="cuda", dtype=torch.bfloat16)
    y = torch.empty_like(x)
    copy_ms = do_bench(lambda: y.copy_(x), warmup=20, rep=100, return_mode="median")
    return {"gpu": torch.cuda.get_device_name(),
            "matmul_tflops": round(2 * 8192 ** 3 / mm_ms / 1e9, 1),
            "copy_gbps": round(2 * x.numel() * 2 / copy_ms / 1e6, 1)}


def main() -> None:
    if not torch.cuda.is_available():
        raise SystemExit("error: gpu_check.py needs a CUDA GPU")
    r = measure()
    print(f"gpu_check: {r['gpu']}: bf16 8192^3 matmul {r['matmul_tflops']:.0f} TFLOP/s, "
          f"copy {r['copy_gbps']:.0f} GB/s")


if __name__ == "__main__":
    main()
