// SLoPe's linear layer as C++ autograd functions: the whole step issues its kernels from C++.
//
// Why: the Python autograd functions (cusparselt_function.py, cublas.py) take 2-3x the host time
// of nn.Linear per layer step (docs/KERNELS.md): their backward re-enters Python on autograd's
// device thread, and each Triton launch costs tens of microseconds of host time. Small and
// medium models are host-bound for that reason. Here forward and backward are one
// torch::autograd::Function each, the gathers/scatters are CUDA kernels (nm_cuda.cu), and the
// math is that of the Python functions, op for op (the cublas variant is bit for bit the
// reference's, like its Python twin; tests/gpu/test_native_step_gpu.py compares them).
#include "slope_step.h"

#include <torch/autograd.h>

#include "check_text.h"
#include "cslt_plan.h"

namespace slope {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

torch::Tensor as_rows(const torch::Tensor& t) {
  return t.reshape({-1, t.size(-1)}).contiguous();  // no copy when already contiguous
}

std::vector<int64_t> with_last(at::IntArrayRef sizes, int64_t last) {
  std::vector<int64_t> out(sizes.begin(), sizes.end());
  out.back() = last;
  return out;
}

// Per-call operands: W_RC^T built in the shared scratch (uint8) right before its GEMM, values
// gathered from the kept-values weight by the layer's codes, then its metadata block; returns
// the compressed operand (a view of the scratch).
torch::Tensor fill_wt_scratch(const torch::Tensor& scratch, const torch::Tensor& weight,
                              const torch::Tensor& codes, const torch::Tensor& meta) {
  const int64_t val_bytes = codes.numel() * weight.element_size();
  TORCH_CHECK(scratch.numel() >= val_bytes + meta.numel(), "sparse_slope_linear: the W^T scratch "
              "has ", num(scratch.numel()), " bytes, needs ", num(val_bytes + meta.numel()));
  auto values = scratch.narrow(0, 0, val_bytes).view(weight.scalar_type()).view(codes.sizes());
  gather_wt_values(weight.contiguous(), codes, values);
  scratch.narrow(0, val_bytes, meta.numel()).copy_(meta);
  return scratch.narrow(0, 0, val_bytes + meta.numel());
}

// cusparselt backend (operands kept, or per call with the W^T scratch filled in backward):
// forward on the compressed W, dX on the compressed W_RC^T.
// The compressed buffers and plans are the layer cache's (cusparselt_cache.py); the plans live
// as long as the process (the plan cache never drops one), so raw pointers are safe to keep.
struct SparseStep : public torch::autograd::Function<SparseStep> {
  static torch::Tensor forward(AutogradContext* ctx, const torch::Tensor& x,
                               const torch::Tensor& weight,
                               const c10::optional<torch::Tensor>& bias,
                               const torch::Tensor& fwd_buf,
                               const c10::optional<torch::Tensor>& wt_buf,
                               const torch::Tensor& mask_bits, Plan* fwd_plan, Plan* wt_plan,
                               bool bias_in_epilogue,
                               const c10::optional<torch::Tensor>& wt_codes,
                               const c10::optional<torch::Tensor>& wt_meta) {
    auto x2 = as_rows(x);
    const bool has_bias = bias.has_value() && bias->defined();
    torch::Tensor y;
    if (has_bias && bias_in_epilogue) {
      y = fwd_plan->matmul(fwd_buf, x2, c10::nullopt, 0.0, bias);
    } else {
      y = fwd_plan->matmul(fwd_buf, x2, c10::nullopt, 0.0, c10::nullopt);
      if (has_bias) y.add_(*bias);
    }
    ctx->save_for_backward({x2, weight});  // weight: autograd checks it is not changed in place
    ctx->saved_data["wt_buf"] = wt_buf.has_value() ? *wt_buf : torch::Tensor();
    ctx->saved_data["wt_codes"] = wt_codes.has_value() ? *wt_codes : torch::Tensor();
    ctx->saved_data["wt_meta"] = wt_meta.has_value() ? *wt_meta : torch::Tensor();
    ctx->saved_data["mask_bits"] = mask_bits;
    ctx->saved_data["wt_plan"] = static_cast<int64_t>(reinterpret_cast<intptr_t>(wt_plan));
    ctx->saved_data["has_bias"] = has_bias;
    ctx->saved_data["x_sizes"] = x.sizes().vec();
    return y.view(with_last(x.sizes(), y.size(1)));
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto saved = ctx->get_saved_variables();
    const auto& x2 = saved[0];
    auto gy2 = as_rows(grads[0]);
    torch::Tensor gx, gw, gb;
    if (ctx->needs_input_grad(0)) {
      auto wt_buf = ctx->saved_data["wt_buf"].toTensor();
      TORCH_CHECK(wt_buf.defined(), "sparse_slope_linear: the input gradient needs W_RC^T, but "
                  "the forward ran without it (call it with wt_buf when gradients are on)");
      auto codes = ctx->saved_data["wt_codes"].toTensor();
      if (codes.defined()) wt_buf = fill_wt_scratch(wt_buf, saved[1], codes,
                                                    ctx->saved_data["wt_meta"].toTensor());
      auto* wt_plan =
          reinterpret_cast<Plan*>(static_cast<intptr_t>(ctx->saved_data["wt_plan"].toInt()));
      gx = wt_plan->matmul(wt_buf, gy2, c10::nullopt, 0.0, c10::nullopt)
               .view(ctx->saved_data["x_sizes"].toIntVector());
    }
    if (ctx->needs_input_grad(1)) {
      gw = gather_kept_2to4(at::mm(gy2.t(), x2), ctx->saved_data["mask_bits"].toTensor());
    }
    if (ctx->saved_data["has_bias"].toBool() && ctx->needs_input_grad(2)) gb = gy2.sum(0);
    // one entry per forward argument, tensors or not (the plans and the flag get none)
    variable_list grads_out(11);
    grads_out[0] = gx;
    grads_out[1] = gw;
    grads_out[2] = gb;
    return grads_out;
  }
};

// cublas backend: the reference's GEMMs (same ATen calls as CublasSlopeLinearFunction) on W*M
// and W*M*M_C scattered per call; nothing is kept between calls.
struct DenseStep : public torch::autograd::Function<DenseStep> {
  static torch::Tensor forward(AutogradContext* ctx, const torch::Tensor& x,
                               const torch::Tensor& weight,
                               const c10::optional<torch::Tensor>& bias,
                               const torch::Tensor& mask_bits, const torch::Tensor& column_bits) {
    auto values = weight.contiguous();
    auto y = at::linear(x, scatter_kept_2to4(values, mask_bits, c10::nullopt), bias);
    ctx->save_for_backward({x, weight, mask_bits, column_bits});
    ctx->saved_data["has_bias"] = bias.has_value() && bias->defined();
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto saved = ctx->get_saved_variables();
    const auto &x = saved[0], &weight = saved[1], &mask_bits = saved[2], &column_bits = saved[3];
    const auto& grad_out = grads[0];
    torch::Tensor gx, gw, gb;
    if (ctx->needs_input_grad(0)) {
      gx = at::matmul(grad_out, scatter_kept_2to4(weight.contiguous(), mask_bits, column_bits));
    }
    auto grad_2d = grad_out.reshape({-1, grad_out.size(-1)});
    if (ctx->needs_input_grad(1)) {
      gw = gather_kept_2to4(at::matmul(grad_2d.t(), x.reshape({-1, x.size(-1)})), mask_bits);
    }
    if (ctx->saved_data["has_bias"].toBool() && ctx->needs_input_grad(2)) gb = grad_2d.sum(0);
    return {gx, gw, gb, torch::Tensor(), torch::Tensor()};
  }
};

}  // namespace

torch::Tensor sparse_slope_linear(const torch::Tensor& x, const torch::Tensor& weight,
                                  const c10::optional<torch::Tensor>& bias,
                                  const torch::Tensor& fwd_buf,
                                  const c10::optional<torch::Tensor>& wt_buf,
                                  const torch::Tensor& mask_bits, Plan& fwd_plan, Plan& wt_plan,
                                  bool bias_in_epilogue,
                                  const c10::optional<torch::Tensor>& wt_codes,
                                  const c10::optional<torch::Tensor>& wt_meta) {
  return SparseStep::apply(x, weight, bias, fwd_buf, wt_buf, mask_bits, &fwd_plan, &wt_plan,
                           bias_in_epilogue, wt_codes, wt_meta);
}

torch::Tensor dense_slope_linear(const torch::Tensor& x, const torch::Tensor& weight,
                                 const c10::optional<torch::Tensor>& bias,
                                 const torch::Tensor& mask_bits,
                                 const torch::Tensor& column_bits) {
  return DenseStep::apply(x, weight, bias, mask_bits, column_bits);
}

}  // namespace slope
