"""The sample order (slope_megatron/data/order.py): a pure function of (seed, iteration), the same
global batch in every parallel layout, epochs independent across seeds (order version 2),
and checkpoints from before the version was recorded resuming in the first order."""
import numpy as np
import pytest
import torch

from slope_megatron.config import load_config
from slope_megatron.errors import SlopeError
from slope_megatron.data.order import ORDER_VERSION, GlobalBatchOrder
from slope_megatron.training.loop import _LoopState

N, GLOBAL = 40, 8  # 5 iterations per epoch


def epoch(order: GlobalBatchOrder, e: int) -> list[int]:
    per_epoch = N // GLOBAL
    return np.concatenate([order.global_indices(i)
                           for i in range(e * per_epoch, (e + 1) * per_epoch)]).tolist()


@pytest.mark.parametrize("version", [1, 2])
def test_every_epoch_is_a_permutation_and_layouts_share_the_global_batch(version):
    order = GlobalBatchOrder(N, GLOBAL, seed=3, version=version)
    for e in range(3):
        assert sorted(epoch(order, e)) == list(range(N))
    for it in range(7):
        whole = order.global_indices(it).tolist()
        for dp in (1, 2, 4):
            shares = [np.concatenate(order.micro_batches(it, r, dp, micro_batch_size=2)).tolist()
                      for r in range(dp)]
            assert sum(shares, []) == whole
    again = GlobalBatchOrder(N, GLOBAL, seed=3, version=version)
    assert [again.global_indices(i).tolist() for i in range(12)] == \
        [order.global_indices(i).tolist() for i in range(12)]


def test_nearby_seeds_do_not_share_epochs():
    # version 1 drew epoch e from seed + e: seed 4's epoch 0 was seed 3's epoch 1
    old3, old4 = GlobalBatchOrder(N, GLOBAL, 3, version=1), GlobalBatchOrder(N, GLOBAL, 4, version=1)
    assert epoch(old4, 0) == epoch(old3, 1)
    new3, new4 = GlobalBatchOrder(N, GLOBAL, 3), GlobalBatchOrder(N, GLOBAL, 4)
    assert ORDER_VERSION == 2
    assert all(epoch(new4, a) != epoch(new3, b) for a in range(3) for b in range(3))


def test_version_1_is_the_order_older_checkpoints_trained_in():
    order = GlobalBatchOrder(N, GLOBAL, seed=7, version=1)
    assert epoch(order, 2) == np.random.default_rng(7 + 2).permutation(N).tolist()


def test_an_unknown_version_is_refused():
    with pytest.raises(SlopeError, match="data order version is 3"):
        GlobalBatchOrder(N, GLOBAL, seed=0, version=3)


class _Recorded:
    def as_dict(self):
        return {}


@pytest.mark.parametrize("client,version", [
    (None, ORDER_VERSION),                                  # a new run
    ({"iteration": 4}, 1),                                  # a checkpoint from before the key
    ({"iteration": 4, "data_order": 2}, 2),
])
def test_a_resume_keeps_the_checkpoints_order(client, version):
    cfg = load_config(None, [])
    state = _LoopState.resumed(client, cfg, torch.nn.Linear(2, 2), _Recorded())
    assert state.data_order == version
    assert state.client_state(cfg, 5, 1.0, {})["data_order"] == version
