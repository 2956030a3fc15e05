"""One run at a time in a train.output_dir, and an output directory whose layout is wrong is
refused before the first iteration.

Two copies of one command into one directory used to interleave their metrics and crash on
each other's half-written checkpoints; a file named `checkpoints` was found only at the first
save, after the training before it (and the rerun had already cut metrics.jsonl back).
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest
from helpers.forked_runs import launch, start, wait
from helpers.tmpfs import tmpfs
from helpers.stops import last_iter, records, stop_args

from slope_megatron.errors import EXIT_STOPPED_BY_SIGNAL, EXIT_USER_ERROR
from slope_megatron.training import checkpoint, run_lock


def _wait_for_training(out, pids, at_least=2, timeout=60.0):
    deadline = time.time() + timeout
    while last_iter(out) < at_least:
        assert time.time() < deadline, "the first run did not start training"
        assert all(os.waitpid(p, os.WNOHANG) == (0, 0) for p in pids), "the first run ended"
        time.sleep(0.05)


@pytest.mark.slow
def test_a_second_run_into_a_busy_directory_stops_at_once_naming_the_holder(stop_corpus,
                                                                           tmp_path, capfd):
    out = tmp_path / "run"
    argv = stop_args(stop_corpus, out, iters=400)
    first = start(argv, 1, "pause:after_step:iter=2")  # holds its directory, paused at iter 3
    try:
        _wait_for_training(out, first)
        capfd.readouterr()
        began = time.time()
        assert launch(argv, 1, timeout=60) == [EXIT_USER_ERROR]
        took, err = time.time() - began, capfd.readouterr().err
        assert f"is in use by another run (pid {first[0]} on host {socket.gethostname()}, " \
               f"started " in err and "Traceback" not in err
        assert took < 15  # at once: before the data, the model and any write
        os.kill(first[0], signal.SIGTERM)  # the holder goes on, and saves when told to stop
        assert wait(first, 60) == [EXIT_STOPPED_BY_SIGNAL]
    finally:
        for pid in first:
            with _ignore_gone():
                os.kill(pid, signal.SIGKILL)
    iters = [r["iter"] for r in records(out) if "loss" in r]
    assert iters == [1, 2, 3]  # one run's records, in order, once
    assert checkpoint.latest_tag(out / "checkpoints") == checkpoint.tag_for(3)


class _ignore_gone:
    def __enter__(self):
        return self

    def __exit__(self, kind, value, tb):
        return kind is ProcessLookupError


def test_the_lock_of_a_killed_holder_is_free_at_once_and_names_the_live_one(tmp_path):
    """kill -9 of the holder: the kernel drops a POSIX lock with its process, so nothing has
    to be cleaned up by hand; a live holder is named."""
    out = tmp_path / "run"
    code = ("import sys, time; from pathlib import Path; "
            "from slope_megatron.training import run_lock; "
            "run_lock.acquire(Path(sys.argv[1])); print('locked', flush=True); time.sleep(60)")
    holder = subprocess.Popen([sys.executable, "-c", code, str(out)], stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(run_lock.RunDirectoryInUse, match=f"pid {holder.pid} on host"):
            run_lock.acquire(out)
        holder.kill()
        holder.wait(10)
        run_lock.acquire(out)  # no stale lock to remove
    finally:
        holder.kill()
        run_lock.release_all()
    assert (out / run_lock.LOCK_NAME).is_file()  # kept (not removed while others may open it)


def test_a_start_that_wrote_nothing_leaves_no_directory_behind(tmp_path):
    out = tmp_path / "new" / "run"
    run_lock.acquire(out)
    run_lock.release_all()
    assert not out.exists()


@pytest.mark.slow
def test_a_file_named_checkpoints_is_refused_before_the_first_iteration(stop_corpus,
                                                                        uninterrupted, tmp_path,
                                                                        capfd):
    out = tmp_path / "run"
    shutil.copytree(uninterrupted(1), out)
    shutil.rmtree(out / "checkpoints")
    (out / "checkpoints").write_text("not a directory")
    before = (out / "metrics.jsonl").read_bytes()
    capfd.readouterr()
    assert launch(stop_args(stop_corpus, out), 1) == [EXIT_USER_ERROR]
    err = capfd.readouterr().err
    assert "holds a file named 'checkpoints' where the run writes its checkpoints" in err
    assert "Traceback" not in err
    assert (out / "metrics.jsonl").read_bytes() == before  # not cut back: nothing ran


@pytest.mark.slow
def test_a_read_only_output_directory_is_refused_before_the_data(stop_corpus, tmp_path, capfd):
    """Root may write anywhere, but not on a read-only file system: said before any work."""
    with tmpfs(tmp_path / "ro", "ro,size=64k") as out:
        capfd.readouterr()
        assert launch(stop_args(stop_corpus, out / "run"), 1) == [EXIT_USER_ERROR]
        err = capfd.readouterr().err
        assert f"error: train.output_dir '{out / 'run'}' is not writable (a read-only file " \
               f"system); choose another directory" in err, err[-2000:]
        assert "Traceback" not in err
