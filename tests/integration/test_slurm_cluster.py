"""launch/slurm/pretrain.sbatch on a real one-node SLURM cluster: a job stopped mid-run saves
and exits 75, and continues with the losses of an uninterrupted run - resubmitted after
`scancel --signal=TERM` (what pre-emption and the time limit send), or requeued by the script
itself after the `--signal=B:USR1@<seconds>` warning ahead of the time limit (brought near with
`scontrol update TimeLimit` once the run is paused, so that the warning's timing - SLURM checks
about every 30 s - cannot race the start-up).

The cluster (munge, slurmctld, slurmd; installed with apt-get when missing) is started for this
module and stopped after it (tests/helpers/slurm_cluster.py). Two srun tasks train on CPU
(`GPUS_PER_NODE=2 --gpus-per-node=0`). The run pauses in iteration 6 (fault `pause`) until a
signal comes, so the saved iteration is known whenever SLURM delivers it.
"""
from __future__ import annotations

import sys
import time

import psutil
import pytest
from helpers import slurm_cluster
from helpers.paths import ROOT
from helpers.stops import comparable, last_iter, launcher_env, stop_args

from slope_megatron.training import checkpoint

SCRIPT = ROOT / "launch" / "slurm" / "pretrain.sbatch"
PAUSE = "pause:after_step:iter=5,seconds=110"  # in iteration 6, until a signal


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    try:
        c = slurm_cluster.start(tmp_path_factory.mktemp("slurm"))
    except slurm_cluster.Unavailable as e:
        pytest.skip(f"no SLURM cluster here: {e}")
    yield c
    c.stop()


def _submit(cluster, stop_corpus, out, *sbatch_args, **env):
    """sbatch the project's script: 1 node, 2 CPU tasks, the small run's overrides."""
    argv = stop_args(stop_corpus, out)
    job_env = launcher_env(**cluster.env, CONFIG=argv[1], GPUS_PER_NODE="2",
                           SET=" ".join(argv[3:]), PYTHON=sys.executable, **env)
    log = out.parent / "job-%j.out"
    return slurm_cluster._run(
        "sbatch", "--parsable", "--nodes=1", "--ntasks-per-node=2", "--gpus-per-node=0",
        "--open-mode=append", f"--output={log}", *sbatch_args, str(SCRIPT),
        env=job_env, timeout=60).stdout.strip().split(";")[0]


def _job_log(out, job_id):
    return (out.parent / f"job-{job_id}.out").read_text()


def _wait_until_paused(cluster, out, job_id, timeout=180.0):
    deadline = time.time() + timeout
    while last_iter(out) < 5:
        state = cluster.job(job_id).get("JobState")
        assert state in ("PENDING", "RUNNING"), f"job {state}: {_job_log(out, job_id)[-3000:]}"
        assert time.time() < deadline, _job_log(out, job_id)[-3000:]
        time.sleep(0.5)


def _no_rank_left(out):
    """No process of this run is alive (ranks carry their output dir in their arguments)."""
    deadline = time.time() + 30
    while True:
        left = [p.pid for p in psutil.process_iter(["cmdline"])
                if str(out) in " ".join(p.info["cmdline"] or [])]
        if not left or time.time() > deadline:
            return left
        time.sleep(0.5)


@pytest.mark.slow
def test_scancel_sigterm_saves_and_a_resubmitted_job_continues_exactly(cluster, stop_corpus,
                                                                       uninterrupted, tmp_path):
    out = tmp_path / "run"
    job = _submit(cluster, stop_corpus, out, "--time=10", SLOPE_FAULT=PAUSE)
    _wait_until_paused(cluster, out, job)
    cluster.run("scancel", "--signal=TERM", job)  # every task of the job's steps gets it
    info = cluster.wait_state(job, {"FAILED", "COMPLETED", "CANCELLED"}, 120)
    log = _job_log(out, job)
    assert info["ExitCode"] == "75:0", log[-3000:]
    assert "saved iter 6 on SIGTERM; rerun the same command to resume" in log
    assert checkpoint.latest_tag(out / "checkpoints") == checkpoint.tag_for(6)
    assert _no_rank_left(out) == []

    again = _submit(cluster, stop_corpus, out, "--time=10")  # the same submission
    info = cluster.wait_state(again, {"FAILED", "COMPLETED", "CANCELLED"}, 180)
    assert info["ExitCode"] == "0:0", _job_log(out, again)[-3000:]
    assert comparable(out) == comparable(uninterrupted(2))


@pytest.mark.slow
def test_the_time_limit_warning_saves_and_the_script_requeues_the_job(cluster, stop_corpus,
                                                                      uninterrupted, tmp_path):
    out = tmp_path / "run"
    # SIGUSR1 to the batch shell 90 s before the time limit; the limit is brought near only
    # once the run is paused in iteration 6, so the warning cannot come during its start-up
    job = _submit(cluster, stop_corpus, out, "--time=10", "--signal=B:USR1@90", REQUEUE="1",
                  SLOPE_FAULT=PAUSE)
    _wait_until_paused(cluster, out, job)
    cluster.run("scontrol", "update", f"JobId={job}", "TimeLimit=2")  # warns within ~30 s
    info = cluster.wait_state(job, {"PENDING"}, 150)  # stopped, saved, requeued by the script
    assert info["Restarts"] == "1"
    log = _job_log(out, job)
    assert "SIGUSR1: passed on to the ranks" in log
    assert "saved iter 6 on SIGUSR1; rerun the same command to resume" in log
    assert "requeueing job" in log
    assert checkpoint.latest_tag(out / "checkpoints") == checkpoint.tag_for(6)
    assert _no_rank_left(out) == []
    # the limit far away again; SLURM starts the requeued job once its old credential has
    # expired (cred_expire: 10 s on this cluster, 120 s by default)
    cluster.run("scontrol", "update", f"JobId={job}", "TimeLimit=10")
    info = cluster.wait_state(job, {"COMPLETED", "FAILED", "CANCELLED"}, 180)
    assert info["ExitCode"] == "0:0", _job_log(out, job)[-3000:]
    assert info["Restarts"] == "1"
    assert comparable(out) == comparable(uninterrupted(2))
