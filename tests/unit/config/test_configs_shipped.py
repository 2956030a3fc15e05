"""Every shipped config loads and validates; every DeepSpeed JSON parses and merges."""

import pytest

from slope_megatron.config import load_config
from slope_megatron.config.deepspeed_json import deepspeed_config

from helpers.paths import ROOT
@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_config_is_valid(path):
    cfg = load_config(path)
    assert cfg.train.iters >= 1


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_deepspeed_json_merges_under_our_batch_and_stage(stage):
    cfg = load_config(None, [f"zero.stage={stage}",
                             f"zero.deepspeed_json=configs/deepspeed/zero{stage}.json",
                             "train.micro_batch_size=2", "train.global_batch_size=8"])
    ds = deepspeed_config(cfg, dp_size=2)
    assert ds["zero_optimization"]["stage"] == stage
    assert ds["zero_optimization"]["overlap_comm"] is True  # from the JSON
    assert (ds["train_batch_size"], ds["gradient_accumulation_steps"]) == (8, 2)
