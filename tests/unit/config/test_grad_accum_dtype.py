"""zero.grad_accum_dtype: which DeepSpeed optimizer wrapper a bf16 run gets, refused
combinations, and the checkpoint identity that keeps resumes on the same wrapper."""
import pytest

from slope_megatron.config import ConfigError, load_config
from slope_megatron.config.deepspeed_json import check_precision_layout, deepspeed_config
from slope_megatron.training.run_identity import identity_diff, layout_diff, run_identity


def _ds(*overrides, dtype="bf16"):
    cfg = load_config(None, ["train.micro_batch_size=2", "train.global_batch_size=8", *overrides])
    return deepspeed_config(cfg, dp_size=1, dtype=dtype)


def test_bf16_at_stage_1_accumulates_in_fp32():
    # DeepSpeed 0.19.8 selects BF16_Optimizer for exactly this combination
    assert _ds("zero.stage=1")["data_types"] == {"grad_accum_dtype": "fp32"}
    explicit = _ds("zero.stage=1", "zero.grad_accum_dtype=fp32")
    assert explicit["data_types"]["grad_accum_dtype"] == "fp32"


@pytest.mark.parametrize("overrides,dtype", [
    (["zero.stage=0"], "bf16"),  # DeepSpeed refuses fp32 accumulation of bf16 without ZeRO
    (["zero.stage=2"], "bf16"),
    (["zero.stage=3"], "bf16"),
    (["zero.stage=1", "zero.grad_accum_dtype=model"], "bf16"),
    (["zero.stage=1"], "fp32"),
    (["zero.stage=1"], "fp16"),
])
def test_otherwise_deepspeeds_default(overrides, dtype):
    assert "data_types" not in _ds(*overrides, dtype=dtype)


@pytest.mark.parametrize("stage", [0, 2, 3])
def test_explicit_fp32_without_stage_1_is_refused_up_front(stage):
    with pytest.raises(ConfigError, match=r"zero.grad_accum_dtype.*zero.stage: 1"):
        load_config(None, [f"zero.stage={stage}", "zero.grad_accum_dtype=fp32"])
    load_config(None, [f"zero.stage={stage}", "zero.grad_accum_dtype=fp32", "train.dtype=fp32"])


def test_unknown_value_is_refused():
    with pytest.raises(ConfigError, match="zero.grad_accum_dtype"):
        load_config(None, ["zero.grad_accum_dtype=bf16"])


def test_identity_records_the_resolved_dtype():
    cfg = load_config(None, ["zero.stage=1"])
    ident = run_identity(cfg, dp_size=1)
    assert ident["zero.grad_accum_dtype"] == "model"  # fp32 training on this CPU
    # a checkpoint saved before the key existed ran DeepSpeed's default ("model")
    old = {k: v for k, v in ident.items() if k != "zero.grad_accum_dtype"}
    assert identity_diff(old, ident) == []
    # it picks DeepSpeed's optimizer wrapper, whose files differ: a layout key, converted
    assert identity_diff(old, {**ident, "zero.grad_accum_dtype": "fp32"}) == []
    assert layout_diff(old, {**ident, "zero.grad_accum_dtype": "fp32"}) == [
        "zero.grad_accum_dtype"]
    assert layout_diff(old, ident) == []
    # the kernel-side operand layout is not part of a run's identity
    assert not any("keep_compressed" in k for k in ident)


def test_user_json_cannot_pick_the_accumulation_dtype(tmp_path):
    import json
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"data_types": {"grad_accum_dtype": "fp32", "other": 1}}))
    ds = _ds("zero.stage=0", f"zero.deepspeed_json={path}")
    assert ds["data_types"] == {"other": 1}


@pytest.mark.parametrize("stage,tp,pp,dtype,refused", [
    (0, 2, 1, "bf16", True),   # FP16_UnfusedOptimizer: the norm of TP rank 0's shard only
    (0, 2, 1, "fp16", True),
    (0, 2, 2, "fp16", True),   # fp16 takes the same wrapper under PP
    (0, 2, 2, "bf16", False),  # BF16_Optimizer counts flagged shards
    (0, 2, 1, "fp32", False),  # DeepSpeed steps our AdamW; grad_norm.ClientGradNorm counts
    (1, 2, 1, "bf16", False),
    (0, 1, 1, "bf16", False),
])
def test_zero0_in_16_bits_with_tensor_parallelism_is_refused(stage, tp, pp, dtype, refused):
    cfg = load_config(None, [f"zero.stage={stage}", f"parallel.tensor={tp}",
                             f"parallel.pipeline={pp}", "model.num_layers=4"])
    if refused:
        with pytest.raises(ConfigError, match=r"'zero.stage' = 0 .*tensor-parallel.*zero.stage: 1"):
            check_precision_layout(cfg, dtype)
    else:
        assert check_precision_layout(cfg, dtype) == dtype
