"""The whole model under tensor parallelism equals TP = 1: same init, same losses."""
import pytest
import torch

from helpers.dist import run_distributed
from helpers.layout_worker import initial_full_state, train_losses


@pytest.mark.parametrize("arch", ["gpt", "llama"])
def test_same_seed_same_full_model_for_any_tp(arch):
    ref = run_distributed(initial_full_state, 1, 1, arch)[0]
    for tp in (2, 4):
        full = run_distributed(initial_full_state, tp, tp, arch)[0]
        assert full.keys() == ref.keys()
        for key, value in ref.items():
            if torch.is_tensor(value):
                assert torch.equal(full[key], value), f"TP={tp}: {key} differs"


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["gpt", "llama"])
def test_tp2_losses_match_tp1_with_adapter_switch(arch):
    ref = run_distributed(train_losses, 1, 1, 0, False, arch)[0][0]
    tp2 = run_distributed(train_losses, 2, 2, 0, False, arch)[0][0]
    assert ref[-1] < ref[0]
    torch.testing.assert_close(torch.tensor(tp2), torch.tensor(ref), rtol=1e-5, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("world,stage", [(4, 1), (2, 3)])
def test_tp2_with_zero_matches_tp1(world, stage):
    """TP2 x DP2 under ZeRO-1, and TP2 under ZeRO-3 (partitioned TP shards)."""
    ref = run_distributed(train_losses, 1, 1, 0)[0][0]
    got = run_distributed(train_losses, world, 2, stage)[0][0]
    torch.testing.assert_close(torch.tensor(got), torch.tensor(ref), rtol=1e-5, atol=1e-6)


def test_a_model_built_directly_refuses_heads_that_do_not_split_over_tp():
    """Config validation refuses such layouts; a GPTModel built without it must too, not run
    attention over a wrong number of heads (num_heads // tp)."""
    import types

    from slope_megatron.config import ModelConfig, SparsityConfig
    from slope_megatron.model import GPTModel

    par = types.SimpleNamespace(tp_size=3, tp_rank=0, tp_group=None)  # building needs no group
    cfg = ModelConfig(hidden_size=48, num_heads=4, num_layers=1, seq_len=8, vocab_size=96)
    with pytest.raises(ValueError, match=r"model.num_heads \(4\) is not divisible by the "
                                         r"tensor-parallel size \(3\)"):
        GPTModel(cfg, SparsityConfig(enabled=False), parallel=par)
    GPTModel(ModelConfig(**{**vars(cfg), "num_heads": 6}), SparsityConfig(enabled=False),
             parallel=par)  # 6 heads: 2 per rank
    with pytest.raises(ValueError, match=r"model.dropout \(0.1\) must be 0 with tensor "
                                         r"parallelism \(TP=3\)"):
        GPTModel(ModelConfig(**{**vars(cfg), "num_heads": 6, "dropout": 0.1}),
                 SparsityConfig(enabled=False), parallel=par)


@pytest.fixture(scope="module")
def trained_tp1():
    """TP = 1 runs of layout_worker with a fresh column mask every step; per arch on demand."""
    runs = {}

    def get(arch):
        if arch not in runs:
            runs[arch] = run_distributed(train_losses, 1, 1, 0, False, arch, 1, FRESH_MASKS,
                                         True)[0]
        return runs[arch]
    return get


FRESH_MASKS = ("sparsity.column_mask_refresh=1",)  # column masks follow the trained weights


@pytest.mark.slow
@pytest.mark.parametrize("world,tp,pp,arch", [(2, 2, 1, "llama"), (4, 2, 2, "gpt")])
def test_trained_model_gathered_from_a_layout_equals_tp1(trained_tp1, world, tp, pp, arch):
    """After 6 steps with the adapter switch at step 3, the model consolidated from TP2 (and
    TP2 x PP2, tied embedding on both end stages) to the TP = 1 state dict - as the inference
    artifact is written - equals the TP = 1 run's: the same keys, masks and double-pruned
    column masks bit for bit (each shard prunes its own rows and columns), the same step
    counters, weights equal up to the reduction order's rounding."""
    ref_losses, ref = trained_tp1(arch)
    losses, info = run_distributed(train_losses, world, tp, 0, False, arch, pp, FRESH_MASKS,
                                   True)[0]
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), rtol=1e-5,
                               atol=1e-6)
    got, want = info["state"], ref["state"]
    assert got.keys() == want.keys()
    masks = [k for k in want if k.endswith("mask")]
    assert len(masks) == 2 * 7  # mask and column_mask of 7 sparse linears (first qkv dense)
    assert any(not torch.equal(want[k], want[k[:-len("column_mask")] + "mask"])
               for k in masks if k.endswith("column_mask"))  # double pruning did prune
    for key, value in want.items():
        if not torch.is_tensor(value):  # SlopeLinear extra state: step counters, adapter flag
            assert got[key] == value, key
        elif key in masks:
            assert torch.equal(got[key], value), f"{key} differs from TP = 1"
        else:  # observed: at most 5e-5 (Adam magnifies rounding where gradients are ~0)
            torch.testing.assert_close(got[key], value, rtol=0, atol=2e-4, msg=key)
    steps = {v["column_mask_step"] for v in want.values() if isinstance(v, dict)}
    assert steps and all(s > 0 for s in steps), steps  # the column masks were refreshed
