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

// A fresh contiguous tensor of `sizes` whose data start on a 2 MiB boundary when it holds 8 MiB or
// more, with transparent huge pages advised before the first touch (fastgen_cpu::advise_huge_pages).
// A fresh 64 MiB output otherwise costs more in 4 KiB page faults than the whole fused pass of
// gaussian_nll; torch's allocator aligns to 64 bytes, leaving up to 2 MiB of 4 KiB pages at each end
// (measured on Zen 5: ~1000 extra faults, ~2 ms, per gaussian_nll fwd+bwd step at 1024 x 16384).
// torch::stable::from_blob with a deleter needs torch 2.11, so the alignment comes from a view:
// the storage is over-allocated by 2 MiB and the result starts at its first 2 MiB boundary. The
// untouched head is never faulted in (virtual only); the result is a contiguous view.
inline Tensor empty_huge(const Tensor& like, const std::vector<int64_t>& sizes, ScalarType dtype) {
  constexpr int64_t kHuge = int64_t(2) << 20;
  int64_t numel = 1;
  for (int64_t s : sizes) numel *= s;
  const int64_t es = dtype == ScalarType::Double ? 8 : (dtype == ScalarType::Half || dtype == ScalarType::BFloat16) ? 2 : 4;
  FG_CHECK(dtype == ScalarType::Double || dtype == ScalarType::Float || dtype == ScalarType::Half ||
               dtype == ScalarType::BFloat16 || dtype == ScalarType::Int,
           "empty_huge: unexpected dtype");
  if (numel * es < 4 * kHuge) return empty(like, sizes, dtype);
  Tensor buf = empty(like, {numel + kHuge / es}, dtype);
  const uintptr_t p = (uintptr_t)buf.mutable_data_ptr();
  const int64_t off = (int64_t)((((p + kHuge - 1) & ~(uintptr_t)(kHuge - 1)) - p) / (uintptr_t)es);
  Tensor flat = torch::stable::narrow(buf, 0, off, numel);
  fastgen_cpu::advise_huge_pages(flat.mutable_data_ptr(), numel * es);
  return sizes.size() == 1 ? flat : torch::stable::view(flat, sizes);
}

}  // namespace fastgen
