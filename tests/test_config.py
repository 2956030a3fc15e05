"""Config loading and validation: every mistake gets one message naming the key."""
import pytest

from slope_megatron.config import (Config, ConfigError, config_reference, load_config,
                                   validate_world)


def test_defaults_are_valid_and_adapter_start_is_ceil():
    cfg = load_config(None, ["train.iters=150"])
    assert isinstance(cfg, Config)
    assert cfg.adapter_start_iter == 149  # ceil(0.99 * 150) = 149 -> last 1 iteration
    cfg = load_config(None, ["train.iters=1000", "adapters.fraction=0.05"])
    assert cfg.adapter_start_iter == 950


def test_yaml_file_and_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("model:\n  hidden_size: 64\ntrain:\n  iters: 7\n")
    cfg = load_config(p, ["train.iters=9", "optimizer.lr=1e-3"])
    assert (cfg.model.hidden_size, cfg.train.iters, cfg.optimizer.lr) == (64, 9, 1e-3)


@pytest.mark.parametrize("override,match", [
    ("model.hiden_size=64", "unknown config key 'model.hiden_size'. Did you mean 'model.hidden_size'"),
    ("modle.hidden_size=64", "unknown config section 'modle'"),
    ("train.iters=abc", "'train.iters' must be int"),
    ("train.iters=0", "'train.iters' = 0 is invalid"),
    ("sparsity.n=4", "'sparsity.n' = 4 is invalid: need 1 <= n < m"),
    ("model.num_heads=5", "'model.num_heads' = 5 is invalid: must divide"),
    ("model.ffn_hidden_size=130", "ffn size' = 130 is invalid: must be divisible by sparsity.m"),
    ("adapters.fraction=1.5", "'adapters.fraction' = 1.5 is invalid"),
    ("adapters.fraction=0", "must be in \\(0, 1\\)"),
    ("sparsity.backend=cuda", "use 'auto', 'reference', 'cusparselt', 'cublas' or 'torch-semi'"),
    ("train.dtype=fp8", "'train.dtype'"),
    ("train.global_batch_size=2", "must be >= train.micro_batch_size"),
    ("sparsity.modules=[qkv,mlp]", "unknown entries \\['mlp'\\]"),
    ("train.save_interval=-1", "must be >= 0 \\(0: no checkpoints\\)"),
])
def test_bad_values_are_named(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, [override])


@pytest.mark.parametrize("overrides,match", [
    (["parallel.tensor=3"], "must divide model.num_heads"),
    (["parallel.tensor=4", "model.hidden_size=40", "model.num_heads=4"],
     "must split into 4 shards that are multiples of sparsity.m"),
    (["parallel.tensor=2", "model.vocab_size=101"], "must divide model.vocab_size"),
    (["parallel.pipeline=2", "zero.stage=2"], "pipeline engine supports ZeRO 0 or 1"),
    (["parallel.pipeline=3"], "must not exceed model.num_layers"),
])
def test_parallel_layout_checks(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, overrides)


def test_missing_file_and_bad_override_syntax(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="section.key=value"):
        load_config(None, ["train.iters"])


def test_world_size_checks():
    cfg = load_config(None, ["parallel.tensor=2", "train.micro_batch_size=2",
                             "train.global_batch_size=8"])
    assert validate_world(cfg, 4) == 2
    with pytest.raises(ConfigError, match="world size 3 is not a multiple"):
        validate_world(cfg, 3)
    with pytest.raises(ConfigError, match="global_batch_size \\(8\\) must be a multiple"):
        validate_world(cfg, 6)  # dp=3: 2 x 3 = 6 does not divide 8


def test_reference_lists_every_key():
    ref = config_reference()
    for key in ("sparsity.column_mask_refresh", "adapters.rank_ratio", "train.global_batch_size",
                "zero.stage", "parallel.pipeline"):
        assert f"`{key}`" in ref


def test_save_interval_zero_means_no_checkpoints():
    assert load_config(None, ["train.save_interval=0"]).train.save_interval == 0
    assert "0 writes none" in config_reference()
