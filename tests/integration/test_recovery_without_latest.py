"""A lost or dangling `checkpoints/latest` costs nothing: the newest sealed checkpoint that
verifies is found by scanning, and nothing that holds a verified checkpoint is deleted or cut
back by a run that did not load it.

`rm checkpoints/latest` and the same command used to start from iteration 1, empty
metrics.jsonl and overwrite the complete checkpoints when it reached them; the error for a
`latest` naming a missing directory told users to remove it, which led to the same loss.
"""
from __future__ import annotations

import shutil

import pytest
from helpers.forked_runs import launch
from helpers.stops import comparable, stop_args

from slope_megatron.training import checkpoint
from slope_megatron.training.checkpoint import CheckpointError, LATEST, tag_for


@pytest.fixture(scope="module")
def killed_after_8(stop_corpus, tmp_path_factory):
    """A run killed in iteration 10 of 12: complete checkpoints 4 and 8, `latest` = 8."""
    out = tmp_path_factory.mktemp("killed") / "run"
    assert launch(stop_args(stop_corpus, out), 1, "kill:after_step:iter=9") == [-9]
    assert checkpoint.latest_tag(out / "checkpoints") == tag_for(8)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("damage, said", [
    ("missing", "checkpoints/latest is missing"),
    ("dangling", "names 'iter_00000099', which is not a checkpoint here"),
])
def test_without_a_usable_latest_the_rerun_resumes_from_the_newest_verified_checkpoint(
        stop_corpus, uninterrupted, killed_after_8, tmp_path, capfd, damage, said):
    out = tmp_path / "run"
    shutil.copytree(killed_after_8, out)
    latest = out / "checkpoints" / LATEST
    if damage == "missing":
        latest.unlink()
    else:
        latest.write_text(tag_for(99))
    capfd.readouterr()
    assert launch(stop_args(stop_corpus, out), 1) == [0]
    cap = capfd.readouterr()
    assert said in cap.err and f"resuming from the newest verified checkpoint, {tag_for(8)}" \
        in cap.err
    assert f"resumed from {out / 'checkpoints' / tag_for(8)} (iteration 8)" in cap.out
    assert comparable(out) == comparable(uninterrupted(1))  # bitwise, nothing redone


def test_a_dangling_latest_with_no_checkpoint_left_is_refused_without_advice_that_loses_data(
        tmp_path):
    ckpts = tmp_path / "checkpoints"
    ckpts.mkdir()
    (ckpts / LATEST).write_text(tag_for(20))
    with pytest.raises(CheckpointError) as e:
        checkpoint.choose(ckpts, None)
    assert "restore the checkpoints, or start over in a new train.output_dir" in str(e.value)
    assert "remove" not in str(e.value)


def test_a_sealed_checkpoint_in_the_way_of_a_save_is_set_aside_not_deleted(tmp_path, capfd):
    """Defensive: a save never deletes a complete checkpoint it did not load."""
    from slope_megatron.training.checkpoint import MANIFEST, store

    tag_dir = tmp_path / "checkpoints" / tag_for(6)
    tag_dir.mkdir(parents=True)
    (tag_dir / MANIFEST).write_text('{"files": {}}')
    store._clear_for_save(tag_dir)
    assert not tag_dir.exists()
    assert (tag_dir.parent / f"{tag_for(6)}{checkpoint.UNLOADED_SUFFIX}" / MANIFEST).is_file()
    assert "moved it to iter_00000006.unloaded" in capfd.readouterr().err
