// The native SLoPe layer step (slope_step.cpp) and its 2:4 gather/scatter (nm_ops.cpp):
// declarations for the binding.
#pragma once

#include <torch/extension.h>

namespace slope {

class Plan;

// Kept entries (rows, cols/2), in row-major mask order, of a contiguous 16-bit (rows, cols)
// tensor under a 2:4 mask packed 8 entries per byte (rows, cols/8); cols % 8 == 0 (nm_ops.cpp).
at::Tensor gather_kept_2to4(const at::Tensor& dense, const at::Tensor& mask_bits);

// Inverse of gather_kept_2to4: the dense (rows, 2*half) tensor holding `values` at the mask's
// positions and 0 elsewhere; with column_bits (a subset of the mask) also 0 where it is 0.
at::Tensor scatter_kept_2to4(const at::Tensor& values, const at::Tensor& mask_bits,
                             const c10::optional<at::Tensor>& column_bits);

// Fill `out` (in, out_features/2) with W_RC^T's compressed values from the kept-values weight
// (out_features, in/2) by the per-slot codes (in, out_features/2) of nm_triton.py.
void gather_wt_values(const at::Tensor& weight, const at::Tensor& codes, const at::Tensor& out);

// Y = X (W*M)^T + b on the compressed W, with a C++ backward: dX on the compressed W_RC^T,
// dW = (dY^T X)[M] by cuBLAS + gather, db = sum dY. The plans must be tuned already.
// Operands kept: wt_buf is the layer's compressed W_RC^T. Operands per call: wt_buf is the
// shared scratch, and the backward fills it first (values gathered by wt_codes, then
// wt_meta), since other layers' calls reuse it between this forward and this backward.
torch::Tensor sparse_slope_linear(const torch::Tensor& x, const torch::Tensor& weight,
                                  const c10::optional<torch::Tensor>& bias,
                                  const torch::Tensor& fwd_buf,
                                  const c10::optional<torch::Tensor>& wt_buf,
                                  const torch::Tensor& mask_bits, Plan& fwd_plan, Plan& wt_plan,
                                  bool bias_in_epilogue,
                                  const c10::optional<torch::Tensor>& wt_codes,
                                  const c10::optional<torch::Tensor>& wt_meta);

// The reference's three GEMMs on cuBLAS, W*M and W*M*M_C scattered from the kept values: the
// `cublas` backend's step with a C++ backward.
torch::Tensor dense_slope_linear(const torch::Tensor& x, const torch::Tensor& weight,
                                 const c10::optional<torch::Tensor>& bias,
                                 const torch::Tensor& mask_bits,
                                 const torch::Tensor& column_bits);

}  // namespace slope
