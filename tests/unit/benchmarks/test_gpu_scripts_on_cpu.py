"""The GPU-only measurement tools say so in one line on a machine without CUDA, instead of a
traceback from deep inside torch or triton, whether or not triton is installed."""
import subprocess
import sys

import pytest
import torch

from helpers.paths import ROOT

# a tool run as `python -m benchmarks.<tool>`, with `import triton` failing as on a CPU machine
# without it
WITHOUT_TRITON = ("import runpy, sys; sys.modules['triton'] = None; "
                  "sys.argv = sys.argv[1:]; "
                  "runpy.run_module(sys.argv[0], run_name='__main__', alter_sys=True)")

# (module, arguments, the tool's name in its message): every tool that needs CUDA
CUDA_TOOLS = [
    ("benchmarks.gpu_check", [], "benchmarks.gpu_check"),
    ("benchmarks.layer_host_gpu", [], "benchmarks.layer_host_gpu"),
    ("benchmarks.bench_reference_step", [], "benchmarks.bench_reference_step"),
    ("benchmarks.bench_torchao", [], "benchmarks.bench_torchao"),
    ("benchmarks.auto_timing_spread", [], "benchmarks.auto_timing_spread"),
    ("benchmarks.refresh_cost", [], "benchmarks.refresh_cost"),
    ("benchmarks.cslt_meta_probe", [], "benchmarks.cslt_meta_probe"),
    ("benchmarks.host_overhead", [], "benchmarks.host_overhead"),
    ("benchmarks.profile_step", ["--arms", "dense"], "benchmarks.profile_step"),
    ("benchmarks.bench", ["kernels", "--adapters-only"], "`bench kernels`"),
    ("benchmarks.bench", ["inference", "blocks"], "`bench inference blocks`"),
    ("benchmarks.bench", ["inference", "gemm"], "`bench inference gemm`"),
    ("benchmarks.bench", ["inference", "generate"], "`bench inference generate`"),
]


def run_tool(module, argv, triton=True):
    """`python -m module argv` from the checkout root (with triton unimportable unless
    `triton`)."""
    cmd = ([sys.executable, "-m", module, *argv] if triton else
           [sys.executable, "-c", WITHOUT_TRITON, module, *argv])
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only behaviour")
@pytest.mark.parametrize("triton", [True, False], ids=["with-triton", "without-triton"])
@pytest.mark.parametrize("module,argv,tool", CUDA_TOOLS,
                         ids=[f"{m.split('.')[1]}{'-' + '-'.join(a[:2]) if a and m.endswith('bench') else ''}"
                              for m, a, _ in CUDA_TOOLS])
def test_gpu_script_refuses_cleanly_without_cuda(module, argv, tool, triton):
    """One `error:` line on stderr, exit 2, no traceback, whether or not triton is installed
    (a tool that imports it before the CUDA check fails with an ImportError without it)."""
    done = run_tool(module, argv, triton)
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stdout == "" and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines() == [f"error: {tool} needs a CUDA GPU"]


def test_the_cuda_check_runs_without_triton_importable():
    """`benchmarks.common.require_cuda` needs torch only, so every tool can call it first."""
    code = ("import sys; sys.modules['triton'] = None\n"
            "from benchmarks.common import require_cuda\n"
            "require_cuda('a tool')\n"
            "print('ok')")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    if torch.cuda.is_available():
        assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr
    else:
        assert done.returncode == 2 and done.stdout == ""
        assert done.stderr.strip().splitlines() == ["error: a tool needs a CUDA GPU"]


def test_auto_timing_spread_refuses_a_bad_shape_before_any_work():
    done = run_tool("benchmarks.auto_timing_spread", ["--shapes", "2048"])
    assert done.returncode == 2
    assert "--shapes takes IN x OUT pairs such as 2048x8192" in done.stderr


def test_cslt_meta_probe_refuses_a_bad_shape_before_any_work():
    done = run_tool("benchmarks.cslt_meta_probe", ["--shapes", "4096"])
    assert done.returncode == 2
    assert "'4096' is not OUTxIN (e.g. 4096x11008)" in done.stderr


@pytest.mark.parametrize("argv,says", [
    (["kernels", "--tokens", "1024", "0"], "error: --tokens takes token counts of at least 1, "
                                           "got 0"),
    (["inference", "blocks", "--layers", "1"],
     "error: --layers must be at least 2 (per-block time is a difference), got 1"),
    (["inference", "blocks", "--prefill", "-5"],
     "error: --prefill takes values of at least 1, got -5"),
    (["inference", "blocks", "--context", "-1"], "error: --context must be at least 0, got -1"),
    (["inference", "blocks", "--ranks", "0"],
     "error: --ranks takes rank ratios in (0, 1], got 0"),
    (["inference", "gemm", "--tokens", "65"], "error: --tokens takes token counts in 1..64, got 65"),
    (["inference", "gemm", "--save-configs", "c.json"],
     "error: --save-configs writes what --tune found: add --tune (or drop --save-configs)"),
    (["inference", "generate", "--batches", "0"],
     "error: --batches and --prefill take values >= 1, got 0"),
])
def test_bench_gpu_subcommands_check_arguments_before_the_gpu(argv, says):
    done = run_tool("benchmarks.bench", argv, triton=False)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.strip().splitlines() == [says]


def test_bench_kernels_adapter_flags_exclude_each_other():
    done = run_tool("benchmarks.bench", ["kernels", "--adapters-only", "--no-adapters"])
    assert done.returncode == 2
    assert "not allowed with argument" in done.stderr
