"""zero.deepspeed_json: DeepSpeed's own config parser checks the file's settings, and what it
refuses is one error line naming the key, the setting and the reason - not a pydantic
traceback from deepspeed.initialize after the data was prepared. A gradient_clipping there
that optimizer.grad_clip would silently override is refused."""
from __future__ import annotations

import json

import pytest

from slope_megatron.config import ConfigError, load_config
from slope_megatron.config.deepspeed_json import check_deepspeed_json, deepspeed_config

from helpers.paths import ROOT
def _cfg(tmp_path, settings, *overrides):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(settings))
    return load_config(None, [f"zero.deepspeed_json={path}", *overrides])


@pytest.mark.parametrize("settings,stage,says", [
    ({"zero_optimization": {"reduce_bucket_size": "5e8 please"}}, 2,
     "'zero_optimization.reduce_bucket_size' = '5e8 please': Input should be a valid integer"),
    ({"zero_optimization": {"overlap_comm": "maybe"}}, 0,
     "'zero_optimization.overlap_comm' = 'maybe': Input should be a valid boolean"),
    ({"zero_optimization": {"reduce_bucket_sise": 1}}, 1,
     "'zero_optimization.reduce_bucket_sise' = 1: Extra inputs are not permitted"),
    ({"zero_optimization": {"offload_optimizer": {"device": "gpu"}}}, 3,
     "'zero_optimization.offload_optimizer.device' = 'gpu': Input should be 'none', 'cpu' or "
     "'nvme'"),
    ({"tensorboard": {"enabled": True, "output_path": 5}}, 0,
     "'tensorboard.output_path' = 5: Input should be a valid string"),
])
def test_what_deepspeed_refuses_is_one_config_error(tmp_path, settings, stage, says):
    cfg = _cfg(tmp_path, settings, f"zero.stage={stage}")
    for check in (lambda: check_deepspeed_json(cfg), lambda: deepspeed_config(cfg, 1)):
        with pytest.raises(ConfigError) as caught:
            check()
        msg = str(caught.value)
        assert msg.startswith(f"config key 'zero.deepspeed_json' = '{tmp_path / 'ds.json'}' is "
                              f"invalid: DeepSpeed refuses {says}"), msg
        assert msg.endswith("; fix the file or unset the key") and "\n" not in msg


def test_a_section_that_is_not_an_object_is_refused(tmp_path):
    for key in ("zero_optimization", "data_types"):
        with pytest.raises(ConfigError, match=f"its '{key}' is 5, not an object of settings"):
            check_deepspeed_json(_cfg(tmp_path, {key: 5}))


def test_gradient_clipping_belongs_to_optimizer_grad_clip(tmp_path):
    for clip in (0.5, "1.0", None, True):
        cfg = _cfg(tmp_path, {"gradient_clipping": clip}, "optimizer.grad_clip=1.0")
        with pytest.raises(ConfigError, match=r"its 'gradient_clipping' = .* would be overridden "
                           r"by optimizer.grad_clip \(1.0\).*set optimizer.grad_clip instead"):
            check_deepspeed_json(cfg)
    same = _cfg(tmp_path, {"gradient_clipping": 1}, "optimizer.grad_clip=1.0")
    assert deepspeed_config(same, 1)["gradient_clipping"] == 1.0  # the same value: taken


@pytest.mark.parametrize("name", ["zero1", "zero2", "zero3"])
def test_the_shipped_files_and_settings_deepspeed_ignores_pass(tmp_path, name):
    for stage in range(4):
        cfg = load_config(None, [f"zero.deepspeed_json={ROOT / 'configs/deepspeed' / name}.json",
                                 f"zero.stage={stage}"])
        for dtype in ("fp32", "bf16", "fp16"):
            deepspeed_config(cfg, 2, dtype)
    # keys our config owns are dropped before DeepSpeed sees them; unknown keys it ignores
    check_deepspeed_json(_cfg(tmp_path, {"train_batch_size": "x", "bf16": {"enabled": "x"},
                                         "no_such_section": 1}))
    check_deepspeed_json(load_config(None, []))  # no file: nothing to check


@pytest.mark.slow
def test_a_run_with_a_bad_deepspeed_json_stops_with_one_line(tmp_path, capfd):
    from helpers.corpus import tiny_run_args, write_corpus
    from helpers.forked_runs import launch

    corpus = write_corpus(tmp_path / "corpus")
    bad = tmp_path / "ds.json"
    bad.write_text(json.dumps({"zero_optimization": {"reduce_bucket_size": "big"}}))
    cache = tmp_path / "cache"
    capfd.readouterr()
    assert launch(tiny_run_args(corpus, cache, tmp_path / "run", 2, 2, "zero.stage=2",
                                f"zero.deepspeed_json={bad}"), 2) == [2, 2]
    err = capfd.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in err, err
    assert "'zero.deepspeed_json'" in errors[0] and \
        "'zero_optimization.reduce_bucket_size' = 'big'" in errors[0]
    assert not cache.exists()  # checked before any work: no data was prepared
