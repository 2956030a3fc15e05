"""Which process layout the environment describes (slope_megatron/distributed.py).

Inside an sbatch script or an salloc shell SLURM sets SLURM_PROCID=0 and the job's
SLURM_NTASKS: that is one process, not rank 0 of N. Only an srun job step (SLURM_STEP_ID a
normal step number, SLURM_STEP_NUM_TASKS its task count) is a multi-rank SLURM launch.
"""
import os
import subprocess
import sys

import pytest
from helpers.corpus import write_corpus

from slope_megatron.errors import EXIT_USER_ERROR, SlopeError
from slope_megatron import distributed

from helpers.paths import ROOT
BATCH_STEP = str(0xFFFFFFFB)  # SLURM_BATCH_SCRIPT (slurm.h)
INTERACTIVE_STEP = str(0xFFFFFFFA)  # SLURM_INTERACTIVE_STEP: salloc's shell, if so configured
_LAUNCH_PREFIXES = ("SLURM_", "OMPI_", "PMI_", "PMIX_", "MV2_")
_LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
                "MASTER_PORT")


@pytest.fixture
def env(monkeypatch):
    """A clean launcher environment; returns a setter for the variables of one case."""
    for k in list(os.environ):
        if k in _LAUNCH_VARS or k.startswith(_LAUNCH_PREFIXES):
            monkeypatch.delenv(k)

    def set_(**variables):
        for k, v in variables.items():
            monkeypatch.setenv(k, v)
    return set_


def _discover():
    launcher = distributed.discover_environment()
    return (launcher, os.environ["RANK"], os.environ["WORLD_SIZE"], os.environ["LOCAL_RANK"],
            os.environ["MASTER_ADDR"])


@pytest.mark.parametrize("variables", [
    {"SLURM_PROCID": "0", "SLURM_NTASKS": "2"},  # an sbatch script (no step id)
    {"SLURM_PROCID": "0", "SLURM_NTASKS": "16", "SLURM_LOCALID": "0",
     "SLURM_STEP_ID": BATCH_STEP},  # the batch step under its special id
    {"SLURM_PROCID": "0", "SLURM_NTASKS": "4", "SLURM_STEP_ID": INTERACTIVE_STEP,
     "SLURM_STEP_NUM_TASKS": "1"},  # salloc's interactive step
    {"SLURM_NTASKS": "8", "SLURM_JOB_ID": "12"},  # a plain salloc shell
    {"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "MASTER_ADDR": "10.0.0.1",
     "MASTER_PORT": "29511"},  # with a rendezvous exported: still no ranks to wait for
])
def test_an_allocation_outside_an_srun_step_is_one_process(env, variables):
    env(**variables)
    before = dict(os.environ)
    assert _discover() == ("single", "0", "1", "0", "127.0.0.1")
    assert distributed.process_rank(before) == 0
    assert distributed.slurm_step_layout(before) is None


def test_an_srun_step_gives_rank_and_step_size_not_the_job_size(env):
    # srun -n 4 in a 16-task allocation: SLURM_NTASKS may still say 16 (--preserve-env)
    env(SLURM_STEP_ID="3", SLURM_STEP_NUM_TASKS="4", SLURM_NTASKS="16", SLURM_PROCID="2",
        SLURM_LOCALID="1", MASTER_ADDR="node-a", MASTER_PORT="24242")
    before = dict(os.environ)
    assert _discover() == ("slurm", "2", "4", "1", "node-a")
    assert distributed.slurm_step_layout(before) == (2, 4, 1)
    assert distributed.process_rank(before) == 2


def test_a_one_task_srun_step_needs_no_rendezvous_address(env):
    env(SLURM_STEP_ID="0", SLURM_STEP_NUM_TASKS="1", SLURM_PROCID="0", SLURM_NTASKS="8")
    assert _discover()[1:] == ("0", "1", "0", "127.0.0.1")


def test_launcher_variables_keep_priority_over_slurm(env):
    env(RANK="1", WORLD_SIZE="2", LOCAL_RANK="1", MASTER_ADDR="h", MASTER_PORT="1",
        SLURM_STEP_ID="0", SLURM_STEP_NUM_TASKS="1", SLURM_PROCID="0")  # deepspeed in srun
    assert distributed.process_rank() == 1
    assert _discover() == ("torch", "1", "2", "1", "h")
    os.environ.pop("RANK"), os.environ.pop("WORLD_SIZE")
    env(OMPI_COMM_WORLD_RANK="3", SLURM_PROCID="0", SLURM_NTASKS="4")
    assert distributed.process_rank() == 3


@pytest.mark.parametrize("variables, names", [
    ({"SLURM_STEP_ID": "0", "SLURM_STEP_NUM_TASKS": "2", "SLURM_PROCID": "2"},
     ["SLURM_PROCID=2", "SLURM_STEP_NUM_TASKS=2"]),
    ({"SLURM_STEP_ID": "0", "SLURM_PROCID": "0", "SLURM_NTASKS": "2"},
     ["SLURM_STEP_ID=0", "SLURM_STEP_NUM_TASKS"]),
    ({"SLURM_STEP_ID": "0", "SLURM_STEP_NUM_TASKS": "0", "SLURM_PROCID": "0"},
     ["SLURM_STEP_NUM_TASKS='0'"]),
    ({"SLURM_STEP_ID": "x", "SLURM_PROCID": "0"}, ["SLURM_STEP_ID='x'"]),
    ({"SLURM_PROCID": "1", "SLURM_NTASKS": "2"},  # a launcher that set SLURM_PROCID alone
     ["SLURM_PROCID=1", "SLURM_STEP_ID is not set"]),
    ({"RANK": "2", "WORLD_SIZE": "2"}, ["RANK=2", "WORLD_SIZE=2"]),
    ({"RANK": "1"}, ["RANK=1", "WORLD_SIZE is not"]),
    ({"RANK": "-1", "WORLD_SIZE": "2"}, ["RANK='-1'"]),
])
def test_an_inconsistent_environment_is_one_clear_slope_error(env, variables, names):
    env(**variables)
    with pytest.raises(SlopeError) as e:
        distributed.discover_environment()
    message = str(e.value)
    assert "\n" not in message and all(n in message for n in names), message
    assert distributed.process_rank() == 0  # so this process is one that prints it


def test_a_multi_task_srun_step_without_a_rendezvous_address_is_a_slope_error(env):
    env(SLURM_STEP_ID="0", SLURM_STEP_NUM_TASKS="2", SLURM_PROCID="1", MASTER_PORT="29511")
    with pytest.raises(SlopeError, match="SLURM_STEP_NUM_TASKS=2.*MASTER_ADDR and MASTER_PORT"):
        distributed.discover_environment()
    assert distributed.process_rank() == 1  # a consistent layout: its rank 0 prints the error


def test_mpi_variables_without_mpi4py(env, monkeypatch):
    monkeypatch.setitem(sys.modules, "mpi4py", None)  # `from mpi4py import MPI` fails
    env(PMIX_RANK="0", SLURM_PROCID="0", SLURM_NTASKS="2")  # not in a step: nothing to use
    with pytest.raises(SlopeError, match="PMIX_RANK is set.*pip install mpi4py"):
        distributed.discover_environment()
    # srun --mpi=pmix: the step's own variables stand in for MPI
    env(SLURM_STEP_ID="1", SLURM_STEP_NUM_TASKS="2", SLURM_PROCID="1", MASTER_ADDR="h",
        MASTER_PORT="2")
    assert _discover() == ("slurm", "1", "2", "0", "h")


# ---- end to end: launch/pretrain.py as a user runs it inside an allocation ----------------

@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("corpus"))


def _pretrain(out, corpus, **variables):
    env = {k: v for k, v in os.environ.items()
           if k not in _LAUNCH_VARS and not k.startswith(_LAUNCH_PREFIXES)}
    env.update(OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", PYTHONUNBUFFERED="1", **variables)
    cmd = [sys.executable, str(ROOT / "launch" / "pretrain.py"), "--config",
           str(ROOT / "configs" / "demo.yaml"), "--set", f"data.path={corpus}",
           f"data.cache_dir={out.parent / 'cache'}", "data.tokenizer_vocab_size=300",
           "data.val_fraction=0.1", "model.hidden_size=32", "model.num_layers=2",
           "model.num_heads=2", "model.seq_len=32", "train.iters=2", "train.micro_batch_size=2",
           "train.global_batch_size=4", "train.log_interval=1", "train.eval_interval=2",
           "train.eval_iters=1", "train.save_interval=2", "optimizer.warmup_iters=1",
           f"train.output_dir={out}"]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
                          check=False)


@pytest.mark.slow
def test_pretrain_in_a_batch_script_trains_as_one_process(corpus, tmp_path):
    out = tmp_path / "run"
    r = _pretrain(out, corpus, SLURM_PROCID="0", SLURM_NTASKS="2", SLURM_JOB_ID="7")
    log = r.stdout + r.stderr
    assert r.returncode == 0, log[-4000:]
    assert "dp=1" in log and "Traceback" not in log, log[-4000:]
    assert (out / "checkpoints" / "latest").read_text() == "iter_00000002"


def test_pretrain_with_a_contradictory_slurm_step_stops_with_one_error_line(corpus, tmp_path):
    out = tmp_path / "bad"
    r = _pretrain(out, corpus, SLURM_STEP_ID="0", SLURM_STEP_NUM_TASKS="2", SLURM_PROCID="2",
                  SLURM_NTASKS="2")
    assert r.returncode == EXIT_USER_ERROR, (r.stdout + r.stderr)[-4000:]
    assert "Traceback" not in r.stderr, r.stderr[-4000:]
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "SLURM_PROCID=2" in errors[0], r.stderr[-4000:]
    assert "SLURM_STEP_NUM_TASKS=2" in errors[0]
    assert not (out / "checkpoints").exists()
