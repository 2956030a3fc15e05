"""The log window across a resume, evaluation and checkpoint saves, and the end-of-run sample.

- A checkpoint inside a log interval (train.save_interval not a multiple of
  train.log_interval) resumes into the same window: the metrics equal an uninterrupted run's
  (CPU fp32: bitwise), on one rank and on two (each rank's own loss sum comes back). An
  older checkpoint, without the window in its client state, still resumes (empty window).
- tokens_per_s and mfu count training time only: a slow evaluation or checkpoint save does
  not depress the window it falls in; eval records say how long the evaluation took.
- A failing end-of-run sample is one warning line; the finished run still exits 0.

Runs are fork-started children of this process (tests/helpers/forked_runs.py) that call
launch/pretrain.py's main(); a kill is injected through SLOPE_FAULT, a slow save or eval
and a failing sampler by monkeypatching before the fork (the children inherit it).
"""
from __future__ import annotations

import json
import signal
import time
import warnings
from pathlib import Path

import pytest
from helpers.corpus import tiny_run_args, write_corpus
from helpers.forked_runs import launch

from slope_megatron.training import checkpoint, loop
from slope_megatron.training.metrics import LogWindow

ITERS = 8
WALL_CLOCK = {"tokens_per_s", "time_s", "mfu", "eval_s"}
TOKENS_PER_ITER = 8 * 32  # tiny_run_args: global batch 8, seq_len 32


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("corpus"))


def args(corpus, out, *extra) -> list[str]:
    """Log every 2 iterations, save every 3 (3, 6, 8), evaluate at 4 and 8."""
    return tiny_run_args(corpus, corpus.parent / "cache", out, ITERS, 3,
                         "train.log_interval=2", "model.dropout=0.1", *extra)


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def comparable(out: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in WALL_CLOCK} for r in records(out)]


def killed_after_iteration_3_and_rerun(argv, out: Path, world: int = 1) -> None:
    """Killed in iteration 5 (0-based 4): the newest checkpoint is iteration 3's, inside the
    log window 3-4; then rerun with the same command."""
    codes = launch(argv, world, "kill:after_backward:iter=4" + (",rank=1" if world > 1 else ""))
    assert -signal.SIGKILL in codes
    assert checkpoint.latest_tag(out / "checkpoints") == checkpoint.tag_for(3)
    assert launch(argv, world) == [0] * world


@pytest.mark.slow
@pytest.mark.parametrize("world,layout", [(1, ()), (2, ("zero.stage=2",))], ids=["1", "dp2"])
def test_resume_inside_a_log_window_logs_what_an_uninterrupted_run_does(corpus, tmp_path,
                                                                         world, layout):
    ref, out = tmp_path / "reference", tmp_path / "resumed"
    assert launch(args(corpus, ref, *layout), world) == [0] * world
    killed_after_iteration_3_and_rerun(args(corpus, out, *layout), out, world)
    got, want = comparable(out), comparable(ref)
    assert [r["iter"] for r in got if "loss" in r] == [2, 4, 6, 8]
    assert got == want  # iteration 4's loss averages iterations 3 and 4, as uninterrupted
    times = [r["time_s"] for r in records(out) if "time_s" in r]
    assert times == sorted(times)  # time_s continues from the checkpoint's
    # the window's training seconds came back too: 3-4's throughput is no outlier (with
    # only iteration 4's time but both iterations' tokens it would be about twice the rest)
    tps = {r["iter"]: r["tokens_per_s"] for r in records(out) if "tokens_per_s" in r}
    assert tps[4] < 1.6 * max(tps[2], tps[6], tps[8]), tps


@pytest.mark.slow
def test_an_older_checkpoint_without_the_log_window_still_resumes(corpus, tmp_path,
                                                                  monkeypatch):
    save = checkpoint.save

    def save_as_before(engine, ckpt_dir, iteration, client_state, *rest, **kw):
        old = {k: v for k, v in client_state.items() if k not in ("log_window", "time_s")}
        return save(engine, ckpt_dir, iteration, old, *rest, **kw)

    out = tmp_path / "run"
    argv = args(corpus, out)
    monkeypatch.setattr(checkpoint, "save", save_as_before)
    assert launch(argv, 1, "kill:after_backward:iter=4") == [-signal.SIGKILL]
    monkeypatch.undo()
    assert launch(argv, 1) == [0]
    train = [r for r in records(out) if "loss" in r]
    assert [r["iter"] for r in train] == [2, 4, 6, 8]  # iteration 4's: iteration 4 alone


SLOW = 2.0  # seconds a patched save or evaluation takes; a training window takes far less


@pytest.mark.slow
@pytest.mark.parametrize("log_interval", [2, 3])  # eval and save at a window's end / inside
def test_a_slow_save_or_eval_does_not_depress_the_throughput(corpus, tmp_path, monkeypatch,
                                                              log_interval):
    save, evaluate = checkpoint.save, loop.eval_loss

    def slow_save(engine, ckpt_dir, iteration, *rest, **kw):
        if iteration == 4:
            time.sleep(SLOW)
        return save(engine, ckpt_dir, iteration, *rest, **kw)

    def slow_eval(*a, **kw):
        time.sleep(SLOW)
        return evaluate(*a, **kw)

    monkeypatch.setattr(checkpoint, "save", slow_save)
    monkeypatch.setattr(loop, "eval_loss", slow_eval)
    out = tmp_path / "run"
    argv = tiny_run_args(corpus, corpus.parent / "cache", out, ITERS, 4,
                         f"train.log_interval={log_interval}")
    assert launch(argv, 1) == [0]
    train = [r for r in records(out) if "tokens_per_s" in r]
    last = 0
    for r in train:  # each window's seconds, as its tokens_per_s implies: training only
        seconds = TOKENS_PER_ITER * (r["iter"] - last) / r["tokens_per_s"]
        assert seconds < SLOW / 2, (r["iter"], seconds)
        last = r["iter"]
    evals = [r for r in records(out) if "val_loss" in r]
    assert [r["iter"] for r in evals] == [4, 8] and all(r["eval_s"] >= SLOW for r in evals)
    by_iter = {r["iter"]: r["time_s"] for r in train}
    assert by_iter[ITERS] - by_iter[train[0]["iter"]] > 2 * SLOW  # time_s: wall clock (4's)


@pytest.mark.slow
def test_a_failing_end_of_run_sample_is_one_warning(corpus, tmp_path, monkeypatch, capfd):
    def broken(tag_dir, *a, **kw):
        raise RuntimeError("sampler exploded")

    monkeypatch.setattr(loop, "sample_from_checkpoint", broken)
    capfd.readouterr()
    assert launch(tiny_run_args(corpus, corpus.parent / "cache", tmp_path / "run", 2, 2), 2) \
        == [0, 0]
    err = capfd.readouterr().err
    warned = [line for line in err.splitlines() if "sampler exploded" in line]
    assert len(warned) == 1 and warned[0].startswith("warning: "), err[-2000:]
    assert "Traceback" not in err
    assert [r["iter"] for r in records(tmp_path / "run") if "loss" in r] == [1, 2]


@pytest.mark.slow
def test_the_end_of_run_sample_fits_a_short_context(corpus, tmp_path):
    """The demo's sample asks for 48 new tokens; a 32-token model gets what fits, quietly
    (no generation warning about the context)."""
    from slope_megatron.training.checkpoint import sample_from_checkpoint

    assert launch(tiny_run_args(corpus, corpus.parent / "cache", tmp_path / "run", 2, 2), 1) \
        == [0]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        text = sample_from_checkpoint(tmp_path / "run" / "checkpoints" / "iter_00000002")
    assert text.startswith("The") and len(text) > len("The")
    assert not [str(w.message) for w in caught if "context" in str(w.message)]


# ---- the window alone -------------------------------------------------------------------

def test_the_window_round_trips_through_the_client_state():
    w = LogWindow(since=100.0)
    w.add(2.5, applied=True)
    w.add(float("nan"), applied=False)
    w.add(1.25, applied=True)
    w.exclude(3.0)  # an evaluation
    state = w.state(110.0, [3.75, 4.0])
    assert state == {"loss_sums": [3.75, 4.0], "steps": 2, "iters": 3, "seconds": 7.0}
    back = LogWindow.restore(state, rank=1, world=2, now=200.0)
    assert (back.loss_sum, back.steps, back.iters) == (4.0, 2, 3)
    assert back.elapsed(201.0) == 8.0  # the saved run's 7 s, then this run's clock
    other_world = LogWindow.restore(state, rank=0, world=4, now=0.0)
    assert other_world.loss_sum == 3.875  # the mean: the all-reduced mean stays the same
    assert LogWindow.restore(None, 0, 1, now=5.0) == LogWindow(since=5.0)  # older checkpoint
    w.reset(300.0)
    assert w == LogWindow(since=300.0)
