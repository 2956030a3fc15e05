"""The `torch-semi` peer backend on a CPU-only machine: the name is accepted by the config and
calls off the GPU name the reason (its checks on GPU-side inputs are in test_backend_cublas.py,
and that its CPU calls give the reference's results too)."""
import torch

from slope_megatron.config import Config, validate
from slope_megatron.sparsity import SlopeLinear
from slope_megatron.sparsity.backends import torch_semi


def test_unsupported_reasons_name_the_problem():
    lay = SlopeLinear(64, 32, backend="torch-semi")
    assert "not on a CUDA device" in torch_semi.call_unsupported_reason(lay, torch.randn(2, 64))


def test_config_accepts_torch_semi():
    cfg = Config()
    cfg.sparsity.backend = "torch-semi"
    validate(cfg)
