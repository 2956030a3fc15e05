"""DeepSpeed ZeRO 0-3 with data parallelism: same losses as one process, adapter switch
inside the window with fresh adapter state while the sparse weights keep theirs."""
import pytest
import torch

from helpers.dist import run_distributed
from helpers.layout_worker import STEPS, SWITCH, train_losses

@pytest.fixture(scope="module")
def reference():
    return run_distributed(train_losses, 1, 1, 0, True)[0]


def test_sparse_weights_keep_state_adapters_start_fresh(reference):
    _, info = reference
    assert info["weight_step_before"] == SWITCH
    assert info["weight_step_after"] == STEPS
    assert info["adapter_step_after"] == STEPS - SWITCH


@pytest.mark.slow
@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_dp2_under_each_zero_stage_matches_one_process(reference, stage):
    losses = run_distributed(train_losses, 2, 1, stage)[0][0]
    ref = reference[0]
    assert ref[-1] < ref[0]
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref), rtol=1e-5, atol=1e-6)
