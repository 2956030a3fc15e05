// 2:4 gather and scatter at a packed mask's positions (nm_cuda.cu), for the native layer step.
// ATen only (no pybind, no autograd headers): nvcc compiles this translation unit fastest so.
#pragma once

#include <ATen/ATen.h>

namespace slope {

// Kept entries (rows, cols/2), in row-major mask order, of a contiguous 16-bit (rows, cols)
// tensor under a 2:4 mask packed 8 entries per byte (rows, cols/8); cols % 8 == 0.
at::Tensor gather_kept_2to4(const at::Tensor& dense, const at::Tensor& mask_bits);

// Inverse of gather_kept_2to4: the dense (rows, 2*half) tensor holding `values` at the mask's
// positions and 0 elsewhere; with column_bits (a subset of the mask) also 0 where it is 0.
at::Tensor scatter_kept_2to4(const at::Tensor& values, const at::Tensor& mask_bits,
                             const c10::optional<at::Tensor>& column_bits);

}  // namespace slope
