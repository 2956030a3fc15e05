"""The `torch-semi` peer backend on a CPU-only machine: it never runs without CUDA, so calls go
to the dense path and give the reference's results; the names and reasons are right."""
import pytest
import torch

from slope_megatron.config import Config, validate
from slope_megatron.sparsity import SlopeLinear
from slope_megatron.sparsity.backends import get_backend, torch_semi

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only behaviour")


@no_cuda
def test_torch_semi_on_cpu_computes_the_reference():
    lay = SlopeLinear(64, 32, backend="torch-semi")
    ref = SlopeLinear(64, 32, backend="reference")
    ref.load_state_dict(lay.state_dict())
    x = torch.randn(4, 64, requires_grad=True)
    xr = x.detach().clone().requires_grad_()
    y, yr = lay(x), ref(xr)
    y.sum().backward()
    yr.sum().backward()
    assert lay.backend is get_backend("torch-semi") and torch.equal(y, yr)
    assert torch.equal(x.grad, xr.grad) and torch.equal(lay.weight.grad, ref.weight.grad)


def test_unsupported_reasons_name_the_problem():
    lay = SlopeLinear(64, 32, backend="torch-semi")
    assert "not on a CUDA device" in torch_semi.call_unsupported_reason(lay, torch.randn(2, 64))


def test_config_accepts_torch_semi():
    cfg = Config()
    cfg.sparsity.backend = "torch-semi"
    validate(cfg)
