"""The `cublas` backend (dense GEMMs on Triton-built operands) on a CPU-only machine.

Its kernels need a GPU, but Triton's CPU interpreter runs them on CPU tensors, so the whole
autograd function is compared here with the reference, in fp32, bit for bit (the GEMMs are
the reference's own torch calls on the same operands): forward, dX with the double-pruned
operand, dW at the mask, db, 3-D input, with and without double pruning. Also: `cublas` and
`torch-semi` layers on CPU tensors compute the reference result, the scatter kernel against
`masked_scatter` on odd shapes, and the config accepts the name.
"""
from types import SimpleNamespace

import pytest
import torch
from helpers.interpreter import run_interpreted

from slope_megatron.config import Config, validate
from slope_megatron.sparsity import SlopeLinear
from slope_megatron.sparsity.backends import get_backend, resolve_auto
from slope_megatron.sparsity.backends import cublas
no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only behaviour")


def test_scatter_kernel_matches_masked_scatter_in_interpreter():
    pytest.importorskip("triton")
    run_interpreted(r'''
import torch
from slope_megatron.kernels.nm_triton import scatter_kept_2to4
from slope_megatron.sparsity.masks import nm_mask, double_prune_mask, pack_bits
from slope_megatron.sparsity.functional import dense_from_values
torch.manual_seed(0)
for o, i in [(64, 96), (8, 12), (4, 2052)]:  # rows of 1.5 bytes; more groups than a block
    w = torch.randn(o, i); m = nm_mask(w); vals = w[m].view(o, -1).contiguous()
    dense = dense_from_values(vals, m)
    assert torch.equal(scatter_kept_2to4(vals, pack_bits(m)), dense)
    prod = double_prune_mask(dense, 2, 4, row_mask=m)
    assert torch.equal(scatter_kept_2to4(vals, pack_bits(m), pack_bits(prod)), dense * prod)
    out = torch.full((o, i), float("nan"))
    scatter_kept_2to4(vals, pack_bits(m), out=out)
    assert torch.equal(out, dense)  # every entry written, zeros included
print("ok")
''')


def test_cublas_function_equals_reference_in_interpreter():
    pytest.importorskip("triton")
    run_interpreted(r'''
import torch
from slope_megatron.sparsity import SlopeLinear
from slope_megatron.sparsity.backends.cublas import CublasSlopeLinearFunction
torch.manual_seed(0)
for bias, double_prune, shape in [(True, True, (3, 5, 64)), (False, True, (16, 64)),
                                  (True, False, (7, 64))]:
    ref = SlopeLinear(64, 32, bias=bias, double_prune=double_prune, column_mask_refresh=1)
    if bias:
        torch.nn.init.normal_(ref.bias)
    for step in range(2):  # the column mask is recomputed at each step
        x = torch.randn(*shape, requires_grad=True)
        xc = x.detach().clone().requires_grad_()
        y = ref(x)
        dy = torch.randn_like(y)
        y.backward(dy)
        grads = [x.grad, ref.weight.grad] + ([ref.bias.grad] if bias else [])
        params = [xc, ref.weight] + ([ref.bias] if bias else [])
        yc = CublasSlopeLinearFunction.apply(xc, ref.weight, ref.bias, ref.mask_bits,
                                             ref.column_mask_bits)
        mine = torch.autograd.grad(yc, params, dy)
        assert torch.equal(yc, y), (bias, double_prune, step)
        for a, b in zip(mine, grads):
            assert torch.equal(a, b), (bias, double_prune, step)
        with torch.no_grad():
            ref.weight.sub_(0.1 * ref.weight.grad.sign())
        ref.zero_grad(set_to_none=True)
        ref.after_optimizer_step()
print("ok")
''')



def test_static_layer_after_a_load_gives_the_reference_dx_in_interpreter():
    """double_prune=False: after loading a double-pruned layer's state dict, or a state dict
    without `column_mask` (strict=False), the cublas backend (which reads `column_mask_bits`
    for dX) gives the reference's dX = dY (W*M), bit for bit."""
    pytest.importorskip("triton")
    run_interpreted(r"""
import torch
from slope_megatron.sparsity import SlopeLinear
from slope_megatron.sparsity.backends import cublas
cublas.call_unsupported_reason = lambda layer, x: None  # take CPU tensors (interpreter)
torch.manual_seed(0)
src = SlopeLinear(64, 32, column_mask_refresh=1)
src(torch.randn(4, 64, requires_grad=True)).sum().backward()  # a double-pruned column mask
for strict in (True, False):
    torch.manual_seed(1)
    fast = SlopeLinear(64, 32, double_prune=False, backend="cublas")
    ref = SlopeLinear(64, 32, double_prune=False, backend="reference")
    state = src.state_dict()
    if not strict:
        del state["column_mask"]
    fast.load_state_dict(state, strict=strict)
    ref.load_state_dict(state, strict=strict)
    x = torch.randn(3, 5, 64)
    dy = torch.randn(3, 5, 32)
    grads = []
    for layer in (fast, ref):
        xg = x.clone().requires_grad_(True)
        y = layer(xg)
        y.backward(dy)
        grads.append((y.detach(), xg.grad, layer.weight.grad))
    assert fast._unpacked == {}, "the cublas path did not run"
    for a, b in zip(*grads):
        assert torch.equal(a, b), strict
    want = dy @ ref.dense_weight().detach()
    torch.testing.assert_close(grads[0][1], want)
print("ok")
""")

@no_cuda
@pytest.mark.parametrize("name", ["cublas", "torch-semi"])
def test_layer_on_cpu_runs_the_reference(name):
    assert cublas.unavailable_reason() == "CUDA is not available"
    lay = SlopeLinear(64, 32, backend=name)
    ref = SlopeLinear(64, 32, backend="reference")
    ref.load_state_dict(lay.state_dict())
    x = torch.randn(4, 64, requires_grad=True)
    xr = x.detach().clone().requires_grad_()
    y, yr = lay(x), ref(xr)
    y.sum().backward()
    yr.sum().backward()
    assert lay.backend is get_backend(name) and torch.equal(y, yr)
    assert torch.equal(x.grad, xr.grad) and torch.equal(lay.weight.grad, ref.weight.grad)


def fake_call(n=2, m=4, dtype=torch.bfloat16, x_dtype=None, inn=128, out=64):
    """A layer and input that claim to live on a GPU, to reach the checks after that one."""
    weight = SimpleNamespace(is_cuda=True, dtype=dtype)
    layer = SimpleNamespace(n=n, m=m, weight=weight, in_features=inn, out_features=out)
    return layer, SimpleNamespace(is_cuda=True, dtype=x_dtype or dtype)


def test_call_reasons_name_the_problem(monkeypatch):
    lay = SlopeLinear(64, 32, backend="cublas")
    assert "not on a CUDA device" in cublas.call_unsupported_reason(lay, torch.randn(2, 64))
    monkeypatch.setattr(cublas, "unavailable_reason", lambda: None)
    assert cublas.call_unsupported_reason(*fake_call()) is None
    assert "sparsity 1:4" in cublas.call_unsupported_reason(*fake_call(n=1))
    assert "input dtype torch.float32 differs" in cublas.call_unsupported_reason(
        *fake_call(x_dtype=torch.float32))
    monkeypatch.setattr(cublas, "unavailable_reason", lambda: "no compiler")
    assert cublas.call_unsupported_reason(*fake_call()) == "no compiler"


def test_torch_semi_reasons_name_the_problem(monkeypatch):
    from slope_megatron.sparsity.backends import torch_semi
    monkeypatch.setattr(cublas, "unavailable_reason", lambda: None)
    assert torch_semi.call_unsupported_reason(*fake_call()) is None
    assert "takes bf16 and fp16" in torch_semi.call_unsupported_reason(
        *fake_call(dtype=torch.float32))
    assert "in_features=96 is not a multiple of 64" in torch_semi.call_unsupported_reason(
        *fake_call(inn=96))


@no_cuda
def test_auto_without_cuda_stays_reference():
    assert resolve_auto() == "reference"


def test_auto_is_cublas_where_only_triton_can_run(monkeypatch):
    from slope_megatron.sparsity import backends
    monkeypatch.setattr(backends, "cusparselt_unavailable_reason", lambda: "compute 7.5")
    monkeypatch.setattr(cublas, "unavailable_reason", lambda: None)
    assert resolve_auto() == "cublas"


def test_config_accepts_cublas():
    cfg = Config()
    cfg.sparsity.backend = "cublas"
    validate(cfg)


def test_a_fallback_on_the_gpu_is_logged_once(monkeypatch, caplog):
    """A CUDA call cublas cannot take says why, once per (shape, reason)."""
    import logging
    from slope_megatron.sparsity.backends import base
    be = get_backend("cublas")
    monkeypatch.setattr(be, "unsupported_reason", lambda layer, x: "no compiler")
    monkeypatch.setattr(be, "fallback", lambda layer, x: "ran the reference")
    layer, x = fake_call()
    base.LOGGED_FALLBACKS.clear()
    with caplog.at_level(logging.WARNING):
        assert be.linear(layer, x) == "ran the reference"
        be.linear(layer, x)
    lines = [r.getMessage() for r in caplog.records if "falls back" in r.getMessage()]
    assert lines == ["cublas backend: SlopeLinear(out=64, in=128) falls back to the reference "
                     "backend: no compiler"]
