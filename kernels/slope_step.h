// The native SLoPe layer step (slope_step.cpp): declarations for the binding.
#pragma once

#include <torch/extension.h>

#include "nm_cuda.h"

namespace slope {

class Plan;

// Y = X (W*M)^T + b on the compressed W, with a C++ backward: dX on the compressed W_RC^T,
// dW = (dY^T X)[M] by cuBLAS + gather, db = sum dY. The plans must be tuned already.
torch::Tensor sparse_slope_linear(const torch::Tensor& x, const torch::Tensor& weight,
                                  const c10::optional<torch::Tensor>& bias,
                                  const torch::Tensor& fwd_buf,
                                  const c10::optional<torch::Tensor>& wt_buf,
                                  const torch::Tensor& mask_bits, Plan& fwd_plan, Plan& wt_plan,
                                  bool bias_in_epilogue);

// The reference's three GEMMs on cuBLAS, W*M and W*M*M_C scattered from the kept values: the
// `cublas` backend's step with a C++ backward.
torch::Tensor dense_slope_linear(const torch::Tensor& x, const torch::Tensor& weight,
                                 const c10::optional<torch::Tensor>& bias,
                                 const torch::Tensor& mask_bits,
                                 const torch::Tensor& column_bits);

}  // namespace slope
