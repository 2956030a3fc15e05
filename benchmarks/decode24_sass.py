"""The decode kernel's machine code for a GPU, without one: instructions, registers, loads.

    python -m benchmarks.decode24_sass [--modes gather select ...] [--warps 4 8] [--arch 90]
                                       [--json FILE]

Why: which of the decode kernel's variants can stream weights at the copy bandwidth is
partly a question of how many instructions its K loop issues per byte, and that can be read
from its compiled code on any machine with Triton (which ships ptxas, nvdisasm and
cuobjdump), while GPU time is scarce. The kernel is specialized as Triton's launcher
specializes it for a layer whose sizes are multiples of 16 (pointers, N, K and the row
strides divisible by 16; one token, no split). For each mode at its base tile
(`decode24_plans.base_tile`; the dot modes with 16 rows, the others with 1, gatherT with 2)
and each metadata form (the kernel's own int32 words, `decode24_layout`, and cuSPARSELt's
int64 read in place, `decode24_cslt_meta`), it compiles the kernel for the target and
reports the SASS instruction count of the whole kernel and of its K loop (one step, per
thread; and per kept value of the tile: the loop's instructions times the threads over the
tile's kept values), its registers per thread, global loads (LDG) and shared memory. Timing
still needs a GPU (`python -m benchmarks.bench inference gemm`).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

SIGNATURE = {"x_ptr": "*bf16", "v_ptr": "*bf16", "bias_ptr": "*bf16", "y_ptr": "*bf16",
             "part_ptr": "*fp32", "lock_ptr": "*i32", "u_ptr": "*bf16", "lb_ptr": "*bf16",
             "M": "i32", "N": "i32", "K": "i32", "RANK": "i32", "lr_scale": "fp32",
             "stride_xm": "i32", "stride_vn": "i32", "stride_ym": "i32", "stride_um": "i32",
             "SPLIT_K": "i32"}
ADDRESS = re.compile(r"^\s+/\*([0-9a-f]{4,})\*/")
# the arguments Triton's launcher marks divisible by 16 for a layer whose sizes are multiples
# of 16 (every shape of the benchmarked models; pointers from torch's allocator)
DIVISIBLE = ("x_ptr", "v_ptr", "meta_ptr", "bias_ptr", "y_ptr", "part_ptr", "lock_ptr", "u_ptr",
             "lb_ptr", "N", "K", "stride_xm", "stride_vn", "stride_ym")
INSTRUCTION = re.compile(r"^\s+/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?(\S+)")  # [guard] op


def compile_variant(mode: str, cslt_meta: bool, arch: int, num_warps: int = 4) -> dict:
    """Compile one variant for sm_<arch>; its counts."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from slope_megatron.inference.decode24_plans import base_tile
    from slope_megatron.kernels.decode24_config import stage_count
    from slope_megatron.kernels.decode24_triton import _MODE_ID, _decode24_kernel
    rows = 16 if mode in ("dot", "dotT") else 2 if mode == "gatherT" else 1
    block_n, block_k = base_tile(mode, rows)
    stages = stage_count(mode)
    constants = {"BLOCK_M": rows, "BLOCK_N": block_n, "BLOCK_K": block_k,
                 "MODE": _MODE_ID[mode], "HAS_BIAS": False, "HAS_LOWRANK": False,
                 "BLOCK_R": 16, "DOT_PRECISION": "tf32", "NUM_STAGES": stages,
                 "CSLT_META": cslt_meta}
    signature = dict(SIGNATURE, meta_ptr="*i64" if cslt_meta else "*i32",
                     **{name: "constexpr" for name in constants})
    attrs = {(_decode24_kernel.arg_names.index(name),): [["tt.divisibility", 16]]
             for name in DIVISIBLE}
    kernel = triton.compile(ASTSource(fn=_decode24_kernel, signature=signature,
                                      constexprs=constants, attrs=attrs),
                            target=GPUTarget("cuda", arch, 32),
                            options={"num_warps": num_warps, "num_stages": stages})
    sass = disassemble(kernel.asm["cubin"])
    usage = nvidia_tool("cuobjdump", "-res-usage", kernel.asm["cubin"])
    ops = [m.group(1) for line in sass.splitlines() if (m := INSTRUCTION.match(line))]
    loop = longest_loop(sass)
    return {"mode": mode, "metadata": "cusparselt" if cslt_meta else "own",
            "tile": f"{rows}x{block_n}x{block_k}", "num_warps": num_warps, "stages": stages,
            "sass_instructions": len(ops), "k_loop_instructions": loop,
            "k_loop_per_kept_value": loop * num_warps * 32 / (block_n * block_k // 2),
            "registers": int(re.search(r"REG:(\d+)", usage).group(1)),
            "global_loads": sum(1 for op in ops if op.startswith("LDG")),
            "shared_bytes": kernel.metadata.shared}


def longest_loop(sass: str) -> int:
    """Instructions from the head of the longest loop (the K loop) to its backward branch:
    what one K step issues per thread (any branches inside it counted as if all taken)."""
    labels, branches, address = {}, [], None
    for line in sass.splitlines():
        if (label := re.match(r"^(\.L_x_\d+):", line)):
            labels[label.group(1)] = None  # at the next instruction
            continue
        found = ADDRESS.match(line)
        if not found:
            continue
        address = int(found.group(1), 16)
        for name, at in labels.items():
            if at is None:
                labels[name] = address
        if (target := re.search(r"BRA\s+`\((\.L_x_\d+)\)", line)):
            branches.append((address, target.group(1)))
    spans = [(at - labels[name]) // 16 + 1 for at, name in branches
             if labels.get(name) is not None and labels[name] <= at]
    return max(spans, default=0)


def disassemble(cubin: bytes) -> str:
    """SASS text of a cubin."""
    return nvidia_tool("nvdisasm", "-c", cubin)


def nvidia_tool(name: str, flag: str, cubin: bytes) -> str:
    """The output of one of the CUDA binary tools that Triton ships, run on a cubin."""
    import triton
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
    try:
        return subprocess.run([str(tool), flag, f.name], capture_output=True, text=True,
                              check=True).stdout
    finally:
        os.unlink(f.name)


def main(argv=None) -> int:
    from slope_megatron.kernels.decode24_config import MODES
    p = argparse.ArgumentParser(prog="python -m benchmarks.decode24_sass",
                                description=__doc__.splitlines()[0])
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    p.add_argument("--arch", type=int, default=90, help="compute capability x 10 (default 90)")
    p.add_argument("--warps", type=int, nargs="+", default=[4], help="num_warps (default 4)")
    p.add_argument("--json", default=None, help="write the rows here")
    args = p.parse_args(argv)
    rows = []
    print(f"{'mode':>8s} {'metadata':>10s} {'tile':>11s} {'warps':>5s} {'SASS':>6s} "
          f"{'K loop':>6s} {'/value':>6s} {'regs':>4s} {'LDG':>4s} {'smem':>6s}")
    for mode in args.modes:
        for warps in args.warps:
            for cslt_meta in (False, True):
                r = compile_variant(mode, cslt_meta, args.arch, warps)
                rows.append(r)
                print(f"{mode:>8s} {r['metadata']:>10s} {r['tile']:>11s} {warps:5d} "
                      f"{r['sass_instructions']:6d} {r['k_loop_instructions']:6d} "
                      f"{r['k_loop_per_kept_value']:6.1f} {r['registers']:4d} "
                      f"{r['global_loads']:4d} "
                      f"{r['shared_bytes']:6d}")
    if args.json:
        import triton
        Path(args.json).write_text(json.dumps({"arch": args.arch, "triton": triton.__version__,
                                               "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
