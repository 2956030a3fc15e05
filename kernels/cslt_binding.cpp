// Native binding to cuSPARSELt for SLoPe's 2:4 sparse GEMMs, and the native SLoPe layer step.
//
// Why: torch._cslt_sparse_mm rebuilds its cuSPARSELt plan on every call (~0.46 ms) and never
// searches an algorithm, which makes it slower than dense cuBLAS on Hopper. Here a `Plan`
// (cslt_plan.h) is created once per (m, k, n, dtype, device) and keeps its descriptors, plan
// and searched algorithm; a call is then one cusparseLtMatmul on the current CUDA stream.
// The layer step itself (forward + backward as one C++ autograd function, slope_step.cpp) is
// exported here too, so that a training step issues its kernels without Python in between.
#include "cslt_plan.h"
#include "slope_step.h"

using slope::Plan;
using slope::handle_for;
using slope::parse_dtype;
using slope::structured_desc;
using slope::check_cuda_tensor;

// Bytes of the compressed form of a rows x cols row-major 2:4 matrix, and of its temp buffer.
std::vector<int64_t> compressed_size(int64_t rows, int64_t cols, const std::string& dtype_name,
                                     int64_t device) {
  auto dtype = parse_dtype(dtype_name);
  auto* h = handle_for(device);
  cusparseLtMatDescriptor_t d;
  structured_desc(h, &d, rows, cols, dtype);
  size_t size = 0, buf = 0;
  cusparseStatus_t st = cusparseLtSpMMACompressedSize2(h, &d, &size, &buf);
  cusparseLtMatDescriptorDestroy(&d);
  CSLT_CHECK(st);
  return {static_cast<int64_t>(size), static_cast<int64_t>(buf)};
}

// Compress a dense row-major rows x cols matrix (at most 2 non-zeros in every 4 along cols)
// into `out` (uint8, at least compressed_size bytes). Runs on the current stream.
void compress(torch::Tensor dense, torch::Tensor out) {
  int device = dense.get_device();
  check_cuda_tensor(dense, "dense", device);
  check_cuda_tensor(out, "out", device);
  TORCH_CHECK(dense.dim() == 2, "compress: dense must be 2-D");
  TORCH_CHECK(out.scalar_type() == at::kByte, "compress: out must be uint8");
  c10::cuda::CUDAGuard guard(device);
  auto* h = handle_for(device);
  cusparseLtMatDescriptor_t d;
  structured_desc(h, &d, dense.size(0), dense.size(1), dense.scalar_type());
  size_t size = 0, bufsize = 0;
  CSLT_CHECK(cusparseLtSpMMACompressedSize2(h, &d, &size, &bufsize));
  TORCH_CHECK(out.numel() >= static_cast<int64_t>(size), "compress: out has ",
              slope::num(out.numel()),
              " bytes, needs ", slope::num(static_cast<int64_t>(size)));
  auto tmp = torch::empty({static_cast<int64_t>(bufsize) + 16}, out.options());
  cudaStream_t stream = at::cuda::getCurrentCUDAStream(device);
  cusparseStatus_t st = cusparseLtSpMMACompress2(h, &d, 1, CUSPARSE_OPERATION_NON_TRANSPOSE,
                                                 dense.data_ptr(), out.data_ptr(),
                                                 tmp.data_ptr(), stream);
  cusparseLtMatDescriptorDestroy(&d);
  CSLT_CHECK(st);
}

int64_t library_version(int64_t device) {
  int v = 0;
  CSLT_CHECK(cusparseLtGetVersion(handle_for(device), &v));
  return v;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, mod) {
  mod.doc() = "cuSPARSELt 2:4 sparse GEMM with cached plans (slope_megatron kernels)";
  mod.def("compressed_size", &compressed_size, "(bytes, temp bytes) of a compressed rows x cols");
  mod.def("compress", &compress, "compress a dense 2:4 row-major matrix into a uint8 buffer");
  mod.def("library_version", &library_version, "cuSPARSELt version as major*1000+minor*100+patch");
  pybind11::class_<Plan>(mod, "Plan")
      .def(pybind11::init<int64_t, int64_t, int64_t, const std::string&, int64_t, int64_t,
                          int64_t, int64_t, int64_t, bool>(),
           pybind11::arg("m"), pybind11::arg("k"), pybind11::arg("n"), pybind11::arg("dtype"),
           pybind11::arg("device"), pybind11::arg("alg") = -1, pybind11::arg("split_k") = 1,
           pybind11::arg("split_k_mode") = 1, pybind11::arg("split_k_buffers") = 1,
           pybind11::arg("with_bias") = false)
      .def("matmul", &Plan::matmul, pybind11::arg("a_comp"), pybind11::arg("b"),
           pybind11::arg("c") = pybind11::none(), pybind11::arg("beta") = 0.0,
           pybind11::arg("bias") = pybind11::none())
      .def("search", &Plan::search)
      .def("config", &Plan::config)
      .def("workspace_size", &Plan::workspace_size)
      .def("shape", &Plan::shape);
  mod.def("sparse_slope_linear", &slope::sparse_slope_linear,
          "SLoPe linear on compressed operands (forward + native backward)",
          pybind11::arg("x"), pybind11::arg("weight"), pybind11::arg("bias"),
          pybind11::arg("fwd_buf"), pybind11::arg("wt_buf"), pybind11::arg("mask_bits"),
          pybind11::arg("fwd_plan"), pybind11::arg("wt_plan"),
          pybind11::arg("bias_in_epilogue"), pybind11::arg("wt_codes") = pybind11::none(),
          pybind11::arg("wt_meta") = pybind11::none());
  mod.def("gather_wt_values", &slope::gather_wt_values,
          "W_RC^T's compressed values (into out) from the kept values by per-slot codes",
          pybind11::arg("weight"), pybind11::arg("codes"), pybind11::arg("out"));
  mod.def("dense_slope_linear", &slope::dense_slope_linear,
          "SLoPe linear on dense GEMMs with scattered operands (forward + native backward)",
          pybind11::arg("x"), pybind11::arg("weight"), pybind11::arg("bias"),
          pybind11::arg("mask_bits"), pybind11::arg("column_bits"));
  mod.def("gather_kept_2to4", &slope::gather_kept_2to4,
          "kept entries (rows, cols/2) of a dense 16-bit (rows, cols) tensor, packed 2:4 mask",
          pybind11::arg("dense"), pybind11::arg("mask_bits"));
  mod.def("scatter_kept_2to4", &slope::scatter_kept_2to4,
          "dense (rows, 2*half) tensor from 16-bit kept values (rows, half) under packed masks",
          pybind11::arg("values"), pybind11::arg("mask_bits"),
          pybind11::arg("column_bits") = pybind11::none());
}
