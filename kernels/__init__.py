"""Native and Triton kernels for slope_megatron's GPU fast path (installed as
`slope_megatron.kernels`; the sources stay in the checkout's top-level kernels/ folder).

Nothing here is imported by the CPU code paths: the sparsity backends import these modules
only once they know CUDA (or the Triton interpreter) is there. Modules:
- `cslt_loader`: builds (on first use) and loads the native extension: the cuSPARSELt binding
  (`cslt_binding.cpp`, `cslt_plan.h`), the native SLoPe layer step (`slope_step.cpp`: C++
  autograd functions for the cusparselt and cublas backends) and its 2:4 gather/scatter
  (`nm_ops.cpp`, `nm_cuda.cu`).
- `cslt_plans`: plans cached per (m, k, n, dtype, device) with searched, persisted algorithms.
- `nm_triton`: memory-bound 2:4 pieces (gather/scatter of kept values, the W^T tags and values).
- `double_prune_triton`: the double-pruned column mask refreshed from the current weights.
- `lowrank_triton`: the lazy adapter's term, added in place or as widened GEMM columns.
- `decode24_layout` / `decode24_triton` / `decode24_config`: the 2:4 decode GEMM for 1-64
  tokens (kept values plus 2-bit index metadata; the dense tile rebuilt in registers) and its
  launch parameters, an inference option;
  `decode24_cslt_meta`: cuSPARSELt's metadata layout on sm90, which the kernel can read in place.
"""
