"""Lazy low-rank adapters: free before the switch, output unchanged at it, trained after."""
import pytest
import torch

from slope_megatron.sparsity import SlopeLinear, adapter_rank, enable_adapters


def test_rank_from_fraction_or_absolute():
    assert adapter_rank(768, 0.02) == 15
    assert adapter_rank(64, 0.02) == 1
    assert adapter_rank(768, 0.02, rank=8) == 8
    with pytest.raises(ValueError, match="rank_ratio"):
        adapter_rank(768, 0.0)


def test_inactive_adapter_costs_nothing_and_gets_no_gradient():
    layer = SlopeLinear(32, 16, adapter_rank=4)
    layer(torch.randn(3, 32)).sum().backward()
    assert layer.adapter_a.grad is None and layer.adapter_b.grad is None


def test_switch_leaves_output_unchanged_then_adapter_and_weights_train():
    torch.manual_seed(0)
    layer = SlopeLinear(32, 16, adapter_rank=4)
    x = torch.randn(6, 32)
    before = layer(x).detach()
    assert enable_adapters(layer) == 1
    torch.testing.assert_close(layer(x), before)
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    target = torch.randn(6, 16)
    (layer(x) - target).pow(2).mean().backward()
    assert layer.adapter_b.grad.abs().sum() > 0
    assert layer.weight.grad.abs().sum() > 0
    w0, b0 = layer.weight.detach().clone(), layer.adapter_b.detach().clone()
    opt.step()
    assert not torch.equal(layer.weight, w0) and not torch.equal(layer.adapter_b, b0)
    # formula: Y = X (W*M)^T + b + (X A) B / r
    expected = x @ layer.dense_weight().t() + layer.bias \
        + (x @ layer.adapter_a) @ layer.adapter_b / 4
    torch.testing.assert_close(layer(x), expected)


def test_enable_without_rank_on_layer_without_adapter_errors():
    layer = SlopeLinear(8, 8)
    with pytest.raises(ValueError, match="needs a rank"):
        layer.enable_adapter()
    layer.enable_adapter(rank=2)
    assert layer.adapter_active and layer.adapter_a.shape == (8, 2)
