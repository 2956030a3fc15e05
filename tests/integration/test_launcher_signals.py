"""SIGTERM to the launcher only - as a scheduler or `kill <pid>` sends it - reaches every rank:
they save the iteration they are in and exit, and no process is left behind.

The `deepspeed` command does not pass SIGTERM on for a launch on one node: it exited 143 at
once while its `deepspeed.launcher.launch` child (now a child of init) and the ranks trained on
to the end and saved - next to whatever rerun came next. Each rank now watches that command
(training/launcher_watch.py). torchrun passes SIGTERM on itself (as do mpirun and srun:
tests/integration/test_slurm_cluster.py); it is tested the same way. The run pauses at a known
iteration (fault `pause`) until the signal comes, so the saved iteration is known.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import psutil
import pytest
from helpers.forked_runs import launch
from helpers.paths import ROOT
from helpers.stops import comparable, last_iter, launcher_env, stop_args

from slope_megatron.training import checkpoint

PAUSE = "pause:after_step:iter=5"  # iteration 6's step done, its record not yet written
BIN = os.path.dirname(sys.executable)
LAUNCHERS = {
    "deepspeed": [f"{BIN}/deepspeed", "--num_gpus", "2", "launch/pretrain.py"],
    "torchrun": [f"{BIN}/torchrun", "--nproc-per-node", "2", "launch/pretrain.py"],
}


def _stop_the_launcher_mid_run(command, out, timeout=240.0):
    """Start `command`, SIGTERM the launcher alone once the run is paused in iteration 6, wait
    for every process it started to end. Returns (launcher's status, its output, pids left)."""
    log = out.parent / "launcher.log"
    with open(log, "w") as sink:
        proc = subprocess.Popen(command, cwd=ROOT, stdout=sink, stderr=subprocess.STDOUT,
                                env=launcher_env(SLOPE_FAULT=PAUSE), start_new_session=True)
    try:
        deadline = time.time() + timeout
        while last_iter(out) < 5:
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.time() < deadline, "the run did not reach iteration 5"
            time.sleep(0.2)
        started = psutil.Process(proc.pid).children(recursive=True)
        assert len([p for p in started if _is_rank(p)]) == 2
        proc.send_signal(signal.SIGTERM)  # the launcher only, not its process group
        code = proc.wait(60)
        gone, alive = psutil.wait_procs(started, timeout=60)
        return code, log.read_text(), [p.pid for p in alive]
    finally:  # whatever happened, nothing of it outlives the test
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        for p in psutil.process_iter():
            if _is_rank(p) and p.environ().get("SLOPE_FAULT") == PAUSE:
                p.kill()


def _is_rank(p: psutil.Process) -> bool:
    """A pretrain.py rank (not a launcher whose arguments name pretrain.py)."""
    try:
        cmd = p.cmdline()
    except psutil.Error:  # gone, or a zombie
        return False
    return len(cmd) > 2 and cmd[1:3] in (["-u", "launch/pretrain.py"], ["launch/pretrain.py"]) \
        or (len(cmd) > 1 and cmd[1] == "launch/pretrain.py")


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["deepspeed", "torchrun"])
def test_sigterm_to_the_launcher_saves_on_every_rank_and_leaves_no_process(
        stop_corpus, uninterrupted, tmp_path, launcher):
    out = tmp_path / "run"
    code, output, left = _stop_the_launcher_mid_run(
        LAUNCHERS[launcher] + stop_args(stop_corpus, out), out)
    assert left == [], output[-3000:]
    assert "saved iter 6 on SIGTERM" in output and "rerun the same command to resume" in output
    assert checkpoint.latest_tag(out / "checkpoints") == checkpoint.tag_for(6)
    assert last_iter(out) == 6
    # the launcher's own status: the deepspeed command dies by the signal (its default action),
    # torchrun reports its workers' stop as a failure (1)
    assert code == {"deepspeed": -signal.SIGTERM, "torchrun": 1}[launcher]
    assert launch(stop_args(stop_corpus, out), 2) == [0, 0]  # the rerun continues exactly
    assert comparable(out) == comparable(uninterrupted(2))
