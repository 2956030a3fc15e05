"""Is this GPU at full speed? One bf16 8192^3 matmul's TFLOP/s and a 1 GiB copy's GB/s.

    python -m benchmarks.gpu_check

`python -m benchmarks.bench train` runs the same check (`benchmarks.common.gpu_speed`) before
its arms and records it in its JSON: a machine running below its usual speed shows here, not
as odd ratios afterwards. The bench-train JSONs under docs/results/ record it as `gpu_check`
for the machines they ran on.
"""
import argparse
import sys

from benchmarks.common import gpu_speed, require_cuda


def main(argv=None) -> int:
    argparse.ArgumentParser(prog="python -m benchmarks.gpu_check",
                            description=__doc__.split("\n\n")[0]).parse_args(argv)
    require_cuda("benchmarks.gpu_check")
    r = gpu_speed()
    print(f"gpu_check: {r['gpu']}: bf16 8192^3 matmul {r['matmul_tflops']:.0f} TFLOP/s, "
          f"copy {r['copy_gbps']:.0f} GB/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
