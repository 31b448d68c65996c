// Helpers for the tensor boundary of fastgen._C on the LibTorch stable ABI (torch >= 2.10):
// argument checks, allocation, dtype names. Only torch::stable / torch::headeronly APIs and the
// stable C shim: the extension has no at:: / c10:: symbol (tests/test_stable_abi.py checks).
#pragma once

#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/core/Dispatch_v2.h>
#include <torch/headeronly/core/ScalarType.h>
#include <torch/headeronly/util/BFloat16.h>
#include <torch/headeronly/util/Half.h>

#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

namespace fastgen {

using Tensor = torch::stable::Tensor;
using ScalarType = torch::headeronly::ScalarType;
namespace st = torch::stable;

constexpr ScalarType kFloat = ScalarType::Float;
constexpr ScalarType kDouble = ScalarType::Double;
constexpr ScalarType kHalf = ScalarType::Half;
constexpr ScalarType kBFloat16 = ScalarType::BFloat16;
constexpr ScalarType kLong = ScalarType::Long;
constexpr ScalarType kInt = ScalarType::Int;
constexpr ScalarType kBool = ScalarType::Bool;

namespace detail {
template <typename E, typename... Args>
[[noreturn]] inline void fail_as(const Args&... args) {
  std::ostringstream os;
  (os << ... << args);
  throw E(os.str());
}
template <typename... Args>
[[noreturn]] inline void fail(const Args&... args) {
  fail_as<std::runtime_error>(args...);
}
}  // namespace detail

// Checks of the boundary. A C++ exception thrown by a stable-ABI kernel reaches Python through
// torch's dispatcher and pybind11's exception translation (checked on torch 2.13 and 2.14):
//   FG_CHECK(cond, msg...)        std::runtime_error    -> RuntimeError
//   FG_CHECK_VALUE(cond, msg...)  std::invalid_argument -> ValueError   (TORCH_CHECK_VALUE)
//   FG_CHECK_INDEX(cond, msg...)  std::out_of_range     -> IndexError   (TORCH_CHECK_INDEX)
// (c10::Error and its TypeError / NotImplementedError subclasses are libtorch C++ types: not
// available here; the Python wrappers raise the TypeErrors for bad dtypes before the kernels run.)
#define FG_CHECK_AS(E, cond, ...)                                                  \
  do {                                                                             \
    if (__builtin_expect(!(cond), 0)) ::fastgen::detail::fail_as<E>(__VA_ARGS__); \
  } while (0)
#define FG_CHECK(cond, ...) FG_CHECK_AS(std::runtime_error, cond, __VA_ARGS__)
#define FG_CHECK_VALUE(cond, ...) FG_CHECK_AS(std::invalid_argument, cond, __VA_ARGS__)
#define FG_CHECK_INDEX(cond, ...) FG_CHECK_AS(std::out_of_range, cond, __VA_ARGS__)

inline const char* dtype_name(ScalarType t) { return torch::headeronly::toString(t); }

// Shapes print as [a, b, c] in messages.
inline std::string shape_str(torch::headeronly::IntHeaderOnlyArrayRef s) {
  std::ostringstream os;
  os << '[';
  for (size_t i = 0; i < s.size(); ++i) os << (i ? ", " : "") << s[i];
  os << ']';
  return os.str();
}

// New uninitialised / zeroed tensors on `like`'s device.
inline Tensor empty(const Tensor& like, std::vector<int64_t> sizes, ScalarType dtype) {
  return st::new_empty(like, sizes, dtype);
}
inline Tensor zeros(const Tensor& like, std::vector<int64_t> sizes, ScalarType dtype) {
  return st::new_zeros(like, sizes, dtype);
}
// An empty [0] tensor: "not requested" outputs.
inline Tensor none(const Tensor& like, ScalarType dtype) { return st::new_empty(like, {0}, dtype); }

}  // namespace fastgen
