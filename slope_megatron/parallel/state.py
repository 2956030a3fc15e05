"""Process groups for tensor (TP), pipeline (PP) and data (DP) parallelism.

All three come from ONE DeepSpeed `PipeModelDataParallelTopology` (axes pipe, data,
model; TP fastest-varying as in Megatron), so our TP groups, DeepSpeed's DP groups and its
pipeline engine agree on who is who. `ParallelState` also implements the small `mpu`
interface DeepSpeed asks for, so ZeRO reduces over DP only and gradient-norm clipping
counts TP-sharded parameters once.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch.distributed as dist


@dataclass
class ParallelState:
    tp_size: int
    pp_size: int
    dp_size: int
    tp_rank: int
    pp_rank: int
    dp_rank: int
    tp_group: Optional[object]
    pp_group: Optional[object]
    dp_group: Optional[object]
    topology: object

    # ---- the `mpu` interface DeepSpeed uses -------------------------------------------
    def get_model_parallel_rank(self): return self.tp_rank
    def get_model_parallel_world_size(self): return self.tp_size
    def get_model_parallel_group(self): return self.tp_group
    def get_tensor_model_parallel_rank(self): return self.tp_rank
    def get_tensor_model_parallel_world_size(self): return self.tp_size
    def get_tensor_model_parallel_group(self): return self.tp_group
    def get_data_parallel_rank(self): return self.dp_rank
    def get_data_parallel_world_size(self): return self.dp_size
    def get_data_parallel_group(self): return self.dp_group
    def get_pipeline_model_parallel_rank(self): return self.pp_rank
    def get_pipeline_model_parallel_world_size(self): return self.pp_size
    def get_pipeline_model_parallel_group(self): return self.pp_group


_STATE: Optional[ParallelState] = None


def _my_group(topology, axis: str, rank: int):
    """Create every group along `axis` (all ranks must) and return the one holding `rank`."""
    mine = None
    for ranks in topology.get_axis_comm_lists(axis):
        group = dist.new_group(ranks)
        if rank in ranks:
            mine = group
    return mine


def initialize_parallel(tp: int, pp: int) -> ParallelState:
    """Build the groups for a tp x pp x dp layout over the current world."""
    global _STATE
    from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

    world, rank = dist.get_world_size(), dist.get_rank()
    if world % (tp * pp) != 0:
        raise ValueError(f"world size {world} is not divisible by tp ({tp}) x pp ({pp})")
    dp = world // (tp * pp)
    topo = PipeModelDataParallelTopology(num_pp=pp, num_mp=tp, num_dp=dp)
    coord = topo.get_coord(rank)
    _STATE = ParallelState(
        tp_size=tp, pp_size=pp, dp_size=dp, tp_rank=coord.model, pp_rank=coord.pipe,
        dp_rank=coord.data, tp_group=_my_group(topo, "model", rank),
        pp_group=_my_group(topo, "pipe", rank), dp_group=_my_group(topo, "data", rank),
        topology=topo)
    return _STATE


def get_parallel_state() -> Optional[ParallelState]:
    """The current layout, or None when no parallel layout was initialised (TP = 1)."""
    return _STATE


def reset_parallel_state() -> None:
    global _STATE
    _STATE = None

