"""SlopeLinear vs an independent masked-dense formula in float64, and its invariants."""
import pytest
import torch

from slope_megatron.sparsity import SlopeLinear, after_optimizer_step, nm_mask, slope_linear


def independent_reference(x, w_dense, mask, b, n, m, dy):
    """Masks recomputed from scratch with plain topk on |w| (no project code)."""
    wm = w_dense * mask
    # double pruning: keep the n largest |.| per group of m along `out`
    out, inn = wm.shape
    g = wm.abs().t().reshape(inn, out // m, m)
    idx = g.topk(n, dim=-1).indices
    col = torch.zeros_like(g, dtype=torch.bool).scatter_(-1, idx, True).reshape(inn, out).t()
    w_rc = wm * col
    y = x @ wm.t() + (b if b is not None else 0)
    dx = dy @ w_rc
    dw = (dy.reshape(-1, out).t() @ x.reshape(-1, inn)) * mask
    db = dy.reshape(-1, out).sum(0) if b is not None else None
    return y, dx, dw, db


@pytest.mark.parametrize("n,m,inn,out,bias", [(2, 4, 32, 16, True), (1, 4, 16, 24, False),
                                              (2, 8, 64, 32, True), (1, 2, 10, 6, True)])
def test_forward_and_both_gradients_match_masked_dense(n, m, inn, out, bias):
    torch.manual_seed(n * 100 + m)
    layer = SlopeLinear(inn, out, bias=bias, n=n, m=m).double()
    with torch.no_grad():
        if bias:
            layer.bias.normal_()
    x = torch.randn(3, 5, inn, dtype=torch.float64, requires_grad=True)
    dy = torch.randn(3, 5, out, dtype=torch.float64)
    y = layer(x)
    y.backward(dy)
    w = layer.dense_weight().detach()
    mask = nm_mask(w, n, m)  # the static mask is recoverable from the kept values
    assert torch.equal(mask, layer.mask)
    ry, rdx, rdw, rdb = independent_reference(x.detach(), w, layer.mask, layer.bias, n, m, dy)
    torch.testing.assert_close(y, ry)
    torch.testing.assert_close(x.grad, rdx)
    torch.testing.assert_close(layer.weight.grad, rdw[layer.mask].view(out, -1))
    if bias:
        torch.testing.assert_close(layer.bias.grad, rdb)


def test_input_gradient_is_double_pruned_not_true_gradient():
    layer = SlopeLinear(32, 32).double()
    x = torch.randn(4, 32, dtype=torch.float64, requires_grad=True)
    layer(x).sum().backward()
    true_dx = torch.ones(4, 32, dtype=torch.float64) @ layer.dense_weight().detach()
    assert not torch.allclose(x.grad, true_dx)
    torch.testing.assert_close(x.grad, torch.ones(4, 32, dtype=torch.float64)
                               @ layer.double_pruned_weight().detach())


def test_weight_gradient_passes_gradcheck():
    layer = SlopeLinear(8, 8, n=2, m=4).double()
    x = torch.randn(3, 8, dtype=torch.float64)
    values = layer.weight.detach().clone().requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda v: slope_linear(x, v, layer.mask, None, layer.bias), (values,))


def test_mask_is_static_and_pruned_entries_stay_zero_under_training():
    torch.manual_seed(3)
    layer = SlopeLinear(16, 16, column_mask_refresh=1)
    mask0 = layer.mask.clone()
    opt = torch.optim.AdamW(layer.parameters(), lr=1e-2, weight_decay=0.1)
    col_masks = []
    for _ in range(25):
        loss = layer(torch.randn(8, 16)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        after_optimizer_step(layer)
        col_masks.append(layer.column_mask.clone())
    assert torch.equal(layer.mask, mask0)
    dense = layer.dense_weight()
    assert (dense[~layer.mask] == 0).all()
    assert (dense[layer.mask] != 0).all()
    assert layer.weight.shape == (16, 8)


def test_column_mask_refresh_schedule():
    layer = SlopeLinear(16, 16, column_mask_refresh=3)
    x = torch.randn(2, 16, requires_grad=True)
    steps_computed = []
    for step in range(7):
        before = layer.column_mask_step
        layer(x).sum().backward()
        if layer.column_mask_step != before:
            steps_computed.append(step)
        with torch.no_grad():
            layer.weight.add_(torch.randn_like(layer.weight))
        layer.after_optimizer_step()
    assert steps_computed == [0, 3, 6]


def test_no_grad_forward_skips_column_mask():
    layer = SlopeLinear(16, 16)
    with torch.no_grad():
        layer(torch.randn(2, 16))
    assert layer.column_mask_step == -1


def test_state_dict_round_trip_keeps_mask_counters_and_adapter():
    a = SlopeLinear(16, 8, adapter_rank=2)
    a(torch.randn(2, 16)).sum().backward()
    a.after_optimizer_step()
    a.enable_adapter()
    b = SlopeLinear(16, 8, adapter_rank=2)
    assert not torch.equal(a.mask, b.mask)
    b.load_state_dict(a.state_dict())
    assert torch.equal(a.mask, b.mask) and torch.equal(a.column_mask, b.column_mask)
    assert (b.optimizer_steps, b.column_mask_step, b.adapter_active) == (1, 0, True)
    x = torch.randn(3, 16)
    torch.testing.assert_close(a(x), b(x))


def test_loading_a_different_pattern_is_refused():
    a = SlopeLinear(16, 8, n=1, m=4)
    b = SlopeLinear(16, 8, n=2, m=4)
    with pytest.raises(ValueError, match="1:4 sparsity"):
        b.load_state_dict(a.state_dict())


@pytest.mark.parametrize("kw,match", [
    (dict(in_features=10, out_features=8), "in_features=10 must be divisible by m=4"),
    (dict(in_features=8, out_features=6), "out_features=6 must be divisible by m=4"),
    (dict(in_features=8, out_features=8, n=3, m=2), "1 <= n < m"),
    (dict(in_features=8, out_features=8, column_mask_refresh=0), "column_mask_refresh"),
])
def test_constructor_rejects_bad_arguments(kw, match):
    with pytest.raises(ValueError, match=match):
        SlopeLinear(**kw)


def test_weight_key_changes_with_an_optimizer_step_even_for_data_writes():
    """The cusparselt cache identifies weight values by storage, version counter and the
    layer's optimizer-step count: a write through `.data` (DeepSpeed's bf16 optimizer) leaves
    the version counter alone, the step count does not."""
    from slope_megatron.sparsity.backends.cusparselt_cache import weight_key
    layer = SlopeLinear(32, 16)
    before = weight_key(layer)
    layer.weight.data.copy_(torch.randn_like(layer.weight))
    assert weight_key(layer) == before  # invisible to the version counter alone
    layer.after_optimizer_step()
    assert weight_key(layer) != before
    with torch.no_grad():
        layer.weight.add_(1.0)  # an in-place update through the parameter is seen at once
    assert weight_key(layer)[1] != before[1]
