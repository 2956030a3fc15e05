"""The whole model under tensor parallelism equals TP = 1: same init, same losses."""
import pytest
import torch

from dist_utils import run_distributed
from layout_worker import initial_full_state, train_losses


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
