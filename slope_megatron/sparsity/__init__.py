"""SLoPe sparsity: N:M masks, the double-pruned sparse linear, lazy low-rank adapters."""
from .functional import SlopeLinearFunction, dense_from_values, slope_linear, values_from_dense
from .linear import SlopeLinear, adapter_rank
from .masks import double_prune_mask, expected_double_pruned_density, mask_stats, nm_mask
from .model_hooks import adapters_active, after_optimizer_step, enable_adapters, slope_layers

__all__ = [
    "SlopeLinear", "SlopeLinearFunction", "slope_linear", "dense_from_values",
    "values_from_dense", "adapter_rank", "nm_mask", "double_prune_mask",
    "expected_double_pruned_density", "mask_stats", "adapters_active",
    "after_optimizer_step", "enable_adapters", "slope_layers",
]
