// 2:4 gather and scatter kernels at a packed mask's positions (nm_cuda.cu), for the native step.
//
// Plain CUDA, no ATen: the tensor-level checks live in nm_ops.cpp, compiled by the host
// compiler. nvcc compiles this unit in ~25 s instead of ~2 min with torch's headers (2-core
// machine), which every fresh GPU machine pays on first use. (An earlier guess that ATen in the
// nvcc unit caused the extension's crashing error messages was wrong: see check_text.h.)
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace slope {

// Kept values (n_bytes * 4 of them) of a row-major 16-bit dense tensor (n_bytes * 8 entries,
// rows a multiple of 8 long) under its packed 2:4 mask (n_bytes bytes). Returns the launch status.
cudaError_t launch_gather_kept_2to4(const void* dense, const uint8_t* bits, void* out,
                                    int64_t n_bytes, cudaStream_t stream);

// Inverse: the dense tensor from its kept values, zero elsewhere and, with column_bits (may be
// null), also where that mask is 0.
cudaError_t launch_scatter_kept_2to4(const void* values, const uint8_t* bits,
                                     const uint8_t* column_bits, void* out, int64_t n_bytes,
                                     cudaStream_t stream);

// The values block (n_rows = in, n_slots = out / 2) of the compressed double-pruned W_RC^T,
// gathered from the kept-values weight (out, k_w = in / 2) by per-slot codes (nm_triton.py).
cudaError_t launch_gather_wt_values(const void* weight, const uint8_t* codes, void* out,
                                    int64_t n_rows, int64_t n_slots, int64_t k_w,
                                    cudaStream_t stream);

}  // namespace slope
