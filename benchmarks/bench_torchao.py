"""The torchao peer: torchao's `SemiSparseLinear` (runtime 2:4 pruning every forward) against
`nn.Linear`, one bf16 layer step (forward + backward) per shape on one GPU.

    python -m benchmarks.bench_torchao [--json docs/results/torchao_peer.json]

torchao's runtime-pruning training is a different method from SLoPe (the mask is recomputed
from the dense weight at every call, which stays dense in memory), so this compares its layer
step with a dense step in the same process; the same shapes' SLoPe steps are in
docs/KERNELS.md. Errors (e.g. a GPU architecture torchao refuses) are recorded per shape, not
raised. torchao is not a dependency: install it to run this.
"""
import argparse
import json
import sys
from pathlib import Path

from benchmarks.common import bench_ms, require_cuda
from slope_megatron.errors import EXIT_USER_ERROR

SHAPES = [(768, 3072, 16384), (2048, 8192, 16384), (8192, 2048, 16384), (4096, 11008, 8192)]


def step_ms(layer, x, gy) -> float:
    import torch
    params = [p for p in layer.parameters()]

    def step():
        torch.autograd.grad(layer(x), [x, *params], gy)
    return bench_ms(step, warmup=20, rep=100)


def bench_shape(inn: int, out: int, tokens: int) -> dict:
    import torch
    from torchao.sparsity.training import SemiSparseLinear
    dense = torch.nn.Linear(inn, out, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(tokens, inn, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    gy = torch.randn(tokens, out, device="cuda", dtype=torch.bfloat16)
    row = {"in": inn, "out": out, "tokens": tokens, "dense_step_ms": step_ms(dense, x, gy)}
    try:
        sparse = SemiSparseLinear.from_dense(dense)
        y = sparse(x)
        ref = torch.nn.functional.linear(x, dense.weight, dense.bias)
        row["rel_diff_vs_dense"] = ((y.float() - ref.float()).norm() / ref.float().norm()).item()
        row["torchao_step_ms"] = step_ms(sparse, x, gy)
        row["torchao_vs_dense"] = row["dense_step_ms"] / row["torchao_step_ms"]
    except Exception as e:  # record, do not abort: refusing sm90 is a result
        row["error"] = f"{type(e).__name__}: {e}"[:400]
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_torchao",
                                description=__doc__.splitlines()[0])
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    require_cuda("benchmarks.bench_torchao")  # before triton: a CPU machine may not have it
    import torch
    try:
        import torchao
    except ImportError as e:
        print(f"error: torchao is not installed ({e}); `pip install torchao`", file=sys.stderr)
        return EXIT_USER_ERROR
    rows = []
    for inn, out, tokens in SHAPES:
        row = bench_shape(inn, out, tokens)
        rows.append(row)
        what = (f"error {row['error']}" if "error" in row else
                f"torchao {row['torchao_step_ms']:.3f} ms = {row['torchao_vs_dense']:.2f}x dense")
        print(f"{inn}x{out} T={tokens}: dense step {row['dense_step_ms']:.3f} ms, {what}",
              flush=True)
    if args.json:
        meta = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
                "torchao": torchao.__version__}
        Path(args.json).write_text(json.dumps({"meta": meta, "results": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
