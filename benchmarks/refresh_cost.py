"""What one refresh of the double-pruned column mask costs a bf16 layer on a GPU.

    python -m benchmarks.refresh_cost [--shapes 2048x8192 8192x2048 2048x2048] [--tokens 16384]

For each layer shape (cusparselt backend, operands kept) it times, with CUDA events after a
warm-up, back-to-back calls (`benchmarks.common.loop_ms`: per call, median of 9 loops) of:
  mask     `refresh_column_mask()` alone: the new M_R * M_C from the current weights
  rebuild  the next training step's extra work: a refresh and the layer step after it (W_RC^T
           rebuilt: tag matrix, cuSPARSELt compress, gather), minus mask and a plain step
and does so twice: through the Triton kernels (kernels/double_prune_triton.py) and through the
torch path (`SLOPE_TRITON_DOUBLE_PRUNE=0`). Also the layer step itself, for scale. With
`sparsity.column_mask_refresh: 1` every sparse layer pays mask + rebuild at every step.
Numbers in docs/RESULTS.md ("Quality: the double-pruned column mask refreshed every step").
"""
import argparse
import json
import os
import sys
from pathlib import Path

from benchmarks.common import loop_ms, require_cuda, run_environment


def measure(inn: int, out: int, tokens: int, kernels: bool) -> dict:
    import torch

    from slope_megatron.sparsity import SlopeLinear

    os.environ["SLOPE_TRITON_DOUBLE_PRUNE"] = "1" if kernels else "0"
    torch.manual_seed(0)
    layer = SlopeLinear(inn, out, bias=True, backend="cusparselt", device="cuda",
                        dtype=torch.bfloat16, column_mask_refresh=10 ** 9)
    x = torch.randn(tokens, inn, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    gy = torch.randn(tokens, out, device="cuda", dtype=torch.bfloat16)

    def step():
        layer(x).backward(gy)

    for _ in range(3):  # algorithm search, native step, first W^T build and its check
        step()
        layer.refresh_column_mask()
        step()
    plain = loop_ms(step)
    mask = loop_ms(layer.refresh_column_mask)  # the same work whether or not it changes
    after = loop_ms(lambda: (layer.refresh_column_mask(), step()))
    return {"shape": f"{inn}x{out}", "tokens": tokens, "kernels": kernels, "step_ms": plain,
            "mask_ms": mask, "rebuild_ms": after - mask - plain, "refresh_ms": after - plain}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.refresh_cost",
                                description=__doc__.splitlines()[0])
    p.add_argument("--shapes", nargs="+", default=["2048x8192", "8192x2048", "2048x2048"],
                   help="INxOUT")
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--json", default=None, help="write the rows here")
    args = p.parse_args(argv)
    require_cuda("benchmarks.refresh_cost")
    rows = []
    print(f"{'shape':>10s} {'path':>7s} {'step ms':>8s} {'mask ms':>8s} {'rebuild ms':>11s} "
          f"{'refresh ms':>11s}")
    for shape in args.shapes:
        inn, out = map(int, shape.split("x"))
        for kernels in (False, True):
            r = measure(inn, out, args.tokens, kernels)
            rows.append(r)
            print(f"{shape:>10s} {'triton' if kernels else 'torch':>7s} {r['step_ms']:8.3f} "
                  f"{r['mask_ms']:8.3f} {r['rebuild_ms']:11.3f} {r['refresh_ms']:11.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"environment": run_environment(),
                                               "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
