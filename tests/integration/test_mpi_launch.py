"""`mpirun -n 2 python launch/pretrain.py ...`: ranks discovered through mpi4py, on CPU.

Needs an `mpirun` on PATH and an mpi4py built for that MPI (`pip install mpich mpi4py` gives
both). Skipped only when there is no `mpirun` at all.
"""
import json
import os
import shutil
import subprocess
import sys

import pytest
from helpers.corpus import write_corpus

from helpers.paths import ROOT
MPIRUN = shutil.which("mpirun") or shutil.which("mpiexec")
# variables another launcher (or an outer test runner) may have left: discovery must go
# through MPI, not through these
_LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
                  "MASTER_PORT", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK")

pytestmark = pytest.mark.skipif(MPIRUN is None, reason="no mpirun/mpiexec on PATH "
                                "(pip install mpich mpi4py gives a working MPI)")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("corpus"))


def _env():
    env = {k: v for k, v in os.environ.items()
           if k not in _LAUNCHER_VARS and not k.startswith("SLURM_")}
    env.update(OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", PYTHONUNBUFFERED="1",
               # harmless for MPICH; lets an Open MPI mpirun start as root (CI runs as root)
               OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    return env


def _mpirun(n, *overrides, timeout=180):
    cmd = [MPIRUN, "-n", str(n), sys.executable, str(ROOT / "launch" / "pretrain.py"),
           "--config", str(ROOT / "configs" / "demo.yaml"), "--set", *overrides]
    return subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True,
                          timeout=timeout, check=False)


def _tiny(corpus, out):
    return [f"data.path={corpus}", f"data.cache_dir={out.parent / 'cache'}",
            "data.tokenizer_vocab_size=300", "data.val_fraction=0.1", "model.hidden_size=32",
            "model.num_layers=2", "model.num_heads=2", "model.seq_len=32", "train.iters=4",
            "train.micro_batch_size=2", "train.global_batch_size=8", "train.log_interval=1",
            "train.eval_interval=4", "train.eval_iters=2", "train.save_interval=4",
            "adapters.fraction=0.25", "optimizer.warmup_iters=2", f"train.output_dir={out}"]


@pytest.mark.slow
def test_mpirun_two_processes_train_as_one_data_parallel_job(corpus, tmp_path):
    pytest.importorskip("mpi4py", reason="mpirun found but mpi4py is not installed: "
                        "pip install mpi4py (the test extra should bring it)")
    out = tmp_path / "run"
    r = _mpirun(2, *_tiny(corpus, out))
    log = r.stdout + r.stderr
    assert r.returncode == 0, log[-4000:]
    # one job of two data-parallel ranks, not two independent single-process runs
    assert "dp=2" in log, log[-4000:]
    assert log.count("saved checkpoint") == 1, log[-4000:]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [rec for rec in records if "loss" in rec]
    assert [rec["iter"] for rec in train] == [1, 2, 3, 4]
    assert train[0]["tokens"] == 8 * 32  # the global batch, summed over both ranks
    assert [rec["adapters_active"] for rec in train] == [False, False, False, True]  # iter 4
    assert [rec["iter"] for rec in records if "val_loss" in rec] == [4]
    assert (out / "checkpoints" / "latest").read_text() == "iter_00000004"
    assert (out / "checkpoints" / "iter_00000004" / "slope_model" / "model.safetensors").is_file()


def test_mpirun_config_error_is_printed_once(tmp_path):
    r = _mpirun(2, "model.hiden_size=3", f"train.output_dir={tmp_path / 'bad'}", timeout=120)
    assert r.returncode == 2
    assert r.stderr.count("error: unknown config key 'model.hiden_size'") == 1, r.stderr
