"""The native layer step's selection logic, on the CPU (its kernels run in tests/gpu/).

What runs the C++ step and what stays on the Python autograd functions must be decided before
any CUDA is touched, and switched off cleanly: these are checked here without a GPU.
"""
import os
from types import SimpleNamespace

import pytest
import torch

from slope_megatron.sparsity.backends import native


@pytest.fixture
def fresh_native():
    native.native_ops.cache_clear()
    yield native
    native.native_ops.cache_clear()


def test_native_off_by_environment(fresh_native, monkeypatch, caplog):
    monkeypatch.setenv("SLOPE_NATIVE_STEP", "0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # would otherwise try to build
    with caplog.at_level("INFO"):
        assert fresh_native.native_ops() is None
    assert "SLOPE_NATIVE_STEP=0" in caplog.text


def test_native_needs_cuda(fresh_native, monkeypatch):
    """Without CUDA nothing is even built (a build attempt would fail the test)."""
    import slope_megatron.kernels.cslt_loader as loader
    monkeypatch.delenv("SLOPE_NATIVE_STEP", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(loader, "load_extension", lambda: pytest.fail("built without CUDA"))
    assert fresh_native.native_ops() is None


def test_native_build_failure_is_logged_and_python_runs(fresh_native, monkeypatch, caplog):
    import slope_megatron.kernels.cslt_loader as loader
    monkeypatch.delenv("SLOPE_NATIVE_STEP", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)

    def fail():
        raise loader.CusparseltUnavailable("no compiler here")
    monkeypatch.setattr(loader, "load_extension", fail)
    assert fresh_native.native_ops() is None
    assert "native layer step unavailable" in caplog.text and "no compiler here" in caplog.text


@pytest.mark.parametrize("dtype,inn,ok", [
    (torch.bfloat16, 768, True), (torch.float16, 64, True),
    (torch.float32, 768, False),  # the CUDA kernels move 16-bit values
    (torch.bfloat16, 12, False),  # rows of whole mask bytes only
])
def test_native_takes(dtype, inn, ok):
    layer = SimpleNamespace(in_features=inn)
    assert native.native_takes(layer, torch.empty(2, inn, dtype=dtype)) is ok


def test_native_sources_are_built_and_packaged():
    import slope_megatron.kernels.cslt_loader as loader
    for src in loader._SOURCES:
        assert os.path.isfile(src), src
    names = {os.path.basename(s) for s in loader._SOURCES}
    assert {"cslt_binding.cpp", "slope_step.cpp", "nm_ops.cpp", "nm_cuda.cu"} <= names
    kernel_dir = os.path.dirname(loader.__file__)
    for header in ("cslt_plan.h", "slope_step.h", "nm_cuda.h", "check_text.h"):
        assert os.path.isfile(os.path.join(kernel_dir, header)), header


def test_cpu_calls_never_reach_the_native_step(monkeypatch):
    """A CPU layer on the cublas backend runs the reference without asking for the extension."""
    from slope_megatron.sparsity import SlopeLinear
    from slope_megatron.sparsity.backends import cublas
    monkeypatch.setattr(cublas, "native_ops", lambda: pytest.fail("native asked on CPU"))
    lay = SlopeLinear(16, 8, backend="cublas")
    assert lay(torch.randn(4, 16)).shape == (4, 8)
