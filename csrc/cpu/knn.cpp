// fastgen::_knn_kernel on CPU: the tensor boundary (argument checks, allocation, dtype switch,
// registration) on the LibTorch stable ABI. The compute code is csrc/cpu/knn_kernel.h, compiled
// per instruction set and called through the table of csrc/cpu/isa.cpp (interface:
// csrc/cpu/kernels.h).
//
// query [B, N, D], key [B, M, D] (float32, float64, float16 or bfloat16, same dtype), 1 <= k <= M.
// Returns dist2 [B, N, k] (float64 for float64 input, else float32), ascending, and
// index [B, N, k] int64; ties go to the lowest key index; exact (see knn_kernel.h).
#include <cstdint>
#include <tuple>

#include "boundary.h"

namespace {

using fastgen::Tensor;

std::tuple<Tensor, Tensor> knn_cpu(Tensor query, Tensor key, int64_t k) {
  FG_CHECK(query.dim() == 3, "fastgen::knn: query must be [B, N, D], got ", fastgen::shape_str(query.sizes()));
  FG_CHECK(key.dim() == 3, "fastgen::knn: key must be [B, M, D], got ", fastgen::shape_str(key.sizes()));
  FG_CHECK(query.size(0) == key.size(0), "fastgen::knn: batch sizes differ: query ", query.size(0), ", key ",
           key.size(0));
  FG_CHECK(query.size(2) == key.size(2), "fastgen::knn: feature dims differ: query ", query.size(2), ", key ",
           key.size(2));
  FG_CHECK(query.scalar_type() == key.scalar_type(), "fastgen::knn: query and key dtypes differ");
  const auto st = query.scalar_type();
  const auto dt = fastgen::kernel_dtype(st, "fastgen::knn");
  const int64_t B = query.size(0), N = query.size(1), M = key.size(1), D = query.size(2);
  FG_CHECK(k >= 1 && k <= M, "fastgen::knn: need 1 <= k <= M, got k = ", k, ", M = ", M);
  FG_CHECK(M < (int64_t)INT32_MAX, "fastgen::knn: M must be < 2^31");
  FG_CHECK(D >= 1, "fastgen::knn: D must be >= 1");
  const Tensor qc = torch::stable::contiguous(query), kc = torch::stable::contiguous(key);
  Tensor dist = fastgen::empty(query, {B, N, k}, st == fastgen::kDouble ? fastgen::kDouble : fastgen::kFloat);
  Tensor index = fastgen::empty(query, {B, N, k}, fastgen::kLong);
  if (B * N == 0) return {dist, index};
  const int status = fastgen_cpu::kernels().knn(dt, qc.const_data_ptr(), kc.const_data_ptr(), B, N, M, D, k,
                                                dist.mutable_data_ptr(), index.mutable_data_ptr<int64_t>());
  // NaN / inf inputs are detected on the way (the norms of the centred rows), not by a separate pass
  FG_CHECK_VALUE(status != 1, "fastgen::knn: query contains NaN or inf");
  FG_CHECK_VALUE(status != 2, "fastgen::knn: key contains NaN or inf");
  return {dist, index};
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(fastgen, CPU, m) { m.impl("_knn_kernel", TORCH_BOX(&knn_cpu)); }
