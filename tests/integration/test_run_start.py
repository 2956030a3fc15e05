"""Start-up: run_config.yaml read once at start-up, one adapters_since fallback, and a start
banner that agrees with the resume warning when the adapters are already on."""
from __future__ import annotations

import logging
from pathlib import Path

import pytest
import yaml

import slope_megatron.training.loop as loop_mod
import slope_megatron.training.startup as startup_mod
from helpers.corpus import tiny_run_args, write_corpus
from helpers.dist import run_distributed
from helpers.launch import pretrain_main
from slope_megatron.config import ConfigError, load_config
from slope_megatron.training import adapter_schedule
from slope_megatron.distributed import DistInfo
from slope_megatron.training.run_dir import (
    RUN_CONFIG,
    check_output_dir,
    read_recorded_config,
    record_run_config,
)


# ---- 1. run_config.yaml: read and parsed once at start-up ----------------------------------

class _Stop(Exception):
    """Raised in place of building the engine: start-up is over by then."""


def _count_reads(monkeypatch) -> tuple[list, list]:
    """Reads of run_config.yaml, and parses of what those reads returned."""
    reads = []
    read_text = Path.read_text

    def counting(self, *a, **kw):
        text = read_text(self, *a, **kw)
        if self.name == RUN_CONFIG:
            reads.append(text)
        return text
    monkeypatch.setattr(Path, "read_text", counting)
    parses = []
    safe_load = yaml.safe_load

    def counting_load(stream, *a, **kw):
        if any(stream is text for text in reads):  # not load_config's --set values
            parses.append(stream)
        return safe_load(stream, *a, **kw)
    monkeypatch.setattr(yaml, "safe_load", counting_load)
    return reads, parses


def _start_up(cfg, monkeypatch):
    """trainer.train up to building the engine (no data, no model)."""
    monkeypatch.setattr(startup_mod, "prepare_run_data", lambda cfg, main: None)

    def stop(*a, **kw):
        raise _Stop
    monkeypatch.setattr(startup_mod, "build_engine", stop)
    with pytest.raises(_Stop):
        loop_mod.train(cfg, DistInfo(rank=0, world_size=1, local_rank=0, launcher="test"))


def test_start_up_reads_run_config_once_in_a_dir_holding_a_checkpoint(tmp_path, monkeypatch):
    out = tmp_path / "run"
    cfg = load_config(None, [f"train.output_dir={out}"])
    record_run_config(check_output_dir(cfg, out), out, main=True)
    (out / "checkpoints").mkdir()
    (out / "checkpoints" / "latest").write_text("iter_00000004")
    reads, parses = _count_reads(monkeypatch)
    _start_up(cfg, monkeypatch)
    assert len(reads) == 1  # was 2: check_output_dir and recorded_config
    assert len(parses) == 1


def test_start_up_reads_run_config_once_in_a_dir_without_checkpoint(tmp_path, monkeypatch,
                                                                    caplog):
    out = tmp_path / "run"
    first = load_config(None, [f"train.output_dir={out}", "model.num_layers=2"])
    record_run_config(check_output_dir(first, out), out, main=True)
    reads, parses = _count_reads(monkeypatch)
    fixed = load_config(None, [f"train.output_dir={out}", "model.num_layers=3"])
    with caplog.at_level(logging.INFO):
        _start_up(fixed, monkeypatch)
    assert len(reads) == 1  # was 2: recorded_config and record_run_config
    assert len(parses) == 1
    monkeypatch.undo()
    assert yaml.safe_load((out / RUN_CONFIG).read_text())["model"]["num_layers"] == 3
    said = [r.getMessage() for r in caplog.records if RUN_CONFIG in r.getMessage()]
    assert len(said) == 1 and "model.num_layers: 2 -> 3" in said[0]


def test_the_recorded_config_read_once_keeps_each_readers_behaviour(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    assert read_recorded_config(out).as_dict() == {}
    assert not read_recorded_config(out).found
    (out / RUN_CONFIG).write_text("train: {iters: [unclosed\n")
    broken = read_recorded_config(out)
    assert broken.found and broken.as_dict() == {}  # lenient: the old train.iters is unknown
    cfg = load_config(None, [f"train.output_dir={out}"])
    check_output_dir(cfg, out, broken)  # no checkpoint: not needed, not refused
    record_run_config(cfg.to_dict(), out, main=True, recorded=broken)  # replaced
    assert yaml.safe_load((out / RUN_CONFIG).read_text())["train"]["output_dir"] == str(out)
    (out / RUN_CONFIG).write_text("train: {iters: [unclosed\n")
    (out / "checkpoints").mkdir()
    (out / "checkpoints" / "latest").write_text("iter_00000004")
    with pytest.raises(ConfigError, match="run_config.yaml cannot be read"):  # one line
        check_output_dir(cfg, out, read_recorded_config(out))
    for text in ("", "- a list\n", "3\n"):  # truncated, or not a config: no traceback either
        (out / RUN_CONFIG).write_text(text)
        with pytest.raises(ConfigError, match="empty or not a mapping"):
            check_output_dir(cfg, out, read_recorded_config(out))
    (out / RUN_CONFIG).write_text(yaml.safe_dump(
        load_config(None, [f"train.output_dir={out}", "model.num_layers=5"]).to_dict()))
    with pytest.raises(ConfigError, match=r"holds a different run \(model.num_layers: 5 -> "):
        check_output_dir(cfg, out, read_recorded_config(out))


# ---- 2. one adapters_since fallback --------------------------------------------------------

def test_adapters_on_since_prefers_the_checkpoint_then_the_old_switch_point():
    cfg = load_config(None, ["train.iters=12", "adapters.fraction=0.25"])
    assert adapter_schedule.adapters_on_since(cfg, 7, 8) == 7  # as the checkpoint recorded it
    assert adapter_schedule.adapters_on_since(cfg, None, 8) == 6  # the 8-iteration switch point
    assert adapter_schedule.adapters_on_since(cfg, None, None) is None
    # the warning uses the same fallback
    said = adapter_schedule.iters_change_warning(cfg, 8, 8, 0, adapters_on=True, adapters_since=None)
    assert "already on since iteration 6" in said


# ---- 3. the banner on a resume with the adapters already on --------------------------------

def test_the_banner_says_since_when_the_adapters_are_on():
    cfg = load_config(None, ["train.iters=14", "adapters.fraction=0.25"])
    phase = adapter_schedule.adapter_phase
    assert phase(cfg) == "adapters from iter 11"  # a fresh start: this run's plan
    assert phase(cfg, adapters_on=False, adapters_since=None) == "adapters from iter 11"
    assert phase(cfg, adapters_on=True, adapters_since=9) == "adapters on since iter 9"
    assert "adapters from" not in phase(cfg, adapters_on=True, adapters_since=None)
    short = load_config(None, ["train.iters=9", "adapters.fraction=0.05"])
    assert phase(short, adapters_on=True, adapters_since=6) == "adapters on since iter 6"
    # a resume past a switch point not yet reached (train.iters lowered): they switch at once
    assert phase(cfg, start=12) == "adapters from iter 12 (the switch point, iter 11, has passed)"
    assert phase(cfg, start=11) == phase(cfg, start=3) == "adapters from iter 11"


@pytest.mark.slow
def test_resume_with_other_train_iters_and_adapters_on_banner_agrees_with_warning(
        tmp_path, capfd):
    corpus = write_corpus(tmp_path / "corpus")
    out = tmp_path / "run"

    def run(iters):
        argv = tiny_run_args(corpus, tmp_path / "cache", out, iters, 12)
        return run_distributed(pretrain_main, 1, argv)[0]
    # 12 iterations, adapters.fraction 0.25: adapters on from iteration 9; a save at 12
    assert run(12) == 0
    first = capfd.readouterr()
    assert "adapters from iter 9" in first.out
    # extended to 14: its own switch point would be 11, but the adapters are on since 9
    assert run(14) == 0
    cap = capfd.readouterr()
    warned = [line for line in cap.err.splitlines() if "train.iters" in line]
    assert len(warned) == 1 and "already on since iteration 9" in warned[0], cap.err
    banner = [line for line in cap.out.splitlines() if line.startswith("model: ")]
    assert len(banner) == 1, cap.out
    assert "adapters on since iter 9" in banner[0] and "adapters from" not in banner[0]
