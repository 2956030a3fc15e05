"""A full disk costs one line and nothing else: the half-written checkpoint is removed, the
previous one and `latest` stay as they were, metrics.jsonl keeps its lines, a rerun before
space is freed stops before training, and the run resumes exactly once there is room.

Before, a disk that filled during a checkpoint write gave ~30 lines of torch traceback
("basic_ios::clear: iostream error", "unexpected pos ...") with no word about the disk, and
the rerun died with OSError [Errno 28] in metrics.py. The disk here is a real tmpfs (mounted
as root), sized so that the third checkpoint of the run does not fit.
"""
from __future__ import annotations


import pytest
from helpers.forked_runs import launch
from helpers.tmpfs import resize, tmpfs
from helpers.stops import comparable, records, stop_args

from slope_megatron.disk_space import dir_bytes
from slope_megatron.errors import EXIT_USER_ERROR
from slope_megatron.training import checkpoint
from slope_megatron.training.checkpoint import tag_for


@pytest.fixture
def small_disk(tmp_path):
    """A tmpfs mounted at tmp_path/disk; `resize(bytes)` grows it. Unmounted afterwards."""
    with tmpfs(tmp_path / "disk") as disk:
        yield disk, lambda size: resize(disk, size)


@pytest.mark.slow
def test_a_disk_that_fills_during_a_save_costs_one_line_and_the_run_resumes_exactly(
        stop_corpus, uninterrupted, small_disk, capfd):
    disk, resize = small_disk
    reference = uninterrupted(1)
    size = dir_bytes(reference / "checkpoints" / tag_for(8))
    resize(int(2.5 * size) + (64 << 10))  # two checkpoints and the rest fit, a third does not
    out = disk / "run"
    argv = stop_args(stop_corpus, out)
    capfd.readouterr()
    assert launch(argv, 1) == [EXIT_USER_ERROR]
    err = capfd.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
    assert lines[0].startswith(f"error: no space left on device writing {out}/checkpoints/"
                               f"{tag_for(12)}/")
    assert lines[0].endswith(": free space or set train.output_dir elsewhere")
    ckpts = out / "checkpoints"
    assert checkpoint.latest_tag(ckpts) == tag_for(8)
    assert checkpoint.verify(ckpts / tag_for(8), None) == []  # the previous one is intact
    assert not (ckpts / tag_for(12)).exists()  # nothing half-written left behind
    assert not list(out.rglob(".tmp-*"))
    kept = records(out)
    assert kept and all(r["iter"] <= 12 for r in kept)

    capfd.readouterr()  # a rerun before space is freed: refused before any iteration
    assert launch(argv, 1) == [EXIT_USER_ERROR]
    err = capfd.readouterr().err
    assert "error: no space left on device for the next checkpoint (as large as " \
           f"{tag_for(8)})" in err and "free space or set train.output_dir elsewhere" in err
    assert records(out) == kept  # metrics.jsonl not cut back by the refused run

    resize(int(6 * size))  # space freed
    assert launch(argv, 1) == [0]
    assert comparable(out) == comparable(reference)  # resumed from iter 8, bitwise


def test_a_disk_already_full_stops_a_run_before_any_work(small_disk):
    from slope_megatron.disk_space import NoSpaceError
    from slope_megatron.training.run_dir import probe_writes

    disk, _ = small_disk
    out = disk / "run"
    out.mkdir()
    with pytest.raises(OSError):
        (disk / "filler").write_bytes(b"\0" * (1 << 20))  # more than the 64 KiB there
    with pytest.raises(NoSpaceError, match=f"no space left on device writing {out}/.tmp-probe"):
        probe_writes(out)
    assert sorted(p.name for p in out.iterdir()) == []  # the probe is gone again
