"""The `torch-semi` peer backend on a GPU: PyTorch's 2:4 path computes the reference's results
(bf16 tolerance) over optimizer steps, and widths it cannot take go to the dense path."""
import pytest
import torch

from slope_megatron.sparsity import SlopeLinear

pytestmark = pytest.mark.gpu


def rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("inn,out,bias,shape", [
    (768, 3072, True, (4, 256, 768)),
    (2048, 2048, False, (1024, 2048)),
    (96, 128, True, (64, 96)),  # 96 is not a multiple of 64: dense path, exact
])
def test_torch_semi_matches_reference(inn, out, bias, shape):
    torch.manual_seed(0)
    kw = dict(bias=bias, column_mask_refresh=2, device="cuda", dtype=torch.bfloat16)
    lay = SlopeLinear(inn, out, backend="torch-semi", **kw)
    ref = SlopeLinear(inn, out, backend="reference", **kw)
    ref.load_state_dict(lay.state_dict())
    for step in range(3):
        x = torch.randn(*shape, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        xr = x.detach().clone().requires_grad_()
        y, yr = lay(x), ref(xr)
        dy = torch.randn_like(yr)
        y.backward(dy)
        yr.backward(dy)
        pairs = [(y, yr), (x.grad, xr.grad), (lay.weight.grad, ref.weight.grad)]
        if bias:
            pairs.append((lay.bias.grad, ref.bias.grad))
        for a, b in pairs:
            assert rel_err(a, b) < 1e-2, (step, rel_err(a, b))
        with torch.no_grad():
            for pa, pb in zip(lay.parameters(), ref.parameters()):
                upd = pb.grad.float().sign().to(pb.dtype) * 0.05
                pa.sub_(upd)
                pb.sub_(upd)
                pa.grad = pb.grad = None
        lay.after_optimizer_step()
        ref.after_optimizer_step()
