"""The cusparselt backend's bookkeeping on the CPU: caches, refreshes, staleness keys, both
operand modes and the adapter inside the GEMM, against the reference backend, with a fake
cuSPARSELt runtime (tests/helpers/fake_cusparselt.py) and the real Triton kernels in the interpreter.

Why: the GPU tests run only on the device machine; this catches on every CI run the class
of bug where an operand is left stale by an optimizer write through `.data`. It cannot check the real library's layout or speed: the GPU tests do.
"""
import os
import subprocess
import sys

import pytest

from helpers.paths import ROOT
SCENARIOS = ("training_with_adapter keep=True", "lazy_resync_after_data_write keep=True",
             "training_with_adapter keep=False", "lazy_resync_after_data_write keep=False",
             "auto_with_adapter", "refused_widened_gemm",
             "chain_shares_scratch_and_survives_repointing",
             "column_mask_every_step_checks_the_layout_once keep=True",
             "column_mask_every_step_checks_the_layout_once keep=False",
             "zero3 keep=True adapter=False auto=False",
             "zero3 keep=False adapter=False auto=False",
             "zero3 keep=True adapter=True auto=False",
             "zero3 keep=False adapter=True auto=False",
             "zero3 keep=True adapter=False auto=True", "out_of_memory_is_not_a_refusal")


def test_only_cusparselt_errors_count_as_rejections():
    """What `cusparselt_adapter.augmented_linear` takes as cuSPARSELt refusing a widened
    shape (the token count then adds the adapter after the GEMM for good): an error status of
    a library call, as the binding's CSLT_CHECK words it; never an out-of-memory or another
    error (they propagate)."""
    import torch

    from slope_megatron.sparsity.backends.cusparselt_runtime import is_rejection
    call = "cuSPARSELt call cusparseLtMatmulPlanInit(h_, &plan_, &mm_, &sel_) failed: "
    assert is_rejection(RuntimeError(call + "CUSPARSE_STATUS_NOT_SUPPORTED (10): not supported"))
    assert not is_rejection(RuntimeError(call + "CUSPARSE_STATUS_ALLOC_FAILED (2): alloc"))
    assert not is_rejection(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB"))
    assert not is_rejection(torch.OutOfMemoryError(call + "CUSPARSE_STATUS_INTERNAL_ERROR"))
    assert not is_rejection(RuntimeError("B must be (32, 96), got [32, 64]"))
    assert not is_rejection(ValueError(call))


def test_cusparselt_bookkeeping_matches_reference_on_cpu():
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1",
               PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests")]))
    done = subprocess.run([sys.executable, str(ROOT / "tests" / "helpers" / "cusparselt_scenarios.py")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    passed = {line[3:] for line in done.stdout.splitlines() if line.startswith("ok ")}
    assert passed == set(SCENARIOS), done.stdout
