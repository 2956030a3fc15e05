"""`train.activation_checkpointing`: the blocks recompute their forward in the backward.

The result must be the same computation (losses and gradients as without it, for the dense
and the SLoPe model, adapters on, in every parallel layout), also when a sparse layer takes
another kernel path in the recomputation than in the first forward (the GPU backends do), and
it must actually keep less: the tensors autograd saves outside the recomputed blocks are
counted.
"""
import pytest
import torch

from helpers.dist import run_distributed
from helpers.layout_worker import train_losses
from slope_megatron.config import ConfigError, load_config
from slope_megatron.model import GPTModel
from slope_megatron.model.recompute import enable_activation_checkpointing
from slope_megatron.sparsity import enable_adapters, slope_layers
from slope_megatron.sparsity.backends.reference import ReferenceBackend
from slope_megatron.sparsity.functional import slope_linear

RECOMPUTE = "train.activation_checkpointing=true"


def tiny(arch, sparse, seed=0):
    cfg = load_config(None, [f"model.arch={arch}", "model.vocab_size=96", "model.hidden_size=32",
                             "model.num_heads=4", "model.num_layers=3", "model.seq_len=16",
                             f"sparsity.enabled={sparse}", "model.dropout=0.1"])
    torch.manual_seed(seed)
    model = GPTModel.from_config(cfg)
    if sparse:
        enable_adapters(model)
        for name, p in model.named_parameters():  # B starts at zero: make the adapters count
            if name.endswith("adapter_b"):
                torch.nn.init.normal_(p, 0.0, 0.02)
    return model


def loss_grads_and_saved_bytes(model, ids):
    """Loss, every parameter's gradient, and the bytes autograd saved outside checkpoints
    (the recomputed blocks' tensors are held by their checkpoint instead)."""
    saved = []

    def pack(t):
        saved.append(t.numel() * t.element_size())
        return t

    torch.manual_seed(1)  # dropout: the same masks in both runs
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(ids[:, :-1], ids[:, 1:])
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads, sum(saved)


@pytest.mark.parametrize("arch", ["gpt", "llama"])
@pytest.mark.parametrize("sparse", [True, False])
def test_recompute_gives_the_same_loss_and_gradients_and_keeps_less(arch, sparse):
    ids = torch.randint(0, 96, (4, 17), generator=torch.Generator().manual_seed(2))
    plain = tiny(arch, sparse)
    loss, grads, kept = loss_grads_and_saved_bytes(plain, ids)

    recomputing = tiny(arch, sparse)
    assert enable_activation_checkpointing(recomputing) == 3
    loss_r, grads_r, kept_r = loss_grads_and_saved_bytes(recomputing, ids)

    torch.testing.assert_close(loss_r, loss, rtol=0, atol=0)
    assert grads_r.keys() == grads.keys() and len(grads) > 10
    if sparse:
        assert any(n.endswith("adapter_a") for n in grads)  # the adapters are in the check
    for name, g in grads.items():
        torch.testing.assert_close(grads_r[name], g, rtol=0, atol=0, msg=name)
    # what stays is the embedding's and the head's (logits, loss), not the blocks'
    assert kept_r < 0.5 * kept, (kept_r, kept)


class PathSwitchingBackend(ReferenceBackend):
    """The reference's math, but every other call takes another path that saves other
    tensors (two half-height products), as the cusparselt backend's first call of a token
    count runs the Python function and later ones the native step, and `auto` re-times."""

    def __init__(self):
        self.calls = 0

    def linear(self, layer, x):
        self.calls += 1
        if self.calls % 2:
            return super().linear(layer, x)
        cm, half = layer.column_mask_for_backward(), layer.out_features // 2
        rows = (slice(0, half), slice(half, None))
        return torch.cat([slope_linear(x, layer.weight[r], layer.mask[r], cm[r],
                                       None if layer.bias is None else layer.bias[r])
                          for r in rows], dim=-1)


def test_recompute_survives_a_kernel_path_change():
    """The recomputation back-propagates through its own graph (reentrant checkpoint): a
    layer whose path differs from the first forward's still gets the plain gradients."""
    ids = torch.randint(0, 96, (4, 17), generator=torch.Generator().manual_seed(3))
    results = []
    for recompute in (False, True):
        model = tiny("gpt", True)
        for layer in slope_layers(model):
            layer.backend = PathSwitchingBackend()
        if recompute:
            enable_activation_checkpointing(model)
        results.append(loss_grads_and_saved_bytes(model, ids)[:2])
    (loss, grads), (loss_r, grads_r) = results
    torch.testing.assert_close(loss_r, loss, rtol=0, atol=0)
    for name, g in grads.items():
        torch.testing.assert_close(grads_r[name], g, rtol=1e-6, atol=1e-7, msg=name)


def test_recompute_is_off_in_evaluation_and_without_grad():
    model = tiny("gpt", True)
    enable_activation_checkpointing(model)
    ids = torch.randint(0, 96, (2, 17))
    model.eval()
    with torch.autograd.graph.saved_tensors_hooks(lambda t: pytest.fail("saved in eval"),
                                                  lambda t: t), torch.no_grad():
        model(ids[:, :-1], ids[:, 1:])


def test_the_setting_is_checked():
    assert load_config(None, [RECOMPUTE]).train.activation_checkpointing is True
    assert load_config(None, []).train.activation_checkpointing is False
    with pytest.raises(ConfigError, match="train.activation_checkpointing"):
        load_config(None, ["train.activation_checkpointing=sometimes"])


def test_recompute_trains_like_plain_through_the_engine():
    """build_engine turns it on from the config; DeepSpeed steps with the adapter switch in
    the window give the same losses."""
    plain = run_distributed(train_losses, 1, 1, 0, False, "llama", 1, ())[0][0]
    got = run_distributed(train_losses, 1, 1, 0, False, "llama", 1, (RECOMPUTE,))[0][0]
    assert plain[-1] < plain[0]
    torch.testing.assert_close(torch.tensor(got), torch.tensor(plain), rtol=1e-6, atol=1e-7)


@pytest.mark.slow
def test_recompute_under_zero3_data_parallelism():
    """DP=2 under ZeRO-3: the recomputed forward gathers the partitioned parameters again
    (DeepSpeed's module hooks fire in it); the losses are one plain process's."""
    plain = run_distributed(train_losses, 1, 1, 0, False, "llama", 1, ())[0][0]
    got = run_distributed(train_losses, 2, 1, 3, False, "llama", 1, (RECOMPUTE,))[0][0]
    torch.testing.assert_close(torch.tensor(got), torch.tensor(plain), rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_recompute_under_tensor_and_pipeline_parallelism():
    """TP=2 x PP=2 (DeepSpeed's pipeline engine) recomputing its stages' blocks: the losses
    of one process without recomputation."""
    plain = run_distributed(train_losses, 1, 1, 0, False, "gpt", 1, ())[0][0]
    got = run_distributed(train_losses, 4, 2, 0, False, "gpt", 2, (RECOMPUTE,))[0][0]
    torch.testing.assert_close(torch.tensor(got), torch.tensor(plain), rtol=1e-5, atol=1e-6)
