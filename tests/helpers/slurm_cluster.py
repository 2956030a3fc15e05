"""A real one-node SLURM cluster on this machine, for the tests: Debian's munge, slurmctld and
slurmd (installed with apt-get when missing), a generated slurm.conf in a private directory,
free ports, and daemons stopped by their own pids at the end.

Why real: the stop-and-save protocol depends on what SLURM actually does - which processes
`scancel --signal` reaches, what `--signal=B:USR1@<s>` sends to the batch shell, what srun
passes on, what a requeue looks like to the script - which a stand-in srun cannot show.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

PACKAGES = ("slurmd", "slurmctld", "munge")
DAEMONS = ("munged", "slurmctld", "slurmd")


class Unavailable(Exception):
    """SLURM cannot be installed or started here (the reason says why)."""


def _run(*cmd, timeout=60, env=None, check=True):
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env,
                       check=False)
    if check and r.returncode != 0:
        raise Unavailable(f"{' '.join(cmd)} failed ({r.returncode}): {r.stderr.strip()[-500:]}")
    return r


def ensure_installed() -> None:
    """apt-get install the packages when a daemon is missing (root only)."""
    if all(shutil.which(d) or Path(f"/usr/sbin/{d}").exists() for d in DAEMONS):
        return
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise Unavailable("slurmd/slurmctld/munge are not installed and cannot be "
                          "(needs root and apt-get)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    _run("apt-get", "update", "-qq", timeout=300, env=env)
    _run("apt-get", "install", "-y", "-qq", *PACKAGES, timeout=600, env=env)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _conf(root: Path, node: str) -> str:
    return f"""ClusterName=slopetest
SlurmctldHost={node}(127.0.0.1)
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={root}/munge.sock,cred_expire=10
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
ReturnToService=2
KillWait=10
MinJobAge=600
NodeName={node} NodeAddr=127.0.0.1 CPUs={os.cpu_count()} State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""


@dataclass
class Cluster:
    root: Path
    env: dict  # the environment for sbatch, scancel, squeue, scontrol (SLURM_CONF)

    def run(self, *cmd, timeout=60) -> str:
        return _run(*cmd, timeout=timeout, env=self.env).stdout.strip()

    def job(self, job_id: str) -> dict:
        """`scontrol show job` as a dict (JobState, ExitCode, Restarts, ...)."""
        text = self.run("scontrol", "show", "job", job_id)
        return dict(item.split("=", 1) for item in text.split() if "=" in item)

    def wait_state(self, job_id: str, states: set, timeout: float) -> dict:
        deadline = time.time() + timeout
        while True:
            info = self.job(job_id)
            if info.get("JobState") in states:
                return info
            if time.time() > deadline:
                raise TimeoutError(f"job {job_id} still {info.get('JobState')} after "
                                   f"{timeout:.0f} s (wanted {sorted(states)})")
            time.sleep(0.5)

    def stop(self) -> None:
        _run("scancel", "--full", "--user=root", timeout=30, env=self.env, check=False)
        for name in ("slurmd", "slurmctld", "munged"):
            pid_file = self.root / f"{name}.pid"
            try:
                os.kill(int(pid_file.read_text().split()[0]), signal.SIGTERM)
            except (OSError, ValueError):
                pass


def start(root: Path) -> Cluster:
    """A one-node cluster whose state lives under `root` (stop() it at the end)."""
    ensure_installed()
    node = socket.gethostname().split(".")[0]
    for sub in ("state", "spool"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    root.chmod(0o755)  # munged wants a socket directory everyone may enter
    key = root / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o600)
    conf = root / "slurm.conf"
    conf.write_text(_conf(root, node))
    env = {**os.environ, "SLURM_CONF": str(conf)}
    cluster = Cluster(root, env)
    try:
        _run("munged", "--force", f"--key-file={key}", f"--socket={root}/munge.sock",
             f"--pid-file={root}/munged.pid", f"--log-file={root}/munged.log",
             f"--seed-file={root}/munged.seed", env=env)
        _run("slurmctld", "-i", env=env)
        _run("slurmd", "-N", node, env=env)
        deadline = time.time() + 60
        while cluster.run("sinfo", "-h", "-o", "%T") != "idle":
            if time.time() > deadline:
                logs = "".join((root / f).read_text()[-800:] for f in
                               ("slurmctld.log", "slurmd.log") if (root / f).exists())
                raise Unavailable(f"the node did not become idle in 60 s: {logs}")
            time.sleep(0.5)
    except BaseException:
        cluster.stop()
        raise
    return cluster
