// cuSPARSELt plumbing shared by the binding and the native SLoPe step: status checks, one
// library handle per device, descriptors, and the cached matmul `Plan`.
//
// Layout (all row-major from PyTorch's point of view):
//   D[n, m] = alpha * B[n, k] @ A[m, k]^T + beta * C[n, m]
// where A (the 2:4 sparse operand, 2 of every 4 along k) is given in cuSPARSELt's compressed form.
// In cuSPARSELt terms: A row-major m x k (structured), B col-major k x n (ld k),
// C/D col-major m x n (ld m) -- exactly the layout verified by shared/probes.
#pragma once

#include <torch/extension.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <cusparseLt.h>

#include "check_text.h"

#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

namespace slope {

#define CSLT_CHECK(call)                                                                     \
  do {                                                                                       \
    cusparseStatus_t st_ = (call);                                                           \
    TORCH_CHECK(st_ == CUSPARSE_STATUS_SUCCESS, "cuSPARSELt call ", #call, " failed: ",      \
                cusparseLtGetErrorName(st_), " (", std::to_string(static_cast<int>(st_)), "): ", \
                cusparseLtGetErrorString(st_));                                              \
  } while (0)


// One library handle per device (a handle is tied to the device current at cusparseLtInit).
inline cusparseLtHandle_t* handle_for(int device) {
  static std::mutex mu;
  static std::map<int, std::unique_ptr<cusparseLtHandle_t>> handles;
  std::lock_guard<std::mutex> lock(mu);
  auto it = handles.find(device);
  if (it != handles.end()) return it->second.get();
  c10::cuda::CUDAGuard guard(device);
  auto h = std::make_unique<cusparseLtHandle_t>();
  CSLT_CHECK(cusparseLtInit(h.get()));
  auto* raw = h.get();
  handles.emplace(device, std::move(h));
  return raw;
}

inline at::ScalarType parse_dtype(const std::string& name) {
  if (name == "bfloat16") return at::kBFloat16;
  if (name == "float16") return at::kHalf;
  TORCH_CHECK(false, "cuSPARSELt binding supports dtypes 'bfloat16' and 'float16', got '", name,
              "'");
  return at::kBFloat16;
}

inline cudaDataType cuda_type(at::ScalarType t) {
  switch (t) {
    case at::kBFloat16: return CUDA_R_16BF;
    case at::kHalf: return CUDA_R_16F;
    default: TORCH_CHECK(false, "cuSPARSELt binding supports bfloat16 and float16, got ",
                          c10::toString(t));
  }
  return CUDA_R_16BF;
}

constexpr uint32_t kAlign = 16;

// Structured (2:4) descriptor of a row-major rows x cols matrix.
inline void structured_desc(cusparseLtHandle_t* h, cusparseLtMatDescriptor_t* d, int64_t rows,
                     int64_t cols, at::ScalarType t) {
  CSLT_CHECK(cusparseLtStructuredDescriptorInit(h, d, rows, cols, cols, kAlign, cuda_type(t),
                                                CUSPARSE_ORDER_ROW,
                                                CUSPARSELT_SPARSITY_50_PERCENT));
}

inline void check_cuda_tensor(const torch::Tensor& t, const char* name, int device) {
  TORCH_CHECK(t.is_cuda(), name, " must be a CUDA tensor");
  TORCH_CHECK(t.get_device() == device, name, " is on cuda:", num(t.get_device()),
              " but the plan was made for cuda:", num(device));
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
  TORCH_CHECK(reinterpret_cast<uintptr_t>(t.data_ptr()) % kAlign == 0, name,
              " must be 16-byte aligned");
}


// A matmul plan for one (m, k, n, dtype, device), created once and reused for every call.
class Plan {
 public:
  // alg < 0: cuSPARSELt's default algorithm; else a configuration from an earlier search.
  // The configuration is applied before the one PlanInit: re-initialising a plan after
  // changing its algorithm selection crashed cuSPARSELt 0.8 (segfault, seen on an H100).
  Plan(int64_t m, int64_t k, int64_t n, const std::string& dtype, int64_t device, int64_t alg,
       int64_t split_k, int64_t split_k_mode, int64_t split_k_buffers, bool with_bias)
      : m_(m), k_(k), n_(n), dtype_(parse_dtype(dtype)), device_(device), with_bias_(with_bias) {
    c10::cuda::CUDAGuard guard(device);
    h_ = handle_for(device);
    auto t = cuda_type(dtype_);
    structured_desc(h_, &a_, m, k, dtype_);
    CSLT_CHECK(cusparseLtDenseDescriptorInit(h_, &b_, k, n, k, kAlign, t, CUSPARSE_ORDER_COL));
    CSLT_CHECK(cusparseLtDenseDescriptorInit(h_, &c_, m, n, m, kAlign, t, CUSPARSE_ORDER_COL));
    CSLT_CHECK(cusparseLtMatmulDescriptorInit(h_, &mm_, CUSPARSE_OPERATION_NON_TRANSPOSE,
                                              CUSPARSE_OPERATION_NON_TRANSPOSE, &a_, &b_, &c_,
                                              &c_, CUSPARSE_COMPUTE_32F));
    if (with_bias_) {
      // A bias epilogue (one value per row of D = per output feature). The pointer is set
      // again before every call; this zero vector only stands in for plan creation/search.
      zero_bias_ = torch::zeros({m}, torch::dtype(dtype_).device(torch::kCUDA, device));
      set_bias(zero_bias_.data_ptr());
    }
    CSLT_CHECK(cusparseLtMatmulAlgSelectionInit(h_, &sel_, &mm_, CUSPARSELT_MATMUL_ALG_DEFAULT));
    sel_ready_ = true;
    if (alg >= 0) {
      int a = static_cast<int>(alg), sk = static_cast<int>(split_k),
          skb = static_cast<int>(split_k_buffers);
      auto mode = static_cast<cusparseLtSplitKMode_t>(split_k_mode);
      CSLT_CHECK(cusparseLtMatmulAlgSetAttribute(h_, &sel_, CUSPARSELT_MATMUL_ALG_CONFIG_ID, &a,
                                                 sizeof(a)));
      if (sk > 1) {
        CSLT_CHECK(cusparseLtMatmulAlgSetAttribute(h_, &sel_, CUSPARSELT_MATMUL_SPLIT_K, &sk,
                                                   sizeof(sk)));
        CSLT_CHECK(cusparseLtMatmulAlgSetAttribute(h_, &sel_, CUSPARSELT_MATMUL_SPLIT_K_MODE,
                                                   &mode, sizeof(mode)));
        CSLT_CHECK(cusparseLtMatmulAlgSetAttribute(h_, &sel_, CUSPARSELT_MATMUL_SPLIT_K_BUFFERS,
                                                   &skb, sizeof(skb)));
      }
    }
    CSLT_CHECK(cusparseLtMatmulPlanInit(h_, &plan_, &mm_, &sel_));
    plan_ready_ = true;
    CSLT_CHECK(cusparseLtMatmulGetWorkspace(h_, &plan_, &workspace_));
    max_workspace_ = static_cast<int64_t>(workspace_);
    size_t size = 0, buf = 0;
    CSLT_CHECK(cusparseLtSpMMACompressedSize(h_, &plan_, &size, &buf));
    compressed_bytes_ = static_cast<int64_t>(size);
  }
  ~Plan() {
    if (plan_ready_) cusparseLtMatmulPlanDestroy(&plan_);
    if (sel_ready_) cusparseLtMatmulAlgSelectionDestroy(&sel_);
    cusparseLtMatDescriptorDestroy(&a_);
    cusparseLtMatDescriptorDestroy(&b_);
    cusparseLtMatDescriptorDestroy(&c_);
  }
  Plan(const Plan&) = delete;
  Plan& operator=(const Plan&) = delete;

  // D = B @ A^T (+ beta * C). a_comp: compressed A; b: (n, k); c: optional (n, m).
  torch::Tensor matmul(torch::Tensor a_comp, torch::Tensor b, c10::optional<torch::Tensor> c,
                       double beta, c10::optional<torch::Tensor> bias) {
    check_operands(a_comp, b);
    if (bias.has_value()) {
      TORCH_CHECK(with_bias_, "this plan was created without a bias epilogue");
      check_cuda_tensor(*bias, "bias", device_);
      TORCH_CHECK(bias->numel() == m_ && bias->scalar_type() == dtype_, "bias must have ", num(m_),
                  " elements of the plan's dtype");
      set_bias(bias->data_ptr());
    } else if (with_bias_) {
      set_bias(zero_bias_.data_ptr());
    }
    auto d = torch::empty({n_, m_}, b.options());
    const void* cptr = d.data_ptr();
    float fbeta = 0.f;
    if (c.has_value()) {
      check_cuda_tensor(*c, "C", device_);
      TORCH_CHECK(c->size(0) == n_ && c->size(1) == m_ && c->scalar_type() == dtype_,
                  "C must be (", num(n_), ", ", num(m_), ") of the plan's dtype");
      cptr = c->data_ptr();
      fbeta = static_cast<float>(beta);
    }
    run(cusparseLtMatmul, a_comp, b, cptr, d, fbeta);
    return d;
  }

  // Search the fastest algorithm (and split-k) for this shape on these operands; the plan keeps
  // it. Returns config() afterwards.
  std::vector<int64_t> search(torch::Tensor a_comp, torch::Tensor b) {
    check_operands(a_comp, b);
    auto d = torch::empty({n_, m_}, b.options());
    c10::cuda::CUDAGuard guard(device_);
    float alpha = 1.f, beta = 0.f;
    // the search may try algorithms with larger workspaces than the default one
    auto ws = torch::empty({std::max<int64_t>(max_workspace_, 1 << 26)},
                           b.options().dtype(at::kByte));
    cudaStream_t stream = at::cuda::getCurrentCUDAStream(device_);
    CSLT_CHECK(cusparseLtMatmulSearch(h_, &plan_, &alpha, a_comp.data_ptr(), b.data_ptr(), &beta,
                                      d.data_ptr(), d.data_ptr(), ws.data_ptr(), &stream, 1));
    CSLT_CHECK(cusparseLtMatmulGetWorkspace(h_, &plan_, &workspace_));
    return config();
  }

  // (alg_id, split_k, split_k_mode, split_k_buffers, max_alg_id)
  std::vector<int64_t> config() const {
    int alg = 0, max_alg = 0, sk = 0, skb = 0;
    cusparseLtSplitKMode_t mode = CUSPARSELT_INVALID_MODE;
    CSLT_CHECK(cusparseLtMatmulAlgGetAttribute(h_, &sel_, CUSPARSELT_MATMUL_ALG_CONFIG_ID, &alg,
                                               sizeof(alg)));
    CSLT_CHECK(cusparseLtMatmulAlgGetAttribute(h_, &sel_, CUSPARSELT_MATMUL_ALG_CONFIG_MAX_ID,
                                               &max_alg, sizeof(max_alg)));
    CSLT_CHECK(cusparseLtMatmulAlgGetAttribute(h_, &sel_, CUSPARSELT_MATMUL_SPLIT_K, &sk,
                                               sizeof(sk)));
    CSLT_CHECK(cusparseLtMatmulAlgGetAttribute(h_, &sel_, CUSPARSELT_MATMUL_SPLIT_K_MODE, &mode,
                                               sizeof(mode)));
    CSLT_CHECK(cusparseLtMatmulAlgGetAttribute(h_, &sel_, CUSPARSELT_MATMUL_SPLIT_K_BUFFERS, &skb,
                                               sizeof(skb)));
    return {alg, sk, static_cast<int64_t>(mode), skb, max_alg};
  }

  int64_t workspace_size() const { return static_cast<int64_t>(workspace_); }
  std::vector<int64_t> shape() const { return {m_, k_, n_}; }

 private:
  void set_bias(void* ptr) {
    CSLT_CHECK(cusparseLtMatmulDescSetAttribute(h_, &mm_, CUSPARSELT_MATMUL_BIAS_POINTER, &ptr,
                                                sizeof(ptr)));
  }

  void check_operands(const torch::Tensor& a_comp, const torch::Tensor& b) const {
    check_cuda_tensor(a_comp, "compressed A", device_);
    check_cuda_tensor(b, "B", device_);
    TORCH_CHECK(a_comp.scalar_type() == at::kByte, "compressed A must be uint8");
    TORCH_CHECK(a_comp.numel() >= compressed_bytes_, "compressed A has ", num(a_comp.numel()),
                " bytes; this plan needs ", num(compressed_bytes_));
    TORCH_CHECK(b.dim() == 2 && b.size(0) == n_ && b.size(1) == k_, "B must be (", num(n_), ", ",
                num(k_), "), got ", dims(b.sizes()));
    TORCH_CHECK(b.scalar_type() == dtype_, "B has dtype ", c10::toString(b.scalar_type()),
                ", plan has ", c10::toString(dtype_));
  }

  template <typename F>
  void run(F fn, const torch::Tensor& a_comp, const torch::Tensor& b, const void* cptr,
           torch::Tensor& d, float beta) {
    c10::cuda::CUDAGuard guard(device_);
    float alpha = 1.f;
    torch::Tensor ws;
    void* wsp = nullptr;
    if (workspace_ > 0) {
      ws = torch::empty({static_cast<int64_t>(workspace_)}, b.options().dtype(at::kByte));
      wsp = ws.data_ptr();
    }
    cudaStream_t stream = at::cuda::getCurrentCUDAStream(device_);
    CSLT_CHECK(fn(h_, &plan_, &alpha, a_comp.data_ptr(), b.data_ptr(), &beta, cptr, d.data_ptr(),
                  wsp, &stream, 1));
  }

  int64_t m_, k_, n_;
  at::ScalarType dtype_;
  int64_t device_;
  bool with_bias_ = false;
  torch::Tensor zero_bias_;
  cusparseLtHandle_t* h_ = nullptr;
  cusparseLtMatDescriptor_t a_, b_, c_;
  cusparseLtMatmulDescriptor_t mm_;
  cusparseLtMatmulAlgSelection_t sel_;
  cusparseLtMatmulPlan_t plan_;
  bool plan_ready_ = false, sel_ready_ = false;
  size_t workspace_ = 0;
  int64_t max_workspace_ = 0;
  int64_t compressed_bytes_ = 0;
};

}  // namespace slope
