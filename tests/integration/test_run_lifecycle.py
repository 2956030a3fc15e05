"""How a run starts, resumes and prunes its checkpoints (docs/RELIABILITY.md).

- a start that failed before its first checkpoint does not bind the corrected rerun to its
  run_config.yaml;
- where the data cache lives (or how a path is spelt) is not part of a run's identity;
- changing train.iters on resume is allowed, said in one warning, and the adapters switch
  on once their phase has begun (also when the resume starts past the switch point);
- a checkpoint that fails verification is set aside (renamed `.corrupt`), never counted
  toward train.keep_checkpoints, and never kept in place of the good one it fell back to.

Runs are fork-started processes (tests/helpers/dist.py) calling launch/pretrain.py's main(),
so their process-group environment stays in the child.
"""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
import yaml

import slope_megatron.training.adapter_schedule as adapter_schedule
import slope_megatron.training.startup as startup_mod
from helpers.corpus import tiny_run_args, write_corpus
from helpers.dist import run_distributed
from helpers.launch import pretrain_main
from slope_megatron.config import ConfigError, load_config
from slope_megatron.errors import EXIT_OUT_OF_MEMORY
from slope_megatron.io import write_text_atomic
from slope_megatron.training import checkpoint
from slope_megatron.training.optimizer import lr_at
from slope_megatron.training.run_dir import RUN_CONFIG, check_output_dir, record_run_config
from slope_megatron.training.run_identity import identity_diff, identity_of, run_identity

from helpers.paths import ROOT
def run(argv) -> int:
    return run_distributed(pretrain_main, 1, argv)[0]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("corpus"))


def args(corpus, out, iters, save_interval, *extra):
    return tiny_run_args(corpus, corpus.parent / "cache", out, iters, save_interval, *extra)


def metrics(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def tags(out) -> list[str]:
    return sorted(p.name for p in (out / "checkpoints").iterdir() if p.name != "latest")


# ---- 1. a start that failed before its first checkpoint ------------------------------------

@pytest.mark.slow
def test_a_start_that_failed_before_its_first_checkpoint_does_not_bind_the_rerun(
        corpus, tmp_path, monkeypatch, capfd):
    """Out of memory while building the engine; the rerun with the advised fix (another ZeRO
    stage, part of the run's identity) runs instead of being refused."""
    out = tmp_path / "run"

    def no_memory(*a, **kw):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.00 GiB.")
    monkeypatch.setattr(startup_mod, "build_engine", no_memory)  # the forked child has it
    assert run(args(corpus, out, 2, 2, "zero.stage=0")) == EXIT_OUT_OF_MEMORY
    assert yaml.safe_load((out / RUN_CONFIG).read_text())["zero"]["stage"] == 0
    assert not (out / "checkpoints").exists()
    monkeypatch.undo()
    capfd.readouterr()
    assert run(args(corpus, out, 2, 2, "zero.stage=1")) == 0
    cap = capfd.readouterr()
    assert "holds a different run" not in cap.err
    assert yaml.safe_load((out / RUN_CONFIG).read_text())["zero"]["stage"] == 1
    assert (out / "checkpoints" / "latest").read_text() == checkpoint.tag_for(2)
    # 2 iterations, adapters.fraction 0.25: ceil(0.75 * 2) = 2, no adapter phase, and the
    # banner says so instead of "adapters from iter 2"
    assert "no adapter phase" in cap.out and "adapters from iter" not in cap.out
    # now the folder holds a checkpoint: the identity binds again (the ZeRO stage is layout,
    # which a rerun may change: tests/integration/test_layout_resume.py)
    assert run(args(corpus, out, 2, 2, "zero.stage=1", "train.seed=5")) == 2
    assert "holds a different run (train.seed: 1234 -> 5)" in capfd.readouterr().err


def test_run_config_binds_only_once_the_output_dir_holds_a_checkpoint(tmp_path, caplog):
    out = tmp_path / "run"
    first = load_config(None, [f"train.output_dir={out}", "model.num_layers=2"])
    record_run_config(check_output_dir(first, out), out, main=True)
    (out / "metrics.jsonl").write_text("")
    (out / "checkpoints").mkdir()
    (out / "checkpoints" / "iter_00000004").mkdir()  # a save that a kill interrupted
    before = sorted(p.name for p in out.rglob("*"))
    fixed = load_config(None, [f"train.output_dir={out}", "model.num_layers=3"])
    given = check_output_dir(fixed, out)  # no checkpoint: not refused
    with caplog.at_level(logging.INFO):
        record_run_config(given, out, main=True)
    assert yaml.safe_load((out / RUN_CONFIG).read_text())["model"]["num_layers"] == 3
    said = [r for r in caplog.records if RUN_CONFIG in r.getMessage()]
    assert len(said) == 1 and said[0].levelno == logging.INFO
    assert "holds no checkpoint" in said[0].getMessage()
    assert "model.num_layers: 2 -> 3" in said[0].getMessage()
    assert sorted(p.name for p in out.rglob("*")) == before  # nothing else touched
    caplog.clear()
    with caplog.at_level(logging.INFO):  # the same config again: nothing to say
        record_run_config(check_output_dir(fixed, out), out, main=True)
    assert not [r for r in caplog.records if RUN_CONFIG in r.getMessage()]
    # with a checkpoint (`latest`) the recorded run binds
    write_text_atomic(out / "checkpoints" / "latest", "iter_00000004")
    with pytest.raises(ConfigError, match=r"holds a different run \(model.num_layers: 3 -> 2\)"):
        check_output_dir(first, out)
    record_run_config(check_output_dir(fixed, out), out, main=True)
    assert yaml.safe_load((out / RUN_CONFIG).read_text())["model"]["num_layers"] == 3


# ---- 2. location-only keys -----------------------------------------------------------------

def test_where_the_data_cache_lives_is_not_part_of_the_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "run"
    (tmp_path / "corpus").mkdir()
    old = load_config(None, [f"train.output_dir={out}", "data.cache_dir=data_cache",
                             "data.path=corpus"])
    record_run_config(check_output_dir(old, out), out, main=True)
    (out / "checkpoints").mkdir()
    (out / "checkpoints" / "latest").write_text("iter_00000004")
    moved = load_config(None, [f"train.output_dir={out}",
                               f"data.cache_dir={tmp_path / 'elsewhere'}",
                               f"data.path={tmp_path / 'corpus'}"])  # the same folder
    check_output_dir(moved, out)  # not refused
    assert "data.cache_dir" not in identity_of(moved.to_dict())
    # manifests written while data.cache_dir was part of the identity still match
    new_ident = run_identity(moved, dp_size=1)
    old_ident = {**run_identity(old, dp_size=1), "data.cache_dir": "data_cache"}
    assert identity_diff(old_ident, new_ident) == []
    # ... while other data still is another run
    other = load_config(None, [f"train.output_dir={out}", "data.path=other_corpus"])
    with pytest.raises(ConfigError, match="data.path: 'corpus' -> 'other_corpus'"):
        check_output_dir(other, out)
    vocab = load_config(None, [f"train.output_dir={out}", "data.path=corpus",
                               "data.tokenizer_vocab_size=512"])
    with pytest.raises(ConfigError, match="data.tokenizer_vocab_size"):
        check_output_dir(vocab, out)


# ---- 3. train.iters changed on resume ------------------------------------------------------

@pytest.mark.slow
def test_changing_train_iters_on_resume_warns_and_switches_adapters_on(corpus, tmp_path,
                                                                        capfd):
    out = tmp_path / "run"
    # 12 iterations, adapters.fraction 0.25: adapters from iteration 9; saves at 4, 8, 12
    assert run(args(corpus, out, 12, 4)) == 0
    ckpts = out / "checkpoints"
    shutil.rmtree(ckpts / "iter_00000012")  # stopped after the save at 8, adapters still off
    (ckpts / "latest").write_text("iter_00000008")
    capfd.readouterr()
    # shortened to 9: its adapter phase starts at ceil(0.75 * 9) = 7, before the resume at 8
    assert run(args(corpus, out, 9, 4)) == 0
    cap = capfd.readouterr()
    warned = [line for line in cap.err.splitlines() if "train.iters" in line]
    assert len(warned) == 1, cap.err
    assert "train.iters changed from 12 to 9" in warned[0]
    assert "iteration 8" in warned[0] and "adapter phase starts now" in warned[0]
    assert "iter 8: lazy low-rank adapters switched on" in cap.out
    last = [r for r in metrics(out) if "loss" in r][-1]
    assert last["iter"] == 9 and last["adapters_active"]
    cfg9 = load_config(str(ROOT / "configs" / "demo.yaml"),
                       args(corpus, out, 9, 4)[3:])  # the run's own overrides
    assert last["lr"] == lr_at(cfg9, 8)  # the 9-iteration schedule from here on
    # extended to 10: the adapters, on since iteration 8, stay on
    assert run(args(corpus, out, 10, 4)) == 0
    cap = capfd.readouterr()
    warned = [line for line in cap.err.splitlines() if "train.iters" in line]
    assert len(warned) == 1 and "train.iters changed from 9 to 10" in warned[0]
    assert "already on since iteration 8" in warned[0]
    assert "switched on" not in cap.out
    last = [r for r in metrics(out) if "loss" in r][-1]
    assert last["iter"] == 10 and last["adapters_active"]


def test_the_previous_train_iters_comes_from_the_checkpoint_else_run_config():
    assert adapter_schedule.previous_train_iters({"train_iters": 12}, {"train": {"iters": 8}}) == 12
    assert adapter_schedule.previous_train_iters({"iteration": 4}, {"train": {"iters": 8}}) == 8
    assert adapter_schedule.previous_train_iters({"iteration": 4}, {}) is None


def test_train_iters_warning_names_old_and_new_and_what_follows():
    cfg = load_config(None, ["train.iters=12", "adapters.fraction=0.25",
                             "optimizer.warmup_iters=2"])
    said = adapter_schedule.iters_change_warning(cfg, old_iters=8, start=8, skipped=0,
                                            adapters_on=False, adapters_since=None)
    assert said.startswith("warning: train.iters changed from 8 to 12 on resume at "
                           "iteration 8")
    old = load_config(None, ["train.iters=8", "adapters.fraction=0.25",
                             "optimizer.warmup_iters=2"])
    assert f"lr {lr_at(old, 8):.2e} on the old schedule -> {lr_at(cfg, 8):.2e}" in said
    assert "the adapter phase starts at iteration 9" in said
    on = adapter_schedule.iters_change_warning(cfg, 8, 8, 0, adapters_on=True, adapters_since=None)
    assert "already on since iteration 6" in on  # the old total's switch point
    assert adapter_schedule.iters_change_warning(cfg, 12, 8, 0, False, None) is None
    short = load_config(None, ["train.iters=9", "adapters.fraction=0.05"])
    assert "no adapter phase" in adapter_schedule.iters_change_warning(short, 12, 8, 0, False, None)


def test_the_banner_says_when_there_is_no_adapter_phase():
    phase = adapter_schedule.adapter_phase
    assert phase(load_config(None, ["train.iters=100", "adapters.fraction=0.1"])) == \
        "adapters from iter 90"
    none = phase(load_config(None, ["train.iters=50", "adapters.fraction=0.01"]))
    assert none.startswith("no adapter phase") and "0.01" in none and "50" in none
    assert "adapters from" not in none
    assert "adapters.enabled=false" in phase(load_config(None, ["adapters.enabled=false"]))
    assert "dense" in phase(load_config(None, ["sparsity.enabled=false"]))


# ---- 4. pruning around a corrupt checkpoint ------------------------------------------------

def _fake_checkpoint(ckpts: Path, iteration: int) -> Path:
    tag_dir = ckpts / checkpoint.tag_for(iteration)
    tag_dir.mkdir(parents=True)
    (tag_dir / "mp_rank_00_model_states.pt").write_bytes(bytes(range(64)) * 4)
    (tag_dir / "rng_rank0.pt").write_bytes(b"rng" * 10)
    checkpoint.write_manifest(tag_dir, {})
    write_text_atomic(ckpts / "latest", tag_dir.name)
    return tag_dir


def test_a_checkpoint_that_fails_verification_is_set_aside_not_kept_over_good_ones(
        tmp_path, capfd):
    ckpts = tmp_path / "checkpoints"
    for i in (3, 6, 8):
        _fake_checkpoint(ckpts, i)
    checkpoint.prune(ckpts, keep=2)
    assert tags(tmp_path) == ["iter_00000006", "iter_00000008"]
    victim = ckpts / "iter_00000008" / "mp_rank_00_model_states.pt"
    data = bytearray(victim.read_bytes())
    data[100] ^= 0xFF  # one flipped byte: same size, another sha256
    victim.write_bytes(bytes(data))
    capfd.readouterr()
    assert checkpoint.choose(ckpts, None) == "iter_00000006"
    err = capfd.readouterr().err
    assert "resuming from the previous complete checkpoint iter_00000006" in err
    moved = [line for line in err.splitlines() if "iter_00000008.corrupt" in line]
    assert len(moved) == 1
    assert (ckpts / "iter_00000008.corrupt" / victim.name).read_bytes() == bytes(data)
    _fake_checkpoint(ckpts, 9)  # the next save
    checkpoint.prune(ckpts, keep=2)
    assert tags(tmp_path) == ["iter_00000006", "iter_00000008.corrupt", "iter_00000009"]


def test_prune_counts_only_checkpoints_whose_files_match_their_manifest(tmp_path, capfd):
    ckpts = tmp_path / "checkpoints"
    for i in (2, 4, 6):
        _fake_checkpoint(ckpts, i)
    (ckpts / "iter_00000005").mkdir()  # an interrupted save (no manifest)
    truncated = ckpts / "iter_00000006" / "rng_rank0.pt"
    truncated.write_bytes(truncated.read_bytes()[:5])
    _fake_checkpoint(ckpts, 8)
    capfd.readouterr()
    checkpoint.prune(ckpts, keep=2)
    err = capfd.readouterr().err
    # 6 is damaged: set aside, not counted; 4 and 8 are the two newest good ones; the
    # leftover 5 is newer than the oldest kept one and waits; 2 goes
    assert tags(tmp_path) == ["iter_00000004", "iter_00000005", "iter_00000006.corrupt",
                              "iter_00000008"]
    assert len([line for line in err.splitlines() if ".corrupt" in line]) == 1
    assert "rng_rank0.pt has 5 bytes" in err
    _fake_checkpoint(ckpts, 10)
    checkpoint.prune(ckpts, keep=2)
    assert tags(tmp_path) == ["iter_00000006.corrupt", "iter_00000008", "iter_00000010"]
    _fake_checkpoint(ckpts, 12)
    (ckpts / "iter_00000010" / "rng_rank0.pt").unlink()
    shutil.copytree(ckpts / "iter_00000008", ckpts / "iter_00000006")  # a damaged 6 again:
    (ckpts / "iter_00000006" / "rng_rank0.pt").write_bytes(b"")  # set aside under a 2nd name
    checkpoint.prune(ckpts, keep=2)
    assert tags(tmp_path) == ["iter_00000006.corrupt", "iter_00000006.corrupt.1",
                              "iter_00000008", "iter_00000010.corrupt", "iter_00000012"]


@pytest.mark.slow
def test_pruning_after_a_fallback_keeps_the_good_checkpoint(corpus, tmp_path, capfd):
    """The newest checkpoint has a flipped byte, the rerun (extended,
    so its next save is at another iteration) falls back; the save after that must keep the
    fallback and set the corrupt one aside."""
    out = tmp_path / "run"
    assert run(args(corpus, out, 8, 3)) == 0  # saves at 3, 6, 8; keeps 6 and 8
    assert tags(out) == ["iter_00000006", "iter_00000008"]
    victim = out / "checkpoints" / "iter_00000008" / "mp_rank_00_model_states.pt"
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    capfd.readouterr()
    assert run(args(corpus, out, 9, 3)) == 0  # resumes at 6, saves at 9
    err = capfd.readouterr().err
    assert "resuming from the previous complete checkpoint iter_00000006" in err
    assert "iter_00000008.corrupt" in err
    assert tags(out) == ["iter_00000006", "iter_00000008.corrupt", "iter_00000009"]
    assert checkpoint.verify(out / "checkpoints" / "iter_00000006", None) == []
    assert (out / "checkpoints" / "iter_00000008.corrupt" / victim.name).read_bytes() == \
        bytes(data)
