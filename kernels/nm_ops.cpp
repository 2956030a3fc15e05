// Tensor-level 2:4 gather and scatter for the native step: argument checks, output allocation,
// stream, then the CUDA kernels of nm_cuda.cu (which see raw pointers only).
#include "slope_step.h"

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include "check_text.h"
#include "nm_cuda.h"

namespace slope {
namespace {

void check_data(const at::Tensor& t, const char* fn, const char* name) {
  TORCH_CHECK(t.is_cuda() && t.dim() == 2 && t.is_contiguous() && t.element_size() == 2, fn,
              ": ", name, " must be a contiguous 2-D CUDA tensor of a 16-bit dtype, got ",
              describe(t));
}

void check_bits(const at::Tensor& bits, const at::Tensor& like, int64_t rows, int64_t cols,
                const char* fn, const char* name) {
  TORCH_CHECK(cols % 8 == 0, fn, ": ", num(cols), " columns is not a multiple of 8");
  TORCH_CHECK(bits.scalar_type() == at::kByte && bits.is_contiguous() && bits.dim() == 2 &&
                  bits.size(0) == rows && bits.size(1) == cols / 8,
              fn, ": ", name, " must be a contiguous (", num(rows), ", ", num(cols / 8),
              ") uint8 packed mask, got ", describe(bits));
  TORCH_CHECK(bits.device() == like.device(), fn, ": ", name, " is on ", bits.device().str(),
              ", the data on ", like.device().str());
}

// One thread per item in blocks of 256, and a grid's x dimension holds at most 2^31 - 1 blocks.
void check_grid(int64_t items, const char* fn) {
  TORCH_CHECK(items / 256 < (int64_t{1} << 31) - 1, fn, ": ", num(items),
              " items is more than one kernel launch covers; split the tensor");
}

}  // namespace

at::Tensor gather_kept_2to4(const at::Tensor& dense, const at::Tensor& mask_bits) {
  check_data(dense, "gather_kept_2to4", "dense");
  const int64_t rows = dense.size(0), cols = dense.size(1);
  check_bits(mask_bits, dense, rows, cols, "gather_kept_2to4", "mask_bits");
  check_grid(rows * cols / 8, "gather_kept_2to4");
  auto out = at::empty({rows, cols / 2}, dense.options());
  c10::cuda::CUDAGuard guard(dense.device());
  C10_CUDA_CHECK(launch_gather_kept_2to4(dense.data_ptr(), mask_bits.data_ptr<uint8_t>(),
                                         out.data_ptr(), rows * cols / 8,
                                         at::cuda::getCurrentCUDAStream()));
  return out;
}

at::Tensor scatter_kept_2to4(const at::Tensor& values, const at::Tensor& mask_bits,
                             const c10::optional<at::Tensor>& column_bits) {
  check_data(values, "scatter_kept_2to4", "values");
  const int64_t rows = values.size(0), cols = 2 * values.size(1);
  check_bits(mask_bits, values, rows, cols, "scatter_kept_2to4", "mask_bits");
  const bool has_col = column_bits.has_value() && column_bits->defined();
  if (has_col) check_bits(*column_bits, values, rows, cols, "scatter_kept_2to4", "column_bits");
  check_grid(rows * cols / 8, "scatter_kept_2to4");
  auto out = at::empty({rows, cols}, values.options());
  c10::cuda::CUDAGuard guard(values.device());
  C10_CUDA_CHECK(launch_scatter_kept_2to4(
      values.data_ptr(), mask_bits.data_ptr<uint8_t>(),
      has_col ? column_bits->data_ptr<uint8_t>() : nullptr, out.data_ptr(), rows * cols / 8,
      at::cuda::getCurrentCUDAStream()));
  return out;
}

void gather_wt_values(const at::Tensor& weight, const at::Tensor& codes, const at::Tensor& out) {
  check_data(weight, "gather_wt_values", "weight");
  check_data(out, "gather_wt_values", "out");
  TORCH_CHECK(codes.scalar_type() == at::kByte && codes.dim() == 2 && codes.is_contiguous() &&
                  codes.device() == weight.device(),
              "gather_wt_values: codes must be contiguous 2-D uint8 on ", weight.device().str(),
              ", got ", describe(codes));
  const int64_t n_rows = codes.size(0), n_slots = codes.size(1);
  TORCH_CHECK(out.sizes() == codes.sizes() && out.scalar_type() == weight.scalar_type() &&
                  out.device() == weight.device(),
              "gather_wt_values: out must be ", dims(codes.sizes()), " like the codes, of the "
              "weight's dtype and device, got ", describe(out));
  TORCH_CHECK(weight.size(0) == 2 * n_slots && weight.size(1) * 2 == n_rows,
              "gather_wt_values: weight must be (", num(2 * n_slots), ", ", num(n_rows / 2),
              ") for codes ", dims(codes.sizes()), ", got ", dims(weight.sizes()));
  check_grid(n_rows * n_slots, "gather_wt_values");
  c10::cuda::CUDAGuard guard(weight.device());
  C10_CUDA_CHECK(launch_gather_wt_values(weight.data_ptr(), codes.data_ptr<uint8_t>(),
                                         out.data_ptr(), n_rows, n_slots, weight.size(1),
                                         at::cuda::getCurrentCUDAStream()));
}

}  // namespace slope
