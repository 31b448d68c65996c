// Shared by the tensor boundaries csrc/cpu/<op>.cpp on the LibTorch stable ABI: the stable-ABI
// helpers (csrc/stable.h) and the plain-C++ kernel interface (kernels.h).
#pragma once

#include "../stable.h"
#include "kernels.h"

namespace fastgen {

// torch dtype -> the kernels' element type; ValueError naming the op for any other dtype.
inline fastgen_cpu::DType kernel_dtype(ScalarType st, const char* op) {
  switch (st) {
    case ScalarType::Float: return fastgen_cpu::DType::kFloat32;
    case ScalarType::Double: return fastgen_cpu::DType::kFloat64;
    case ScalarType::Half: return fastgen_cpu::DType::kFloat16;
    case ScalarType::BFloat16: return fastgen_cpu::DType::kBFloat16;
    default: detail::fail_as<std::invalid_argument>(op, ": unsupported dtype ", dtype_name(st));
  }
}

inline std::vector<int64_t> sizes_of(const Tensor& t) {
  auto s = t.sizes();
  return std::vector<int64_t>(s.begin(), s.end());
}

// A 0-d tensor holding v, in dtype (float32 / float64 / float16 / bfloat16 / int32) on like's device.
inline Tensor scalar_tensor(const Tensor& like, double v, ScalarType dtype) {
  return torch::stable::full({}, v, dtype, std::nullopt, like.device());
}

}  // namespace fastgen
