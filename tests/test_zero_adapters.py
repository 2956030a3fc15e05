"""DeepSpeed ZeRO 0-3 with data parallelism: same losses as one process, adapter switch
inside the window with fresh adapter state while the sparse weights keep theirs."""
import pytest
import torch

from dist_utils import run_distributed

STEPS, SWITCH = 6, 3


def train_losses(stage: int, check_state: bool = False):
    from slope_megatron.config import load_config
    from slope_megatron.model import GPTModel
    from slope_megatron.sparsity import after_optimizer_step
    from slope_megatron.training.distributed import init_distributed
    from slope_megatron.training.engine import initialize
    from slope_megatron.training.optimizer import (base_optimizer, build_optimizer, set_lr,
                                                   switch_on_adapters)

    cfg = load_config(None, ["model.vocab_size=128", "model.hidden_size=32", "model.num_heads=4",
                             "model.seq_len=16", f"zero.stage={stage}", "adapters.rank=2",
                             "train.micro_batch_size=2", "train.global_batch_size=8"])
    d = init_distributed()
    torch.manual_seed(0)
    model = GPTModel.from_config(cfg)
    engine, opt = initialize(model, build_optimizer(model, cfg), cfg, d.world_size)
    ids = torch.randint(0, 128, (8, 17), generator=torch.Generator().manual_seed(1))
    per_rank = 8 // d.world_size
    losses, info = [], {}
    for step in range(STEPS):
        if step == SWITCH:
            if check_state:
                w = model.blocks[1].mlp.fc1.weight
                info["weight_step_before"] = int(base_optimizer(opt).state[w]["step"])
            switch_on_adapters(model, opt, cfg)
        set_lr(opt, 1e-2)
        mine = ids[d.rank * per_rank:(d.rank + 1) * per_rank]  # a fixed batch: loss must fall
        total = 0.0
        for i in range(0, per_rank, 2):
            x = mine[i:i + 2]
            loss = engine(x[:, :-1], x[:, 1:])
            engine.backward(loss)
            engine.step()
            total += loss.item()
        after_optimizer_step(model)
        t = torch.tensor([total / (per_rank // 2)])
        torch.distributed.all_reduce(t)
        losses.append(t.item() / d.world_size)
    if check_state:
        layer = model.blocks[1].mlp.fc1
        state = base_optimizer(opt).state
        info["weight_step_after"] = int(state[layer.weight]["step"])
        info["adapter_step_after"] = int(state[layer.adapter_a]["step"])
    return losses, info


@pytest.fixture(scope="module")
def reference():
    return run_distributed(train_losses, 1, 0, True)[0]


def test_sparse_weights_keep_state_adapters_start_fresh(reference):
    _, info = reference
    assert info["weight_step_before"] == SWITCH
    assert info["weight_step_after"] == STEPS
    assert info["adapter_step_after"] == STEPS - SWITCH


@pytest.mark.slow
@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_dp2_under_each_zero_stage_matches_one_process(reference, stage):
    losses = run_distributed(train_losses, 2, stage)[0][0]
    ref = reference[0]
    assert ref[-1] < ref[0]
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref), rtol=1e-5, atol=1e-6)
