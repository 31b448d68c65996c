// fastgen::parallel_for / num_threads / thread_index on the LibTorch stable ABI (torch >= 2.10).
//
// at::parallel_for, at::get_num_threads and at::get_thread_num are libtorch C++ symbols (they
// pin the extension to one torch release). These wrappers reach the same thread pool through the
// stable C shim (torch_parallel_for, torch_get_num_threads, torch_get_thread_idx), so any source
// of fastgen._C may include this header: boundary files and per-ISA kernel files alike.
// Semantics are at::parallel_for's: f(b, e) on chunks of [begin, end), at least `grain`
// iterations each; inline on the calling thread when the range is small or when already inside
// a parallel region. An exception thrown by f reaches the caller as std::runtime_error.
#pragma once

#include <torch/csrc/stable/c/shim.h>
#include <torch/csrc/stable/ops.h>
#include <torch/headeronly/util/shim_utils.h>

#include <cstdint>

namespace fastgen {

template <class F>
inline void parallel_for(int64_t begin, int64_t end, int64_t grain, const F& f) {
  if (begin >= end) return;
  torch::stable::parallel_for(begin, end, grain, f);
}

// Threads of torch's intra-op pool (torch.get_num_threads()).
inline int num_threads() { return static_cast<int>(torch::stable::get_num_threads()); }

// Index of the calling thread inside a parallel_for body, in [0, num_threads()).
inline int thread_index() {
  uint32_t idx = 0;
  TORCH_ERROR_CODE_CHECK(torch_get_thread_idx(&idx));
  return static_cast<int>(idx);
}

}  // namespace fastgen
