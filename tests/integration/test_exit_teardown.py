"""End-of-run teardown (slope_megatron/distributed.py: shutdown_distributed, called from
launch/pretrain.py's main on every way out).

A PP=2 CPU run once exited non-zero after its final checkpoint with `terminate called without an
active exception` on rank 1 (not reproduced since). What these tests pin down is the teardown
itself: after a finished run a barrier, then destroy_process_group on every rank, then the
references that kept every gloo group (and its transport and worker threads) alive until
interpreter shutdown are dropped, so the groups are destroyed while the interpreter is alive.
"""
from __future__ import annotations

import os
import sys
import types
import weakref

import pytest
from helpers.dist import run_distributed
from helpers.launch import load_launch

from slope_megatron.errors import EXIT_USER_ERROR, SlopeError
from slope_megatron.parallel import state as parallel_state
from slope_megatron import distributed


class _FakeDist:
    """torch.distributed as shutdown_distributed sees it, recording the calls in order."""

    def __init__(self, world: int = 2, barrier_error: Exception | None = None):
        self.world, self.barrier_error = world, barrier_error
        self.calls, self.initialized = [], True

    def is_initialized(self):
        return self.initialized

    def get_world_size(self):
        return self.world

    def barrier(self):
        self.calls.append("barrier")
        if self.barrier_error is not None:
            raise self.barrier_error

    def destroy_process_group(self, group=None):
        self.calls.append("destroy_process_group")
        self.initialized = False


@pytest.fixture
def fake(monkeypatch):
    """A fake torch.distributed (deepspeed.comm not initialized) and stale group references in
    our ParallelState and DeepSpeed's pipeline p2p module."""
    from deepspeed.runtime.pipe import p2p

    def make(**kwargs):
        f = _FakeDist(**kwargs)
        monkeypatch.setattr(distributed, "dist", f)
        monkeypatch.setitem(sys.modules, "deepspeed.comm",
                            types.SimpleNamespace(is_initialized=lambda: False))
        monkeypatch.setattr(parallel_state, "_STATE", object())
        monkeypatch.setattr(p2p, "_grid", object())
        monkeypatch.setattr(p2p, "_groups", [object()])
        return f
    return make


def _references_dropped() -> bool:
    from deepspeed.runtime.pipe import p2p
    return parallel_state.get_parallel_state() is None and p2p._grid is None \
        and p2p._groups is None


def test_finished_run_barriers_then_destroys_and_drops_group_references(fake):
    f = fake()
    distributed.shutdown_distributed(completed=True)
    assert f.calls == ["barrier", "destroy_process_group"]
    assert _references_dropped()


def test_after_an_error_no_barrier_but_still_destroyed(fake):
    f = fake()  # a peer may be stuck in a collective or gone: a barrier could hang
    distributed.shutdown_distributed(completed=False)
    assert f.calls == ["destroy_process_group"]
    assert _references_dropped()


def test_world_of_one_needs_no_barrier(fake):
    f = fake(world=1)
    distributed.shutdown_distributed(completed=True)
    assert f.calls == ["destroy_process_group"]


def test_a_failed_final_barrier_still_destroys_and_does_not_raise(fake, caplog):
    f = fake(barrier_error=RuntimeError("Connection closed by peer"))
    distributed.shutdown_distributed(completed=True)
    assert f.calls == ["barrier", "destroy_process_group"]
    assert "final barrier before process-group teardown failed" in caplog.text
    assert _references_dropped()


def test_not_initialized_calls_nothing(fake):
    f = fake()
    f.initialized = False
    distributed.shutdown_distributed(completed=True)
    assert f.calls == []
    assert _references_dropped()


def test_deepspeed_comm_destroys_when_it_set_the_group_up(fake, monkeypatch):
    """init_distributed starts the group through deepspeed.init_distributed: tear it down
    through deepspeed.comm, which also releases DeepSpeed's registry of groups."""
    f = fake()
    monkeypatch.setitem(sys.modules, "deepspeed.comm", types.SimpleNamespace(
        is_initialized=lambda: True,
        destroy_process_group=lambda: f.calls.append("deepspeed.comm.destroy_process_group")))
    distributed.shutdown_distributed(completed=True)
    assert f.calls == ["barrier", "deepspeed.comm.destroy_process_group"]


# ---- launch/pretrain.py main: shutdown_distributed on every way out, told how the run ended

@pytest.fixture
def main_with(monkeypatch):
    """pretrain main() with config loading, process-group start and train() replaced; returns
    (run(train_fn) -> exit code, events)."""
    import slope_megatron.config as config_mod
    import slope_megatron.training as training_pkg

    events = []
    monkeypatch.setattr(config_mod, "load_config", lambda path, sets: "cfg")
    monkeypatch.setattr(distributed, "init_distributed", lambda: events.append("init") or "dist")
    monkeypatch.setattr(distributed, "shutdown_distributed",
                        lambda completed: events.append(("shutdown", completed)))
    for k in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(k, raising=False)
    pretrain = load_launch("pretrain")
    # the process set-up (signal handlers, launcher watch, build locks) reads a real config
    # and changes this process; it is not what these tests are about
    monkeypatch.setattr(pretrain, "_prepare_process", lambda cfg: None)
    main = pretrain.main

    def run(train_fn):
        monkeypatch.setattr(training_pkg, "train", train_fn)
        return main(["--config", "unused.yaml"])
    return run, events


def test_main_shuts_down_after_a_finished_run(main_with):
    run, events = main_with
    assert run(lambda cfg, dist: events.append("train")) == 0
    assert events == ["init", "train", ("shutdown", True)]


def test_main_shuts_down_without_barrier_after_a_user_error(main_with, capsys):
    run, events = main_with

    def train(cfg, dist):
        raise SlopeError("bad data")
    assert run(train) == EXIT_USER_ERROR
    assert events == ["init", ("shutdown", False)]
    assert "error: bad data" in capsys.readouterr().err


def test_main_shuts_down_after_an_unexpected_error_too(main_with):
    run, events = main_with

    def train(cfg, dist):
        raise RuntimeError("boom")
    with pytest.raises(RuntimeError, match="boom"):
        run(train)
    assert events == ["init", ("shutdown", False)]


# ---- a real 2-rank gloo world: the groups (and their threads) are gone after the teardown

def _gloo_threads() -> int | None:
    """This process's gloo transport/worker threads, by name (Linux); None where unreadable."""
    try:
        names = []
        for tid in os.listdir("/proc/self/task"):
            with open(f"/proc/self/task/{tid}/comm") as f:
                names.append(f.read().strip())
    except OSError:
        return None
    return sum(n.startswith(("gloo", "pt_gloo")) for n in names)


def _teardown_worker():
    from deepspeed.runtime.pipe import p2p
    from deepspeed.runtime.pipe.topology import PipelineParallelGrid

    from slope_megatron.parallel import initialize_parallel

    distributed.init_distributed()
    par = initialize_parallel(1, 2)  # our TP/PP/DP groups, held by ParallelState
    grid = PipelineParallelGrid(topology=par.topology)  # DeepSpeed's, as the pipeline engine
    p2p.init_process_groups(grid)  # keeps its grid in deepspeed.runtime.pipe.p2p._grid
    subgroups = [par.tp_group, par.pp_group, par.dp_group, grid.pp_proc_group, grid.dp_proc_group,
                 grid.ds_model_proc_group, grid.slice_proc_group]
    refs = [weakref.ref(g) for g in subgroups if g is not None]
    del par, grid, subgroups
    before = _gloo_threads()
    distributed.shutdown_distributed(completed=True)
    return {"initialized": distributed.dist.is_initialized(),
            "state": parallel_state.get_parallel_state() is None, "grid": p2p._grid is None,
            "alive": sum(r() is not None for r in refs), "groups": len(refs),
            "threads_before": before, "threads_after": _gloo_threads()}


@pytest.mark.slow
def test_two_rank_gloo_teardown_destroys_every_subgroup_and_its_threads():
    for r in run_distributed(_teardown_worker, 2):
        assert not r["initialized"] and r["state"] and r["grid"]
        assert r["groups"] >= 4 and r["alive"] == 0, r  # every subgroup object freed
        if r["threads_before"]:  # thread names readable: the subgroups' threads are joined;
            # at most the default group's (3: torch keeps it as a default argument of
            # torch.distributed.nn.functional's collectives once that module is imported)
            assert r["threads_before"] > r["threads_after"] and r["threads_after"] <= 3, r


# ---- training.train: the DeepSpeed engine is destroyed on every way out, before the groups

def _run_recording_engine_teardown(argv):
    """pretrain main() on this rank with DeepSpeedEngine.destroy and the process-group
    teardown recorded in the order they happen."""
    from deepspeed.runtime.engine import DeepSpeedEngine

    events, destroy, shutdown = [], DeepSpeedEngine.destroy, distributed.shutdown_distributed

    def recorded_destroy(engine):
        events.append("engine.destroy")
        destroy(engine)

    def recorded_shutdown(completed):
        events.append(("shutdown", completed))
        shutdown(completed)
    DeepSpeedEngine.destroy = recorded_destroy
    distributed.shutdown_distributed = recorded_shutdown
    code = load_launch("pretrain").main(argv)
    return code, events


@pytest.mark.slow
def test_a_finished_run_destroys_its_engine_before_the_groups(tmp_path):
    from helpers.corpus import tiny_run_args, write_corpus

    argv = tiny_run_args(write_corpus(tmp_path / "corpus"), tmp_path / "cache", tmp_path / "run",
                         2, 2)
    for code, events in run_distributed(_run_recording_engine_teardown, 2, argv):
        assert code == 0
        # (DeepSpeed's engine __del__ may destroy once more when the shutdown collects it)
        assert events[:2] == ["engine.destroy", ("shutdown", True)], events


def _train_with_fake_engine(monkeypatch, tmp_path, destroy):
    """training.train through build_engine with an engine whose first use raises "boom"."""
    import torch

    import slope_megatron.training.loop as loop_mod
    import slope_megatron.training.startup as startup_mod
    from slope_megatron.config import load_config
    from slope_megatron.distributed import DistInfo

    class Engine:
        @property
        def optimizer(self):  # the first use after build_engine
            raise RuntimeError("boom")
    Engine.destroy = destroy
    monkeypatch.setattr(startup_mod, "prepare_run_data", lambda cfg, main: None)
    monkeypatch.setattr(startup_mod, "build_engine",
                        lambda cfg, par, dp, pretrained=None: (torch.nn.Linear(2, 2), Engine(),
                                                               None))
    cfg = load_config(None, [f"train.output_dir={tmp_path / 'run'}"])
    with pytest.raises(RuntimeError, match="boom"):  # the run's own error, nothing else
        loop_mod.train(cfg, DistInfo(rank=0, world_size=1, local_rank=0, launcher="test"))


def test_a_failing_run_leaves_its_engine_alone(monkeypatch, tmp_path):
    """After an error the engine's teardown (a device synchronize: it could wait forever on a
    collective a failed peer never joins) is not run before the error reaches the user."""
    destroyed = []
    _train_with_fake_engine(monkeypatch, tmp_path, lambda self: destroyed.append(True))
    assert destroyed == []


def test_an_engine_teardown_failure_is_a_warning(caplog):
    from slope_megatron.training.loop import _destroy_engine

    class Engine:
        def destroy(self):
            raise RuntimeError("sticky CUDA error")
    _destroy_engine(Engine())
    assert "engine teardown failed: sticky CUDA error" in caplog.text
