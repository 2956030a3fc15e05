"""Native and Triton kernels for slope_megatron's GPU fast path.

Nothing here is imported by the CPU code paths: `slope_megatron.sparsity.backends.cusparselt`
imports these modules only once it knows CUDA is present. Contents:
- `cslt_loader`: builds (on first use) and loads the native extension: the cuSPARSELt binding
  (`cslt_binding.cpp`, `cslt_plan.h`) and the native SLoPe layer step (`slope_step.cpp`: C++
  autograd functions for the cusparselt and cublas backends; `nm_cuda.cu`: their 2:4
  gather/scatter).
- `cslt_plans`: plans cached per (m, k, n, dtype, device) with searched, persisted algorithms.
- `nm_triton`: memory-bound pieces (masked gather of dW, refresh of the double-pruned W^T).
"""
