"""Process-group start-up for every way users launch us.

- `deepspeed launch/pretrain.py` and `torchrun`: RANK / WORLD_SIZE / LOCAL_RANK /
  MASTER_ADDR / MASTER_PORT are set by the launcher.
- `mpirun -n N python launch/pretrain.py` or `srun` with PMI: ranks are discovered through
  mpi4py and rank 0's address and a free port are broadcast to everyone.
- `srun` without MPI: SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID are mapped over.
- plain `python launch/pretrain.py`: a world of one on 127.0.0.1 and a free port.
The backend is NCCL on GPUs and gloo on CPUs (what DeepSpeed's accelerator reports).
"""
from __future__ import annotations

import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist

_MPI_RANK_VARS = ("OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK", "MV2_COMM_WORLD_RANK")


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    launcher: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _from_mpi() -> str:
    from mpi4py import MPI  # optional dependency, only for MPI launches

    comm = MPI.COMM_WORLD
    addr_port = None
    if comm.Get_rank() == 0:
        addr = os.environ.get("MASTER_ADDR") or socket.getfqdn()  # not a loopback alias
        addr_port = (addr, os.environ.get("MASTER_PORT") or str(_free_port()))
    addr, port = comm.bcast(addr_port, root=0)
    local = comm.Split_type(MPI.COMM_TYPE_SHARED).Get_rank()
    os.environ.update(RANK=str(comm.Get_rank()), WORLD_SIZE=str(comm.Get_size()),
                      LOCAL_RANK=str(local), MASTER_ADDR=addr, MASTER_PORT=port)
    return "mpi"


def discover_environment() -> str:
    """Fill the torch.distributed variables from whichever launcher started us."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return "torch"
    if any(v in os.environ for v in _MPI_RANK_VARS):
        try:
            return _from_mpi()
        except ImportError:
            if "SLURM_PROCID" not in os.environ:  # srun --mpi=pmix without mpi4py: use SLURM_*
                raise RuntimeError("launched under MPI but mpi4py is not installed; "
                                   "pip install mpi4py (or launch with torchrun/deepspeed)")
    if "SLURM_PROCID" in os.environ and "SLURM_NTASKS" in os.environ:
        os.environ.update(RANK=os.environ["SLURM_PROCID"], WORLD_SIZE=os.environ["SLURM_NTASKS"],
                          LOCAL_RANK=os.environ.get("SLURM_LOCALID", "0"))
        if "MASTER_ADDR" not in os.environ:
            raise RuntimeError("srun without MPI needs MASTER_ADDR/MASTER_PORT exported "
                               "(launch/slurm/pretrain.sbatch sets them)")
        return "slurm"
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=os.environ.get("MASTER_PORT", str(_free_port())))
    return "single"


def init_distributed() -> DistInfo:
    """Start the default process group (idempotent) and bind this rank's GPU."""
    launcher = discover_environment()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
    elif "OMP_NUM_THREADS" not in os.environ:
        # CPU ranks share the cores; oversubscribed BLAS threads made a 2-rank run ~20x slower
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, local_world)))
    if not dist.is_initialized():
        import deepspeed
        from deepspeed.accelerator import get_accelerator

        deepspeed.init_distributed(dist_backend=get_accelerator().communication_backend_name())
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, launcher)


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce_mean(value: float) -> float:
    """Mean of a Python float over all ranks (on the accelerator's device)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return value
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() \
        else torch.device("cpu")
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.item() / dist.get_world_size()
