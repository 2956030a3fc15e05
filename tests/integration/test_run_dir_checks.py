"""What a run checks about its output directory before any work, and who prints an error.

- A dir holding a checkpoint binds a rerun through the checkpoint's manifest identity too, so
  a dir whose run_config.yaml is gone is not taken over by a run of other settings (which
  would write its own run_config.yaml and lock the original settings out of their own dir);
  a changed data-parallel size under ZeRO 1-3 is refused before the data or the engine.
- train.output_dir must be (or become) a directory.
- An error raised on one non-zero rank alone is printed by that rank; an error every rank
  raises is printed once.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path

import pytest
import torch
from helpers.corpus import tiny_run_args, write_corpus
from helpers.forked_runs import launch
from helpers.launch import load_launch

from slope_megatron.config import ConfigError, load_config
from slope_megatron.data import DataError
from slope_megatron.io import sha256_file
from slope_megatron.training import checkpoint
from slope_megatron.training.checkpoint import CheckpointError
from slope_megatron.training.run_dir import RUN_CONFIG, check_output_dir, record_run_config
from slope_megatron.training.run_identity import run_identity


def _errors(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("error:")]


# ---- the manifest's identity binds a rerun (unit) ------------------------------------------

def _sealed(out: Path, identity: dict, iteration: int = 2) -> Path:
    """A checkpoint dir as a save leaves it: a manifest holding `identity`, `latest`."""
    tag_dir = out / "checkpoints" / checkpoint.tag_for(iteration)
    tag_dir.mkdir(parents=True)
    (tag_dir / checkpoint.MANIFEST).write_text(json.dumps({"format": 1, "identity": identity,
                                                           "files": {}}))
    (out / "checkpoints" / checkpoint.LATEST).write_text(tag_dir.name)
    return tag_dir


def test_without_run_config_the_checkpoints_identity_binds_a_rerun(tmp_path):
    out = tmp_path / "run"
    first = load_config(None, [f"train.output_dir={out}", "model.hidden_size=32"])
    saved = run_identity(first, 1)
    saved["model.vocab_size"] = 320  # the trainer records the tokenizer's, set after the data
    tag_dir = _sealed(out, saved)
    other = load_config(None, [f"train.output_dir={out}", "model.hidden_size=48"])
    with pytest.raises(CheckpointError, match=r"checkpoint .*iter_00000002 belongs to a "
                       r"different run \(model.hidden_size: 32 \(checkpoint\) vs 48 \(this "
                       r"run\)\); use a new train.output_dir or the original settings"):
        check_output_dir(other, out)
    assert not (out / RUN_CONFIG).exists()
    # an explicit vocabulary is compared at once (an unset one after the data is prepared)
    with pytest.raises(CheckpointError, match=r"model.vocab_size: 320 \(checkpoint\) vs 384"):
        check_output_dir(load_config(None, [f"train.output_dir={out}", "model.hidden_size=32",
                                            "model.vocab_size=384"]), out)
    record_run_config(check_output_dir(first, out), out, main=True)  # the original: resumes
    (out / RUN_CONFIG).unlink()
    # a damaged newest manifest: the load would verify the previous checkpoint, so its counts
    (tag_dir / checkpoint.MANIFEST).write_text("{trunc")
    _sealed(out, {**saved, "model.hidden_size": 48}, iteration=1)
    (out / "checkpoints" / checkpoint.LATEST).write_text(tag_dir.name)
    check_output_dir(other, out, dp_size=1)
    with pytest.raises(CheckpointError, match="iter_00000001 belongs to a different run"):
        check_output_dir(first, out)


def test_a_changed_layout_is_no_other_run_but_a_changed_identity_is(tmp_path):
    """The DP size, ZeRO stage and TP / PP sizes say how the files are cut: a rerun with other
    ones passes the output-dir checks (start-up then converts the checkpoint:
    training/layout_resume.py); the run's identity still binds."""
    out = tmp_path / "run"
    cfg = load_config(None, [f"train.output_dir={out}", "zero.stage=2"])
    _sealed(out, run_identity(cfg, 2))
    record_run_config(cfg.to_dict(), out, main=True)  # with its run_config.yaml, as a run has
    check_output_dir(cfg, out, dp_size=2)
    for dp in (1, None):  # None: the process group's (none here: one process)
        check_output_dir(cfg, out, dp_size=dp)
    for layout in ("zero.stage=1", "parallel.tensor=2", "parallel.pipeline=2"):
        check_output_dir(load_config(None, [f"train.output_dir={out}", layout]), out, dp_size=1)
    with pytest.raises(ConfigError, match=r"holds a different run \(train.seed: 1234 -> 5\)"):
        check_output_dir(load_config(None, [f"train.output_dir={out}", "zero.stage=2",
                                            "train.seed=5"]), out, dp_size=2)
    (out / RUN_CONFIG).unlink()  # the checkpoint's manifest says the same
    with pytest.raises(CheckpointError, match=r"train.seed: 1234 \(checkpoint\) vs 5"):
        check_output_dir(load_config(None, [f"train.output_dir={out}", "train.seed=5"]), out,
                         dp_size=1)


# ---- train.output_dir must be a directory (unit) -------------------------------------------

def test_an_output_dir_that_is_or_lies_beneath_a_file_is_refused(tmp_path):
    afile = tmp_path / "notes.txt"
    afile.write_text("keep me")
    for out, what in ((afile, r"is a file, not a directory"),
                      (afile / "run", r"cannot be created: '.*notes.txt' is a file"),
                      (afile / "a" / "b", r"cannot be created: '.*notes.txt' is a file")):
        cfg = load_config(None, [f"train.output_dir={out}"])
        with pytest.raises(ConfigError, match=f"train.output_dir '{out}' {what}"):
            check_output_dir(cfg, out)
    link = tmp_path / "dangling"
    link.symlink_to(tmp_path / "gone")
    with pytest.raises(ConfigError, match="is a broken symbolic link"):
        check_output_dir(load_config(None, [f"train.output_dir={link}"]), link)
    assert afile.read_text() == "keep me"
    new = tmp_path / "new" / "run"  # a path that can be created is fine
    check_output_dir(load_config(None, [f"train.output_dir={new}"]), new)


# ---- who prints an error (unit) ------------------------------------------------------------

def test_which_errors_rank_0_prints_for_every_rank():
    every = load_launch("pretrain")._raised_on_every_rank
    from slope_megatron.training.loop import TrainingStopped

    assert every(ConfigError("x")) and every(TrainingStopped("x"))
    assert every(CheckpointError("no usable checkpoint"))  # verification: shared
    assert not every(DataError("x"))  # unless shared (distributed.share_failure marks those)
    shared = DataError("x")
    shared.every_rank = True
    assert every(shared)
    local = CheckpointError("x")
    local.every_rank = False
    assert not every(local)


def test_a_refused_file_is_marked_for_the_rank_that_read_it(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("true",))

    for name, every in (("zero_pp_rank_1_mp_rank_00_optim_states.pt", False),
                        ("mp_rank_01_model_states.pt", False),
                        ("mp_rank_00_model_states.pt", True)):
        torch.save({"evil": Evil()}, tmp_path / name)
        with pytest.raises(CheckpointError) as caught:
            checkpoint.safe_torch_load(tmp_path / name)
        assert caught.value.every_rank is every, name


# ---- end to end ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("corpus"))


def _args(corpus, out, cache=None, *extra):
    return tiny_run_args(corpus, cache or corpus.parent / "cache", out, 2, 2, *extra)


@pytest.fixture(scope="module")
def zero2_run(corpus, tmp_path_factory):
    """A finished 2-rank ZeRO-2 run (optimizer state in 2 partitions), checkpoint at 2."""
    out = tmp_path_factory.mktemp("zero2") / "run"
    assert launch(_args(corpus, out, None, "zero.stage=2"), 2) == [0, 0]
    return out


def _copy(run: Path, tmp_path: Path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(run, out)
    return out


@pytest.mark.slow
def test_a_refused_rerun_does_not_lock_the_original_settings_out(corpus, zero2_run, tmp_path,
                                                                 capfd):
    out = _copy(zero2_run, tmp_path)
    (out / RUN_CONFIG).unlink()  # lost, or never copied along with the checkpoints
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    fresh_cache = tmp_path / "other_cache"  # not an identity key; shows where it stopped
    capfd.readouterr()
    assert launch(_args(corpus, out, fresh_cache, "zero.stage=2",
                        "model.hidden_size=48"), 2) == [2, 2]
    err = capfd.readouterr().err
    assert len(_errors(err)) == 1 and "Traceback" not in err, err
    assert "belongs to a different run (model.hidden_size: 32 (checkpoint) vs 48 " \
           "(this run))" in _errors(err)[0]
    prepared = fresh_cache.exists()
    after = sorted(p.relative_to(out) for p in out.rglob("*"))
    # the original settings still resume (before the fix: "holds a different run": the
    # refused run had written its run_config.yaml)
    assert launch(tiny_run_args(corpus, corpus.parent / "cache", out, 4, 2,
                                "zero.stage=2"), 2) == [0, 0]
    said = capfd.readouterr()
    assert "resumed from" in said.out and not _errors(said.err), said.err
    assert (out / RUN_CONFIG).is_file()
    assert after == before  # the refused run wrote nothing
    assert not prepared  # and was refused before preparing any data


@pytest.mark.slow
def test_another_identity_stops_before_the_data_and_the_engine(corpus, zero2_run, tmp_path,
                                                               capfd):
    """(Another data-parallel size is no other run: it converts, test_layout_resume.py.)"""
    out = _copy(zero2_run, tmp_path)
    fresh_cache = tmp_path / "other_cache"
    capfd.readouterr()
    assert launch(_args(corpus, out, fresh_cache, "zero.stage=2", "train.iters=4",
                        "train.seed=5"), 1) == [2]
    cap = capfd.readouterr()
    assert _errors(cap.err) == [_errors(cap.err)[0]] and "Traceback" not in cap.err
    assert "holds a different run (train.seed: 1234 -> 5)" in cap.err
    assert not fresh_cache.exists() and "model:" not in cap.out  # no data, no engine


@pytest.mark.slow
def test_an_output_dir_beneath_a_file_is_one_error_line_on_every_rank(corpus, tmp_path,
                                                                      capfd):
    afile = tmp_path / "afile"
    afile.write_text("keep me")
    fresh_cache = tmp_path / "cache"
    capfd.readouterr()
    assert launch(_args(corpus, afile / "run", fresh_cache), 2) == [2, 2]
    err = capfd.readouterr().err
    assert _errors(err) == [f"error: train.output_dir '{afile / 'run'}' cannot be created: "
                            f"'{afile}' is a file, not a directory; choose another "
                            f"train.output_dir"], err
    assert "Traceback" not in err and not fresh_cache.exists()
    assert afile.read_text() == "keep me"


def _plant(tag_dir: Path, name: str) -> None:
    """Replace `name` in a checkpoint by a file holding pickled code, its manifest entry
    updated so that it verifies (as a crafted checkpoint would)."""
    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {tag_dir / 'pwned'}",))

    torch.save({"evil": Evil()}, tag_dir / name)
    manifest = json.loads((tag_dir / checkpoint.MANIFEST).read_text())
    manifest["files"][name] = {"size": (tag_dir / name).stat().st_size,
                               "sha256": sha256_file(tag_dir / name)}
    (tag_dir / checkpoint.MANIFEST).write_text(json.dumps(manifest))


@pytest.mark.slow
def test_an_error_on_one_non_zero_rank_is_printed_by_that_rank(corpus, zero2_run, tmp_path,
                                                               capfd):
    out = _copy(zero2_run, tmp_path)
    tag_dir = out / "checkpoints" / checkpoint.tag_for(2)
    shard = "zero_pp_rank_1_mp_rank_00_optim_states.pt"  # read by rank 1 alone
    _plant(tag_dir, shard)
    capfd.readouterr()
    codes = launch(tiny_run_args(corpus, corpus.parent / "cache", out, 4, 2, "zero.stage=2"), 2,
                   stop_on_error=True)  # rank 0 goes on alone, to wait for rank 1 in vain
    assert codes[1] == 2 and codes[0] in (-signal.SIGKILL, 1, 2), codes
    err = capfd.readouterr().err
    mine = [line for line in _errors(err) if shard in line]
    assert len(mine) == 1, err
    assert mine[0].startswith(f"error: rank 1: {tag_dir / shard} holds objects that are not "
                              f"plain tensors/data")
    assert not (tag_dir / "pwned").exists()
