"""Native and Triton kernels for slope_megatron's GPU fast path.

Nothing here is imported by the CPU code paths: `slope_megatron.sparsity.backends.cusparselt`
imports these modules only once it knows CUDA is present. Contents:
- `cslt_loader`: builds (on first use) and loads the cuSPARSELt binding in `cslt_binding.cpp`.
- `cslt_plans`: plans cached per (m, k, n, dtype, device) with searched, persisted algorithms.
- `nm_triton`: memory-bound pieces (masked gather of dW, refresh of the double-pruned W^T).
"""
