"""SIGTERM, SIGINT and SIGUSR1 stop a run after it saved the iteration it was in.

A scheduler's SIGTERM (pre-emption, the time limit), Ctrl-C and SLURM's early SIGUSR1 used to
throw away every iteration since the last checkpoint. Now every rank finishes the iteration,
the same one on every rank (even when only one rank got the signal), saves it, prints one
line and exits 75; the rerun continues exactly where the uninterrupted run would be.
Signals are sent by fault injection (`signal:<point>:iter=N`), mid-step, so the iteration
they arrive in is known; the ranks are fork-started children of this process.
"""
from __future__ import annotations

import pytest
from helpers.forked_runs import launch
from helpers.stops import comparable, last_iter, stop_args

from slope_megatron.errors import EXIT_STOPPED_BY_SIGNAL
from slope_megatron.training import checkpoint

STOPPED = EXIT_STOPPED_BY_SIGNAL


@pytest.mark.slow
@pytest.mark.parametrize("fault, saved, name", [
    ("signal:after_backward:iter=5", 6, "SIGTERM"),  # mid-step, between two saves
    ("signal:after_backward:iter=7,sig=SIGINT", 8, "SIGINT"),  # in an iteration that saves
])
def test_a_signal_saves_the_iteration_it_arrived_in_and_the_rerun_continues_bitwise(
        stop_corpus, uninterrupted, tmp_path, capfd, fault, saved, name):
    out = tmp_path / "run"
    capfd.readouterr()
    assert launch(stop_args(stop_corpus, out), 1, fault) == [STOPPED]
    err = capfd.readouterr().err
    assert f"saved iter {saved} on {name}; rerun the same command to resume" in err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    ckpts = out / "checkpoints"
    assert checkpoint.latest_tag(ckpts) == checkpoint.tag_for(saved)
    assert checkpoint.verify(ckpts / checkpoint.tag_for(saved), None) == []
    assert last_iter(out) == saved  # it stopped right there
    assert launch(stop_args(stop_corpus, out), 1) == [0]  # the same command
    assert comparable(out) == comparable(uninterrupted(1))  # losses, lr, val loss: bitwise


@pytest.mark.slow
def test_one_rank_signalled_stops_every_rank_at_the_same_iteration(stop_corpus, uninterrupted,
                                                                  tmp_path, capfd):
    out = tmp_path / "run"
    capfd.readouterr()
    fault = "signal:after_backward:iter=5,rank=1,sig=SIGUSR1"  # SLURM's --signal=USR1@...
    assert launch(stop_args(stop_corpus, out), 2, fault) == [STOPPED, STOPPED]
    err = capfd.readouterr().err
    assert "saved iter 6 on SIGUSR1 on rank 1; rerun the same command to resume" in err
    assert err.count("saved iter 6") == 1  # one line, from rank 0
    assert checkpoint.latest_tag(out / "checkpoints") == checkpoint.tag_for(6)
    assert launch(stop_args(stop_corpus, out), 2) == [0, 0]
    assert comparable(out) == comparable(uninterrupted(2))


@pytest.mark.slow
def test_without_checkpoints_a_signal_stops_and_says_nothing_was_saved(stop_corpus, tmp_path,
                                                                        capfd):
    out = tmp_path / "run"
    capfd.readouterr()
    argv = stop_args(stop_corpus, out, "train.save_interval=0")
    assert launch(argv, 1, "signal:after_backward:iter=2") == [STOPPED]
    err = capfd.readouterr().err
    assert "stopped after iter 3 on SIGTERM; train.save_interval=0, so nothing was saved" in err
    assert not (out / "checkpoints").exists()
