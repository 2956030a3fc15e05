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


def test_adapter_group_learning_rate_follows_the_switch_and_lr_scale():
    """Before the switch the adapter group's lr is 0; after it, the scheduled lr times
    adapters.lr_scale (also after a resume, through mark_adapters_active)."""
    from slope_megatron.config import load_config
    from slope_megatron.model import GPTModel
    from slope_megatron.training.optimizer import (adapter_group, build_optimizer,
                                                   mark_adapters_active, set_lr,
                                                   switch_on_adapters)

    cfg = load_config(None, ["model.vocab_size=64", "model.hidden_size=32", "model.num_heads=4",
                             "model.num_layers=1", "model.seq_len=16", "adapters.lr_scale=10"])
    model = GPTModel(cfg.model, cfg.sparsity, cfg.adapters)
    opt = build_optimizer(model, cfg)
    index = adapter_group(opt)
    assert index is not None
    set_lr(opt, 1e-3)
    assert [g["lr"] for g in opt.param_groups] == [1e-3, 1e-3, 0.0]
    switch_on_adapters(model, opt, cfg)
    set_lr(opt, 1e-3)
    assert opt.param_groups[index]["lr"] == pytest.approx(1e-2)
    assert opt.param_groups[0]["lr"] == 1e-3
    resumed = build_optimizer(model, cfg)  # a fresh optimizer, as after loading a checkpoint
    mark_adapters_active(resumed, cfg)
    set_lr(resumed, 2e-4)
    assert resumed.param_groups[index]["lr"] == pytest.approx(2e-3)
    with pytest.raises(ValueError, match="adapters.lr_scale"):
        load_config(None, ["adapters.lr_scale=0"])


def test_runs_saved_before_the_new_keys_still_resume():
    """run_config.yaml / checkpoint manifests written before adapters.lr_scale and data.corpus
    existed read as holding their defaults; other values are a different run."""
    from slope_megatron.config import load_config
    from slope_megatron.training.run_identity import identity_diff, run_identity, with_added_keys

    ident = run_identity(load_config(None, []), dp_size=1)
    old = {k: v for k, v in ident.items() if k not in ("adapters.lr_scale", "data.corpus")}
    assert len(old) == len(ident) - 2 and identity_diff(old, ident) == []
    assert identity_diff(old, {**ident, "adapters.lr_scale": 10.0}) == ["adapters.lr_scale"]
    assert with_added_keys(old, ident)["adapters.lr_scale"] == 1.0  # what a refusal shows
    assert identity_diff(old, {**ident, "data.corpus": "extended"}) == ["data.corpus"]
