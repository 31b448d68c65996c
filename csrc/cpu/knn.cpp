// fastgen::_knn_kernel on CPU: the tensor boundary (argument checks, allocation, dtype switch,
// registration). The compute code is csrc/cpu/knn_kernel.h, compiled per instruction set and
// called through the table of csrc/cpu/isa.cpp (interface: csrc/cpu/kernels.h).
//
// query [B, N, D], key [B, M, D] (float32, float64, float16 or bfloat16, same dtype), 1 <= k <= M.
// Returns dist2 [B, N, k] (float64 for float64 input, else float32), ascending, and
// index [B, N, k] int64; ties go to the lowest key index; exact (see knn_kernel.h).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cstdint>
#include <tuple>

#include "kernels.h"

namespace {

std::tuple<at::Tensor, at::Tensor> knn_cpu(const at::Tensor& query, const at::Tensor& key, int64_t k) {
  TORCH_CHECK(query.dim() == 3, "fastgen::knn: query must be [B, N, D], got ", query.sizes());
  TORCH_CHECK(key.dim() == 3, "fastgen::knn: key must be [B, M, D], got ", key.sizes());
  TORCH_CHECK(query.size(0) == key.size(0), "fastgen::knn: batch sizes differ: query ", query.size(0), ", key ",
              key.size(0));
  TORCH_CHECK(query.size(2) == key.size(2), "fastgen::knn: feature dims differ: query ", query.size(2), ", key ",
              key.size(2));
  TORCH_CHECK(query.scalar_type() == key.scalar_type(), "fastgen::knn: query and key dtypes differ");
  const auto st = query.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kDouble || st == at::kHalf || st == at::kBFloat16,
              "fastgen::knn: expected float32, float64, float16 or bfloat16 inputs, got ", st);
  const int64_t B = query.size(0), N = query.size(1), M = key.size(1), D = query.size(2);
  TORCH_CHECK(k >= 1 && k <= M, "fastgen::knn: need 1 <= k <= M, got k = ", k, ", M = ", M);
  TORCH_CHECK(M < (int64_t)INT32_MAX, "fastgen::knn: M must be < 2^31");
  TORCH_CHECK(D >= 1, "fastgen::knn: D must be >= 1");
  const at::Tensor qc = query.contiguous(), kc = key.contiguous();
  at::Tensor dist = at::empty({B, N, k}, query.options().dtype(st == at::kDouble ? at::kDouble : at::kFloat));
  at::Tensor index = at::empty({B, N, k}, query.options().dtype(at::kLong));
  if (B * N == 0) return {dist, index};
  const auto dt = st == at::kFloat ? fastgen_cpu::DType::kFloat32
                  : st == at::kDouble ? fastgen_cpu::DType::kFloat64
                  : st == at::kHalf ? fastgen_cpu::DType::kFloat16
                                    : fastgen_cpu::DType::kBFloat16;
  const int status = fastgen_cpu::kernels().knn(dt, qc.data_ptr(), kc.data_ptr(), B, N, M, D, k, dist.data_ptr(),
                                                index.data_ptr<int64_t>());
  // NaN / inf inputs are detected on the way (the norms of the centred rows), not by a separate pass
  TORCH_CHECK_VALUE(status != 1, "fastgen::knn: query contains NaN or inf");
  TORCH_CHECK_VALUE(status != 2, "fastgen::knn: key contains NaN or inf");
  return {dist, index};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastgen, CPU, m) { m.impl("_knn_kernel", &knn_cpu); }
