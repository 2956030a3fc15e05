"""Process groups and the one set of collectives every part of a run uses.

Start-up, for every way users launch us:

- `deepspeed launch/pretrain.py` and `torchrun`: RANK / WORLD_SIZE / LOCAL_RANK /
  MASTER_ADDR / MASTER_PORT are set by the launcher.
- `mpirun -n N python launch/pretrain.py` or `srun` with PMI: ranks are discovered through
  mpi4py and rank 0's address and a free port are broadcast to everyone.
- `srun` without MPI: inside an srun job step, SLURM_PROCID / SLURM_STEP_NUM_TASKS /
  SLURM_LOCALID are mapped over (not SLURM_NTASKS: an sbatch script or salloc shell has that
  too, and is one process; see slurm_step_layout).
- plain `python launch/pretrain.py` (also in a batch script or salloc shell): a world of one
  on 127.0.0.1 and a free port.
An environment that contradicts itself (a rank not below its world size, a step without its
task count, ...) raises SlopeError, which launch/pretrain.py prints as one `error:` line.
The backend is NCCL on GPUs and gloo on CPUs (what DeepSpeed's accelerator reports).

Collectives (each a no-op in a world of one, so single-process code needs no branch):
barrier, all_reduce_mean, all_gather_float, all_gather_object, any_rank, and share_failure,
which turns one rank's error into the same clean error on every rank.
"""
from __future__ import annotations

import gc
import logging
import os
import socket
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .errors import SlopeError

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


# Slurm's own step ids (slurm.h): above SLURM_MAX_NORMAL_STEP_ID (0xfffffff0) are the special
# steps, e.g. SLURM_BATCH_SCRIPT 0xfffffffb (the batch script), SLURM_EXTERN_CONT 0xfffffffc,
# SLURM_INTERACTIVE_STEP 0xfffffffa (salloc's shell under use_interactive_step).
_SLURM_MAX_NORMAL_STEP_ID = 0xFFFFFFF0
_WHAT_TO_DO = ("unset the stale variables to run one process, or start the ranks with srun, "
               "torchrun, deepspeed or mpirun")


def _env_int(env, name: str, *, minimum: int = 0) -> int:
    value = env[name]
    try:
        number = int(value)
    except ValueError:
        number = None
    if number is None or number < minimum:
        raise SlopeError(f"launcher environment: {name}={value!r} is not an integer >= {minimum}; "
                         f"{_WHAT_TO_DO}")
    return number


def _check_rank(env, rank_var: str, world_var: str) -> tuple[int, int]:
    rank, world = _env_int(env, rank_var), _env_int(env, world_var, minimum=1)
    if rank >= world:
        raise SlopeError(f"launcher environment: {rank_var}={rank} is not below "
                         f"{world_var}={world}; {_WHAT_TO_DO}")
    return rank, world


def slurm_step_layout(environ=None) -> tuple[int, int, int] | None:
    """(rank, world size, local rank) of this task in an srun job step; None outside one.

    Slurm semantics relied on (SchedMD/slurm src/common/env.c): every srun step's tasks get
    SLURM_STEP_ID (the step number, printed unsigned) and SLURM_STEP_NUM_TASKS
    (env_array_for_step), and SLURM_PROCID/SLURM_LOCALID from slurmstepd. The batch script's
    environment (env_array_for_batch_job) sets the job's SLURM_NTASKS but no SLURM_STEP_*, and
    setup_env only exports SLURM_STEP_ID for a step id that is non-negative as a C int, which
    the batch step's SLURM_BATCH_SCRIPT (0xfffffffb) is not; salloc's shell (env_array_for_job)
    has no step either, or runs in the special interactive step 0xfffffffa. So SLURM_NTASKS and
    SLURM_PROCID alone describe the allocation, not this process: only a normal step id (at most
    SLURM_MAX_NORMAL_STEP_ID, slurm.h) says srun started us, with SLURM_STEP_NUM_TASKS tasks.
    Raises SlopeError where a normal step's variables are missing or contradict each other.
    """
    env = os.environ if environ is None else environ
    if "SLURM_STEP_ID" not in env or _env_int(env, "SLURM_STEP_ID") > _SLURM_MAX_NORMAL_STEP_ID:
        # no step, or the batch, extern or interactive step: one process, whose SLURM_PROCID
        # (if any) is 0; another rank here means a launcher that set SLURM_PROCID alone
        if "SLURM_PROCID" in env and _env_int(env, "SLURM_PROCID") != 0:
            step = f"SLURM_STEP_ID={env['SLURM_STEP_ID']}" if "SLURM_STEP_ID" in env \
                else "SLURM_STEP_ID is not set"
            raise SlopeError(f"launcher environment: SLURM_PROCID={env['SLURM_PROCID']} outside "
                             f"an srun job step ({step}); {_WHAT_TO_DO}")
        return None
    missing = [v for v in ("SLURM_PROCID", "SLURM_STEP_NUM_TASKS") if v not in env]
    if missing:
        raise SlopeError(f"launcher environment: SLURM_STEP_ID={env['SLURM_STEP_ID']} (an srun "
                         f"step) but {' and '.join(missing)} not set; {_WHAT_TO_DO}")
    rank, world = _check_rank(env, "SLURM_PROCID", "SLURM_STEP_NUM_TASKS")
    local = _env_int(env, "SLURM_LOCALID") if "SLURM_LOCALID" in env else 0
    return rank, world, local


def _torch_layout(env) -> tuple[int, int] | None:
    """(RANK, WORLD_SIZE) as torchrun/deepspeed set them; None where neither is set."""
    present = [v for v in ("RANK", "WORLD_SIZE") if v in env]
    if not present:
        return None
    if len(present) == 1:
        other = "WORLD_SIZE" if present[0] == "RANK" else "RANK"
        raise SlopeError(f"launcher environment: {present[0]}={env[present[0]]} is set but "
                         f"{other} is not (torchrun and deepspeed set both); {_WHAT_TO_DO}")
    return _check_rank(env, "RANK", "WORLD_SIZE")


def process_rank(environ=None) -> int:
    """This process's global rank, read from the environment before any process group exists
    and by the same rules as discover_environment (launch/pretrain.py: who prints errors).

    0 where the environment is inconsistent: discover_environment then raises SlopeError, and
    this process must be one that prints it.
    """
    env = os.environ if environ is None else environ
    try:
        torch_layout = _torch_layout(env)
        if torch_layout is not None:
            return torch_layout[0]
        mpi_var = next((v for v in _MPI_RANK_VARS if v in env), None)
        if mpi_var is not None:
            return _env_int(env, mpi_var)
        step = slurm_step_layout(env)
        return step[0] if step is not None else 0
    except SlopeError:
        return 0


def discover_environment() -> str:
    """Fill the torch.distributed variables from whichever launcher started us.

    Launcher-set RANK/WORLD_SIZE first, then MPI, then an srun step; otherwise one process.
    """
    if _torch_layout(os.environ) is not None:
        return "torch"
    mpi_var = next((v for v in _MPI_RANK_VARS if v in os.environ), None)
    if mpi_var is not None:
        try:
            return _from_mpi()  # before reading SLURM_*: mpirun's own daemons run in a step
        except ImportError:
            if slurm_step_layout() is None:  # srun --mpi=pmix without mpi4py: use SLURM_*
                raise SlopeError(f"launched under MPI ({mpi_var} is set) but mpi4py is not "
                                 "installed: pip install mpi4py, or launch with torchrun/"
                                 "deepspeed") from None
    step = slurm_step_layout()
    if step is not None and step[1] > 1:
        rank, world, local = step
        if "MASTER_ADDR" not in os.environ or "MASTER_PORT" not in os.environ:
            raise SlopeError(f"srun started {world} tasks (SLURM_STEP_NUM_TASKS={world}) without "
                             "MPI: export MASTER_ADDR and MASTER_PORT before srun "
                             "(launch/slurm/pretrain.sbatch does), or use srun --mpi=pmix with "
                             "mpi4py")
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(local))
        return "slurm"
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=os.environ.get("MASTER_PORT", str(_free_port())))
    return "slurm" if step is not None else "single"


def init_distributed() -> DistInfo:
    """Start the default process group (idempotent) and bind this rank's GPU."""
    launcher = discover_environment()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
    elif "OMP_NUM_THREADS" not in os.environ:
        # CPU ranks share the cores; oversubscribed BLAS threads slow every rank down many times
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


def _destroy_groups() -> None:
    """destroy_process_group() for every group; through deepspeed.comm where DeepSpeed set the
    default group up (init_distributed), which also drops DeepSpeed's registry of groups."""
    ds_comm = sys.modules.get("deepspeed.comm")
    if ds_comm is not None and ds_comm.is_initialized():
        ds_comm.destroy_process_group()
    else:
        dist.destroy_process_group()


def _release_group_references() -> None:
    """Drop the module-level references to process groups that outlive destroy_process_group
    (which only shuts the groups down; a gloo group's worker and transport threads are joined
    when its last reference goes): our ParallelState and the pipeline engine's p2p grid
    (every pipe/data/slice group), which DeepSpeed never releases."""
    from .parallel.state import reset_parallel_state

    reset_parallel_state()
    p2p = sys.modules.get("deepspeed.runtime.pipe.p2p")
    if p2p is not None:
        for name in ("_grid", "_groups"):  # their initial values
            if getattr(p2p, name, None) is not None:
                setattr(p2p, name, None)


def shutdown_distributed(completed: bool) -> None:
    """The end of a run's distributed life on this rank; launch/pretrain.py calls it on every
    way out, after train() returned (`completed`) or raised.

    1. completed: a barrier, so no rank shuts its groups down while a peer is still in a
       collective or a pipeline send/recv. Not after an error: a peer may be stuck elsewhere
       or gone, and the barrier would wait for the gloo/NCCL timeout.
    2. destroy_process_group(): every group - the default one, ours (TP/PP/DP), DeepSpeed's.
    3. The stale references to those groups are dropped and a collection runs, so the groups'
       C++ objects (a gloo group has a transport thread and two worker threads) are destroyed
       here, while the interpreter is fully alive, instead of during interpreter shutdown in
       whatever order finalization reaches them.
    Never raises: a teardown problem must not replace the run's own exit status or error.
    After a finished run, train() has destroyed the DeepSpeed engine already (its teardown
    still asks the process group for the rank); after an error the engine is left alive and
    keeps its groups until exit (its teardown could wait on a failed peer).
    """
    log = logging.getLogger(__name__)
    if dist.is_initialized():
        if completed and dist.get_world_size() > 1:
            try:
                dist.barrier()
            except Exception as e:  # noqa: BLE001 - a peer died after finishing: still tear down
                log.warning("final barrier before process-group teardown failed: %s", e)
        try:
            _destroy_groups()
        except Exception as e:  # noqa: BLE001
            log.warning("destroy_process_group failed: %s", e)
    try:
        _release_group_references()
    except Exception as e:  # noqa: BLE001
        log.warning("releasing process-group references failed: %s", e)
    gc.collect()


def all_reduce_mean(value: float) -> float:
    """Mean of a Python float over all ranks (on the accelerator's device)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return value
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() \
        else torch.device("cpu")
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.item() / dist.get_world_size()


def all_gather_float(value: float) -> list[float]:
    """`value` of every rank, by global rank (one all-gather; [value] on a single process)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [value]
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() \
        else torch.device("cpu")
    mine = torch.tensor([value], dtype=torch.float64, device=device)
    every = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(every, mine)
    return [t.item() for t in every]


def any_rank(flag: bool) -> bool:
    """True on every rank when `flag` is True on any (one scalar all-reduce)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0])
    if torch.cuda.is_available():
        t = t.cuda()
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def rank_and_world() -> tuple[int, int]:
    """(global rank, world size); (0, 1) before any process group exists."""
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def all_gather_object(obj) -> list:
    """`obj` of every rank, by global rank ([obj] in a world of one)."""
    world = rank_and_world()[1]
    if world == 1:
        return [obj]
    out = [None] * world
    dist.all_gather_object(out, obj)
    return out


def gather_object_on_rank_0(obj) -> list | None:
    """`obj` of every rank, by global rank, on rank 0; None on the others ([obj] in a world of
    one)."""
    rank, world = rank_and_world()
    if world == 1:
        return [obj]
    out = [None] * world if rank == 0 else None
    dist.gather_object(obj, out, dst=0)
    return out


def mark_every_rank(error: Exception) -> Exception:
    """Mark an error that every rank raises alike, so rank 0's `error:` line says it for all
    (launch/pretrain.py prints a non-zero rank's own error only when not so marked)."""
    try:
        error.every_rank = True
    except AttributeError:  # an exception type that takes no attributes
        pass
    return error


def share_failure(error: Exception | None, doing: str) -> None:
    """Collective: raise on every rank when any rank failed (instead of the others dying in
    the next collective, or hanging in it). The failing rank raises its own exception; the
    others raise the same user error (a SlopeError of the same class and message) when rank
    0 failed with one, else a SlopeError naming the rank and what it was `doing`, so each
    rank exits 2 and rank 0 prints the one `error:` line (every raised error is marked
    `every_rank`). Also a barrier."""
    if rank_and_world()[1] == 1:
        if error is not None:
            raise error
        return
    mine = None
    if isinstance(error, SlopeError):
        mine = (type(error), str(error))
    elif error is not None:
        mine = (None, f"{type(error).__name__}: {error}")
    everyone = all_gather_object(mine)
    if error is not None:
        mark_every_rank(error)
        raise error
    for rank, failure in enumerate(everyone):
        if failure is None:
            continue
        cls, message = failure
        if rank != 0 or cls is None:
            raise mark_every_rank(SlopeError(f"rank {rank} failed while {doing}: {message}"))
        try:
            shared = cls(message)
        except Exception:  # noqa: BLE001 - a SlopeError class that takes other arguments
            shared = SlopeError(message)
        raise mark_every_rank(shared)
