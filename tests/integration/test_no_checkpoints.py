"""`train.save_interval: 0` (no checkpoints): what a user is told, and what is protected.

A run without checkpoints cannot be resumed, so its stop messages must not send the user to a
checkpoint, and rerunning in its output directory (which would start again from iteration 0
and truncate the finished run's metrics) is refused before any work starts.
"""
import pytest

from slope_megatron.config import ConfigError, load_config
from slope_megatron.training.run_dir import check_output_dir
from slope_megatron.training.loop import rerun_advice


def test_rerun_into_a_finished_run_without_checkpoints_is_refused(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"iter": 10, "loss": 3.0}\n')
    cfg = load_config(None, ["train.save_interval=0", f"train.output_dir={out}"])
    with pytest.raises(ConfigError, match="cannot be resumed; rerunning there would overwrite") \
            as refused:
        check_output_dir(cfg, out)
    assert "delete" not in str(refused.value)  # no advice that loses the finished run's data
    assert (out / "metrics.jsonl").read_text() == '{"iter": 10, "loss": 3.0}\n'
    # with checkpoints to resume from, or checkpoints written by this run, it is a resume
    check_output_dir(load_config(None, [f"train.output_dir={out}"]), out)
    (out / "checkpoints").mkdir()
    check_output_dir(cfg, out)


def test_stop_advice_names_what_exists(tmp_path):
    none = load_config(None, ["train.save_interval=0"])
    some = load_config(None, ["train.save_interval=5"])
    assert "rerun from scratch in a new train.output_dir" in rerun_advice(none, "")
    assert "checkpoint" not in rerun_advice(none, "with a lower optimizer.lr").split("(")[0]
    said = rerun_advice(some, "with a lower optimizer.lr", tmp_path)
    assert said.startswith("resume from the last checkpoint") and str(tmp_path) in said
    assert said.endswith("with a lower optimizer.lr")
