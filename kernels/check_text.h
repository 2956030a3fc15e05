// Text for the extension's error messages, made without iostreams.
//
// Why: on the GPU image, an extension built by the system g++ crashed (SIGSEGV) whenever a
// TORCH_CHECK message formatted a number through an ostream: torch's headers send it through
// libstdc++'s locale facets, which torch's own build (another toolchain) sets up differently.
// Messages made of strings only raised normally. So numbers, shapes, dtypes and devices become
// std::string here first; tests/gpu/test_native_step_gpu.py raises each kind.
#pragma once

#include <ATen/core/Tensor.h>

#include <string>

namespace slope {

inline std::string num(int64_t v) { return std::to_string(v); }

inline std::string dims(c10::IntArrayRef sizes) {
  std::string out = "(";
  for (size_t i = 0; i < sizes.size(); ++i) {
    if (i) out += ", ";
    out += std::to_string(sizes[i]);
  }
  return out + ")";
}

inline std::string describe(const at::Tensor& t) {  // "(8, 16) Float on cuda:0"
  return dims(t.sizes()) + " " + c10::toString(t.scalar_type()) + " on " + t.device().str();
}

}  // namespace slope
