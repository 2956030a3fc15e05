"""The GPU-only measurement scripts say so in one line on a machine without CUDA, instead of a
traceback from deep inside torch."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


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


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only behaviour")
def test_bench_kernels_refuses_cleanly_without_cuda():
    done = subprocess.run([sys.executable, str(ROOT / "launch" / "bench.py"), "kernels",
                           "--adapters-only"], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 2
    assert done.stdout.strip().splitlines()[-1] == "bench kernels needs a CUDA GPU"


def test_bench_kernels_adapter_flags_exclude_each_other():
    done = subprocess.run([sys.executable, str(ROOT / "launch" / "bench.py"), "kernels",
                           "--adapters-only", "--no-adapters"], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 2
    assert "not allowed with argument" in done.stderr
