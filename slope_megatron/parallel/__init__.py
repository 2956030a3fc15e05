"""Megatron-style tensor parallelism (and the groups DeepSpeed's pipeline/ZeRO use)."""
from .layers import (ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding,
                     vocab_parallel_lm_loss)
from .mappings import copy_to_tp, gather_from_tp, reduce_from_tp, scatter_to_tp
from .state import ParallelState, get_parallel_state, initialize_parallel, reset_parallel_state

__all__ = ["ParallelState", "initialize_parallel", "get_parallel_state", "reset_parallel_state",
           "copy_to_tp", "reduce_from_tp", "scatter_to_tp", "gather_from_tp",
           "ColumnParallelLinear", "RowParallelLinear", "VocabParallelEmbedding",
           "vocab_parallel_lm_loss"]
