"""launch/slurm/pretrain.sbatch without SLURM: fake SLURM_* variables, a fake `scontrol` (and,
for the end-to-end runs, a fake `srun` that starts the tasks on this machine)."""
import json
import os
import shlex
import shutil
import subprocess
import sys

import pytest
from helpers.corpus import write_corpus

from helpers.paths import ROOT
SCRIPT = ROOT / "launch" / "slurm" / "pretrain.sbatch"

FAKE_SCONTROL = """#!/bin/bash
# scontrol show hostnames LIST -> one host a line, from FAKE_HOSTS
[[ "$1 $2" == "show hostnames" && "$3" == "$SLURM_JOB_NODELIST" ]] || {
  echo "fake scontrol: unexpected arguments: $*" >&2; exit 1; }
tr ',' '\\n' <<<"$FAKE_HOSTS"
"""

# srun on one machine: --ntasks tasks, --ntasks-per-node per fake node, the SLURM_* task
# variables a real srun sets; every call is appended to FAKE_SRUN_LOG
FAKE_SRUN = """#!{python}
import os, subprocess, sys
args = sys.argv[1:]
opts = {{}}
while args and args[0].startswith("--"):
    key, _, value = args.pop(0)[2:].partition("=")
    opts[key] = value
ntasks = int(opts["ntasks"])
per_node = int(opts["ntasks-per-node"])
with open(os.environ["FAKE_SRUN_LOG"], "a") as f:
    f.write(" ".join(sys.argv[1:]) + "\\n")
procs = [subprocess.Popen(args, env=dict(os.environ, SLURM_PROCID=str(i),
                                         SLURM_NTASKS=str(ntasks), SLURM_STEP_ID="0",
                                         SLURM_STEP_NUM_TASKS=str(ntasks),
                                         SLURM_LOCALID=str(i % per_node),
                                         SLURM_NODEID=str(i // per_node)))
         for i in range(ntasks)]
sys.exit(max(p.wait() for p in procs))
"""


@pytest.fixture
def fakebin(tmp_path):
    d = tmp_path / "bin"
    d.mkdir()
    (d / "scontrol").write_text(FAKE_SCONTROL)
    (d / "srun").write_text(FAKE_SRUN.format(python=sys.executable))
    for f in d.iterdir():
        f.chmod(0o755)
    return d


def run_script(fakebin, *args, script=SCRIPT, cwd=ROOT, **env_overrides):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    for k in ("CONFIG", "OUTPUT_DIR", "SET", "LAUNCHER", "GPUS_PER_NODE", "NNODES", "HOSTFILE",
              "MASTER_ADDR", "MASTER_PORT", "SRUN_ARGS", "CONTAINER_IMAGE", "SLOPE_ROOT",
              "NCCL_NVLS_ENABLE", "TORCH_SYMM_MEM_DISABLE_MULTICAST", "NVSHMEM_DISABLE_NVLS",
              "NCCL_DEBUG", "SRUN_MPI", "CONTAINER_MOUNTS", "PYTHON", "DRY_RUN",
              "TORCH_EXTENSIONS_DIR", "CPUS_PER_TASK",
              "RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(k, None)
    env.update(PATH=f"{fakebin}{os.pathsep}{env['PATH']}", DRY_RUN="1",
               SLURM_JOB_NODELIST="gpu[01-03]", FAKE_HOSTS="gpu01,gpu02,gpu03",
               SLURM_NNODES="3", SLURM_JOB_ID="4242", SLURM_GPUS_ON_NODE="8")
    env.update({k: v for k, v in env_overrides.items() if v is not None})
    for k, v in env_overrides.items():
        if v is None:
            env.pop(k, None)
    return subprocess.run(["bash", str(script), *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300, check=False)


def launch_line(stdout):
    lines = [line for line in stdout.splitlines() if line.startswith("launch: ")]
    assert len(lines) == 1, stdout
    return shlex.split(lines[0][len("launch: "):])


def hostfile_lines(stdout):
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("hostfile "))
    body = []
    for line in lines[start + 1:]:
        if line.startswith("launch: "):
            break
        body.append(line)
    return lines[start][len("hostfile "):].rstrip(":"), body


def test_srun_mode_one_task_per_gpu(fakebin, tmp_path):
    r = run_script(fakebin, "zero.stage=2", "data.path=/data/my corpus",
                   CONFIG="configs/llama-1b.yaml", OUTPUT_DIR="/scratch/run 1",
                   SET="train.iters=10 train.log_interval=5")
    assert r.returncode == 0, r.stderr
    assert "3 node(s) x 8 GPU(s) = 24 ranks, launcher srun, master gpu01:24242" in r.stdout
    assert "hostfile" not in r.stdout  # srun mode needs none
    assert launch_line(r.stdout) == [
        "srun", "--kill-on-bad-exit=1", "--mpi=none", "--nodes=3", "--ntasks=24",
        "--ntasks-per-node=8", "python", "launch/pretrain.py", "--config",
        "configs/llama-1b.yaml", "--set", "train.output_dir=/scratch/run 1", "train.iters=10",
        "train.log_interval=5", "zero.stage=2", "data.path=/data/my corpus"]
    assert "DRY_RUN=1: nothing launched" in r.stdout
    assert ("env: NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 "
            f"NCCL_DEBUG=WARN TORCH_EXTENSIONS_DIR={ROOT}/.torch_extensions") in r.stdout
    assert not (ROOT / "runs" / "slurm" / "hostfile-4242").exists()


@pytest.mark.parametrize("job_id", ["4242", "12999", "31999", "987654"])
def test_the_rendezvous_port_stays_below_the_ephemeral_ports_and_moves_on_requeue(fakebin,
                                                                                 job_id):
    """Linux hands out ports from 32768 up to outgoing connections: a rendezvous port there
    can be taken by any process on the node (EADDRINUSE)."""
    ports = []
    for restart in ("0", "1", "2"):
        r = run_script(fakebin, SLURM_JOB_ID=job_id, SLURM_RESTART_COUNT=restart)
        assert r.returncode == 0, r.stderr
        ports.append(int(r.stdout.split("master gpu01:")[1].split(",")[0]))
    assert all(20000 <= p < 32768 for p in ports) and len(set(ports)) == 3, ports


def test_deepspeed_mode_writes_nothing_and_prints_hostfile_and_per_node_launch(fakebin,
                                                                                tmp_path):
    hostfile = tmp_path / "shared" / "hosts"
    r = run_script(fakebin, "train.iters=5", LAUNCHER="deepspeed", SLURM_GPUS_ON_NODE=None,
                   SLURM_GPUS_PER_NODE="h100:4", NNODES="2", HOSTFILE=str(hostfile),
                   MASTER_PORT="29511", PYTHON="/opt/venv/bin/python")
    assert r.returncode == 0, r.stderr
    assert "2 node(s) x 4 GPU(s) = 8 ranks" in r.stdout
    path, body = hostfile_lines(r.stdout)
    assert path == str(hostfile) and body == ["gpu01 slots=4", "gpu02 slots=4"]
    assert not hostfile.exists()  # dry run
    cmd = launch_line(r.stdout)
    assert cmd[:6] == ["srun", "--kill-on-bad-exit=1", "--mpi=none", "--nodes=2", "--ntasks=2",
                       "--ntasks-per-node=1"]
    assert cmd[6:8] == ["bash", "-c"]
    assert '--node_rank="$SLURM_NODEID"' in cmd[8] and "deepspeed.launcher.runner" in cmd[8]
    assert cmd[9:] == ["slope-node", "/opt/venv/bin/python", "--hostfile", str(hostfile),
                       "--no_ssh", "--master_addr", "gpu01", "--master_port", "29511",
                       "launch/pretrain.py", "--config", "configs/gpt2-small.yaml", "--set",
                       "train.iters=5"]


def test_deepspeed_pdsh_mode_runs_the_launcher_once(fakebin):
    r = run_script(fakebin, LAUNCHER="deepspeed-pdsh", MASTER_ADDR="10.0.0.1")
    assert r.returncode == 0, r.stderr
    path, body = hostfile_lines(r.stdout)
    assert path == str(ROOT / "runs" / "slurm" / "hostfile-4242")
    assert body == ["gpu01 slots=8", "gpu02 slots=8", "gpu03 slots=8"]
    assert launch_line(r.stdout) == [
        "python", "-m", "deepspeed.launcher.runner", "--hostfile", path, "--launcher", "pdsh",
        "--master_addr", "10.0.0.1", "--master_port", "24242", "launch/pretrain.py",
        "--config", "configs/gpt2-small.yaml"]  # no overrides: no --set at all


def test_container_and_extra_srun_args(fakebin):
    r = run_script(fakebin, CONTAINER_IMAGE="registry#slope:latest",
                   CONTAINER_MOUNTS="/data:/data", SRUN_ARGS="--cpu-bind=none --exclusive",
                   SRUN_MPI="pmix")
    assert r.returncode == 0, r.stderr
    cmd = launch_line(r.stdout)
    assert "--mpi=pmix" in cmd
    assert "--container-image=registry#slope:latest" in cmd
    assert f"--container-mounts={ROOT}:{ROOT},/data:/data" in cmd
    assert f"--container-workdir={ROOT}" in cmd
    # the image's prebuilt kernels, not the checkout's cache
    assert "TORCH_EXTENSIONS_DIR=image default" in r.stdout
    i = cmd.index("python")
    assert cmd[i - 2:i] == ["--cpu-bind=none", "--exclusive"]


def test_a_copy_run_from_the_spool_dir_finds_the_checkout_through_submit_dir(fakebin, tmp_path):
    spool = tmp_path / "spool"
    spool.mkdir()
    shutil.copy(SCRIPT, spool / "slurm_script")  # what slurmd runs
    r = run_script(fakebin, script=spool / "slurm_script", cwd=tmp_path,
                   SLURM_SUBMIT_DIR=str(ROOT))
    assert r.returncode == 0, r.stderr
    assert f"root {ROOT}" in r.stdout
    r = run_script(fakebin, script=spool / "slurm_script", cwd=tmp_path)
    assert r.returncode == 2 and "no launch/pretrain.py" in r.stderr


@pytest.mark.parametrize("launcher, cpus", [("srun", "12"), ("deepspeed", "96")])
def test_each_task_gets_its_share_of_the_node_cpus(fakebin, launcher, cpus):
    r = run_script(fakebin, LAUNCHER=launcher, SLURM_CPUS_ON_NODE="96")
    assert r.returncode == 0, r.stderr
    assert f"--cpus-per-task={cpus}" in launch_line(r.stdout)
    r = run_script(fakebin, LAUNCHER=launcher, SLURM_CPUS_ON_NODE="96", CPUS_PER_TASK="4")
    assert "--cpus-per-task=4" in launch_line(r.stdout)


@pytest.mark.parametrize("env, message", [
    ({"SLURM_JOB_NODELIST": None}, "SLURM_JOB_NODELIST is not set"),
    ({"LAUNCHER": "torchrun"}, "LAUNCHER must be srun, deepspeed or deepspeed-pdsh"),
    ({"CONFIG": "configs/nope.yaml"}, "config 'configs/nope.yaml' not found"),
    ({"NNODES": "4"}, "the job has 3 node(s), NNODES=4"),
    ({"GPUS_PER_NODE": "0"}, "GPUS_PER_NODE must be a positive integer"),
    ({"LAUNCHER": "deepspeed-pdsh", "CONTAINER_IMAGE": "img"}, "CONTAINER_IMAGE needs"),
])
def test_bad_settings_stop_with_one_message(fakebin, env, message):
    r = run_script(fakebin, **env)
    assert r.returncode == 2 and message in r.stderr, (r.stdout, r.stderr)
    assert "launch:" not in r.stdout


def test_bash_syntax_and_shellcheck():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck not installed (apt-get install shellcheck)")
    r = subprocess.run(["shellcheck", "-x", str(SCRIPT)], cwd=ROOT, capture_output=True,
                       text=True, check=False)
    assert r.returncode == 0, r.stdout


# ---- end to end: the printed launch lines really train, with a fake srun on this machine ----

@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("corpus"))


def _tiny(corpus, cache):
    return (f"data.path={corpus} data.cache_dir={cache} data.tokenizer_vocab_size=300 "
            "data.val_fraction=0.1 model.hidden_size=32 model.num_layers=2 model.num_heads=2 "
            "model.seq_len=32 train.iters=4 train.micro_batch_size=2 train.global_batch_size=8 "
            "train.log_interval=1 train.eval_interval=4 train.eval_iters=2 "
            "train.save_interval=4 adapters.fraction=0.25 optimizer.warmup_iters=2")


@pytest.mark.slow
def test_srun_and_deepspeed_modes_train_the_same_two_rank_job(fakebin, corpus, tmp_path):
    losses = {}
    for launcher in ("srun", "deepspeed"):
        out, log = tmp_path / f"run-{launcher}", tmp_path / f"srun-{launcher}.log"
        hostfile = tmp_path / f"hosts-{launcher}"
        r = run_script(fakebin, DRY_RUN="0", LAUNCHER=launcher, CONFIG="configs/demo.yaml",
                       OUTPUT_DIR=str(out), SET=_tiny(corpus, tmp_path / "cache"),
                       FAKE_HOSTS="node-a,node-b", SLURM_NNODES="2", GPUS_PER_NODE="1",
                       MASTER_ADDR="127.0.0.1", MASTER_PORT=None, HOSTFILE=str(hostfile),
                       FAKE_SRUN_LOG=str(log), PYTHON=sys.executable, OMP_NUM_THREADS="1",
                       DS_ACCELERATOR="cpu")
        assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
        assert "dp=2" in r.stdout + r.stderr
        assert len(log.read_text().splitlines()) == 1  # one srun step
        if launcher == "deepspeed":
            assert hostfile.read_text() == "node-a slots=1\nnode-b slots=1\n"
        records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        losses[launcher] = [rec["loss"] for rec in records if "loss" in rec]
        assert len(losses[launcher]) == 4
        assert (out / "checkpoints" / "latest").read_text() == "iter_00000004"
    assert losses["srun"] == losses["deepspeed"]  # same ranks, same data order, same math
