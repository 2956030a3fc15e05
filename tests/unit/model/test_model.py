"""The transformer: which linears are sparse, training lowers the loss, both archs."""
import pytest
import torch
from torch import nn
from helpers.train import fixed_batch_losses

from slope_megatron.config import load_config
from slope_megatron.model import GPTModel
from slope_megatron.sparsity import SlopeLinear, enable_adapters, slope_layers


def tiny(arch="gpt", *overrides):
    cfg = load_config(None, [f"model.arch={arch}", "model.vocab_size=96", "model.hidden_size=32",
                             "model.num_heads=4", "model.num_layers=2", "model.seq_len=16",
                             *overrides])
    return cfg, GPTModel.from_config(cfg)


@pytest.mark.parametrize("arch", ["gpt", "llama"])
def test_sparse_layers_are_where_the_paper_puts_them(arch):
    _, model = tiny(arch)
    assert isinstance(model.blocks[0].attn.qkv, nn.Linear)
    for i, block in enumerate(model.blocks):
        for lin in (block.attn.proj, block.mlp.fc1, block.mlp.fc2):
            assert isinstance(lin, SlopeLinear)
        assert isinstance(block.attn.qkv, SlopeLinear) == (i > 0)
    assert model.head.lm_head is None  # tied to the dense embedding


@pytest.mark.parametrize("arch", ["gpt", "llama"])
def test_dense_baseline_is_the_same_code_without_slope_layers(arch):
    _, sparse = tiny(arch)
    _, dense = tiny(arch, "sparsity.enabled=false")
    assert not list(slope_layers(dense))
    names = lambda m: [n for n, _ in m.named_modules()]  # noqa: E731
    assert names(sparse) == names(dense)


@pytest.mark.parametrize("arch", ["gpt", "llama"])
@pytest.mark.parametrize("sparse", [True, False])
def test_training_steps_lower_the_loss_on_a_fixed_batch(arch, sparse):
    torch.manual_seed(0)
    _, model = tiny(arch, f"sparsity.enabled={sparse}")
    losses = fixed_batch_losses(model)
    assert losses[-1] < losses[0] - 0.1


def test_adapter_switch_keeps_model_output():
    _, model = tiny("llama")
    model.eval()
    ids = torch.randint(0, 96, (2, 16))
    before = model(ids)
    assert enable_adapters(model) == 7  # 2 blocks x 4 sparse linears, minus block 0's qkv
    torch.testing.assert_close(model(ids), before)


def test_overlong_input_is_rejected():
    _, model = tiny()
    with pytest.raises(ValueError, match="exceeds model.seq_len"):
        model(torch.zeros(1, 17, dtype=torch.long))


def test_sparse_lm_head_option():
    _, model = tiny("gpt", "model.tie_embeddings=false", "sparsity.sparse_lm_head=true")
    assert isinstance(model.head.lm_head, SlopeLinear)
