"""The GPU-only measurement scripts say so in one line on a machine without CUDA, instead of a
traceback from deep inside torch."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers.paths import ROOT
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only behaviour")
@pytest.mark.parametrize("script", ["gpu_check.py", "layer_host_gpu.py",
                                    "bench_reference_step.py", "bench_torchao.py",
                                    "auto_timing_spread.py", "refresh_cost.py"])
def test_gpu_script_refuses_cleanly_without_cuda(script):
    done = subprocess.run([sys.executable, str(ROOT / "launch" / script)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    assert done.stderr.strip().splitlines()[-1] == f"error: {script} needs a CUDA GPU"


def test_auto_timing_spread_refuses_a_bad_shape_before_any_work():
    done = subprocess.run([sys.executable, str(ROOT / "launch" / "auto_timing_spread.py"),
                           "--shapes", "2048"], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 2
    assert "--shapes takes IN x OUT pairs such as 2048x8192" in done.stderr


# bench.py run as a script, with `import triton` failing as on a CPU machine without it
WITHOUT_TRITON = ("import runpy, sys; sys.modules['triton'] = None; "
                  "sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only behaviour")
@pytest.mark.parametrize("triton", [True, False], ids=["with-triton", "without-triton"])
@pytest.mark.parametrize("what,extra", [("kernels", ["--adapters-only"]), ("inference", [])])
def test_bench_gpu_subcommands_refuse_cleanly_without_cuda(what, extra, triton):
    """One `error:` line on stderr, exit 2, whether or not triton is installed (it used to be
    imported before the CUDA check: an ImportError traceback without it)."""
    script = [str(ROOT / "launch" / "bench.py"), what, *extra]
    cmd = [sys.executable, *script] if triton else [sys.executable, "-c", WITHOUT_TRITON,
                                                    *script]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stdout == "" and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines() == [f"error: `bench.py {what}` needs a CUDA GPU"]


@pytest.mark.parametrize("argv,says", [
    (["kernels", "--tokens", "1024", "0"], "error: --tokens takes token counts of at least 1, "
                                           "got 0"),
    (["inference", "--layers", "1"], "error: --layers must be at least 2 (per-block time is a "
                                     "difference), got 1"),
    (["inference", "--prefill", "-5"], "error: --prefill takes values of at least 1, got -5"),
    (["inference", "--context", "-1"], "error: --context must be at least 0, got -1"),
    (["inference", "--ranks", "0"], "error: --ranks takes rank ratios in (0, 1], got 0"),
])
def test_bench_gpu_subcommands_check_arguments_before_the_gpu(argv, says):
    done = subprocess.run([sys.executable, "-c", WITHOUT_TRITON,
                           str(ROOT / "launch" / "bench.py"), *argv], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.strip().splitlines() == [says]


def test_bench_kernels_adapter_flags_exclude_each_other():
    done = subprocess.run([sys.executable, str(ROOT / "launch" / "bench.py"), "kernels",
                           "--adapters-only", "--no-adapters"], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 2
    assert "not allowed with argument" in done.stderr
