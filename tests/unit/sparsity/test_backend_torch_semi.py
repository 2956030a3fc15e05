"""The `torch-semi` peer backend on a CPU-only machine: the name is accepted by the config and
calls off the GPU name the reason (its checks on GPU-side inputs are in test_backend_cublas.py,
and that its CPU calls give the reference's results too)."""
import pytest
import torch

from slope_megatron.config import Config, validate
from slope_megatron.sparsity import SlopeLinear
from slope_megatron.sparsity.backends import cublas, torch_semi
from slope_megatron.sparsity.backends.cusparselt import NO_DOUBLE_PRUNING


def test_unsupported_reasons_name_the_problem():
    lay = SlopeLinear(64, 32, backend="torch-semi")
    assert "not on a CUDA device" in torch_semi.call_unsupported_reason(lay, torch.randn(2, 64))


@pytest.mark.parametrize("double_prune", [True, False])
def test_refuses_layers_without_double_pruning(monkeypatch, double_prune):
    """Without double pruning the dX operand (W*M)^T is not 2:4 along its rows, and
    `to_sparse_semi_structured` does not check: it must go to the dense path (as cusparselt),
    not give a wrong dX. The call is made one torch's path would otherwise take (a GPU that
    cublas accepts, bf16, widths multiples of 64)."""
    monkeypatch.setattr(cublas, "call_unsupported_reason", lambda layer, x: None)
    lay = SlopeLinear(128, 64, backend="torch-semi", dtype=torch.bfloat16,
                      double_prune=double_prune)
    reason = torch_semi.call_unsupported_reason(lay, torch.randn(2, 128, dtype=torch.bfloat16))
    assert reason == (None if double_prune else NO_DOUBLE_PRUNING)


def test_config_accepts_torch_semi():
    cfg = Config()
    cfg.sparsity.backend = "torch-semi"
    validate(cfg)
