// Runtime choice of the CPU path, once, when the library loads.
//
// Every compute kernel (csrc/cpu/<op>_kernel.h) is compiled once per instruction set
// (csrc/cpu/isa/<op>_<isa>.cpp, each in its own namespace fastgen_cpu::<isa>; see isa_begin.h):
//   baseline  x86-64-v2 (SSE4.2, POPCNT); on other architectures the build's default target
//   avx2      x86-64-v3: AVX2, FMA, BMI1/2, F16C, LZCNT, MOVBE
//   avx512    x86-64-v4: AVX512F/VL/BW/DQ/CD
// At load time the best path this CPU runs is chosen from its features (__builtin_cpu_supports,
// which also checks that the OS saves the AVX / AVX-512 register state, via XGETBV), unless
// FASTGEN_CPU_ISA=baseline|avx2|avx512|auto forces one. A forced path the CPU cannot run, or an
// unknown value, is an error raised at the first use of a kernel (RuntimeError in Python), never
// a silent fallback and never SIGILL. A FASTGEN_NATIVE=1 build has one path, "native".
#include "isa.h"

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace fastgen_cpu {

#define FASTGEN_TABLE(NS, NAME)                                                                          \
  namespace NS {                                                                                         \
  FASTGEN_CPU_KERNEL_DECLS                                                                               \
  }                                                                                                      \
  static const Kernels k_##NS = {NAME,         &NS::knn,         &NS::gaussian_nll, &NS::spread_noise,    \
                                 &NS::spread_noise_grad_sigma,   &NS::sll_forward,  &NS::sll_backward,   \
                                 &NS::vmath};

#if defined(FASTGEN_NATIVE_BUILD)
FASTGEN_TABLE(baseline, "native")
#define FASTGEN_HAVE_X86_PATHS 0
#else
FASTGEN_TABLE(baseline, "baseline")
#if defined(__x86_64__)
FASTGEN_TABLE(avx2, "avx2")
FASTGEN_TABLE(avx512, "avx512")
#define FASTGEN_HAVE_X86_PATHS 1
#else
#define FASTGEN_HAVE_X86_PATHS 0
#endif
#endif

namespace {

const char* const kNames[] = {"baseline", "avx2", "avx512", "native"};

// What the CPU lacks for path `isa` ("" when it runs it). Features, not models: a CPU runs the
// avx2 path when it has every x86-64-v3 feature the code may use, with OS support.
std::string missing_features(int isa) {
#if defined(__x86_64__) && !defined(FASTGEN_NATIVE_BUILD)
  __builtin_cpu_init();
  std::string miss;
  auto need = [&](bool have, const char* name) {
    if (!have) miss += miss.empty() ? name : (std::string(", ") + name);
  };
  need(__builtin_cpu_supports("sse4.2"), "sse4.2");
  need(__builtin_cpu_supports("popcnt"), "popcnt");
  if (isa >= kAVX2) {
    need(__builtin_cpu_supports("avx"), "avx");
    need(__builtin_cpu_supports("avx2"), "avx2");
    need(__builtin_cpu_supports("fma"), "fma");
    need(__builtin_cpu_supports("bmi"), "bmi");
    need(__builtin_cpu_supports("bmi2"), "bmi2");
    need(__builtin_cpu_supports("f16c"), "f16c");
    need(__builtin_cpu_supports("lzcnt") || __builtin_cpu_supports("abm"), "lzcnt");
    need(__builtin_cpu_supports("movbe"), "movbe");
  }
  if (isa >= kAVX512) {
    need(__builtin_cpu_supports("avx512f"), "avx512f");
    need(__builtin_cpu_supports("avx512vl"), "avx512vl");
    need(__builtin_cpu_supports("avx512bw"), "avx512bw");
    need(__builtin_cpu_supports("avx512dq"), "avx512dq");
    need(__builtin_cpu_supports("avx512cd"), "avx512cd");
  }
  return miss;
#else
  (void)isa;
  return "";
#endif
}

struct Choice {
  const Kernels* table = nullptr;
  int isa = -1;
  int available = 0;
  std::string error;
};

const Kernels* table_of(int isa) {
#if defined(FASTGEN_NATIVE_BUILD)
  return isa == kNative ? &k_baseline : nullptr;
#else
  if (isa == kBaseline) return &k_baseline;
#if FASTGEN_HAVE_X86_PATHS
  if (isa == kAVX2) return &k_avx2;
  if (isa == kAVX512) return &k_avx512;
#endif
  return nullptr;
#endif
}

Choice choose() {
  Choice c;
#if defined(FASTGEN_NATIVE_BUILD)
  c.available = 1 << kNative;
  const int best = kNative;
#else
  int best = -1;
  for (int isa = kBaseline; isa <= kAVX512; ++isa)
    if (table_of(isa) && missing_features(isa).empty()) {
      c.available |= 1 << isa;
      best = isa;
    }
#endif
  const char* env = std::getenv("FASTGEN_CPU_ISA");
  std::string want = env ? env : "";
  for (auto& ch : want) ch = (char)std::tolower((unsigned char)ch);
  if (want.empty() || want == "auto") {
    if (best < 0) {
      c.error = "fastgen: this CPU lacks features of the baseline path (x86-64-v2): " + missing_features(kBaseline);
      return c;
    }
    c.isa = best;
    c.table = table_of(best);
    return c;
  }
  int isa = -1;
  for (int i = 0; i < 4; ++i)
    if (want == kNames[i]) isa = i;
  if (isa < 0 || isa == kNative) {
    c.error = "FASTGEN_CPU_ISA='" + std::string(env) + "' is not a CPU path: expected baseline, avx2, avx512 or auto";
    return c;
  }
#if defined(FASTGEN_NATIVE_BUILD)
  c.error = "FASTGEN_CPU_ISA=" + want +
            ": this fastgen was built with FASTGEN_NATIVE=1 (-march=native), which has one path, native; "
            "unset FASTGEN_CPU_ISA or rebuild without FASTGEN_NATIVE=1";
  return c;
#else
  if (!table_of(isa)) {
    c.error = "FASTGEN_CPU_ISA=" + want + ": the " + want + " path is x86-64 only; this build has: baseline";
    return c;
  }
  const std::string miss = missing_features(isa);
  if (!miss.empty()) {
    c.error = "FASTGEN_CPU_ISA=" + want + ": this CPU cannot run the " + want + " path: it lacks " + miss +
              " (unset FASTGEN_CPU_ISA to use the best path it runs)";
    return c;
  }
  c.isa = isa;
  c.table = table_of(isa);
  return c;
#endif
}

const Choice& choice() {
  static const Choice c = choose();  // once (thread-safe), at load time: see kLoadTimeChoice
  return c;
}

// the path in use: the choice, unless set_isa (tests, benchmarks) switched it; -1: the error
std::atomic<int> g_override{-2};  // -2: no override

int current_isa() {
  const int o = g_override.load(std::memory_order_acquire);
  return o != -2 ? o : choice().isa;
}

// choose at load time (the environment the process started with), not at the first kernel call
const bool kLoadTimeChoice = (choice(), true);

}  // namespace

const Kernels& kernels() {
  const int isa = current_isa();
  if (isa < 0) throw std::runtime_error(choice().error);
  return *table_of(isa);
}

int isa_in_use() {
  const int isa = current_isa();
  if (isa < 0) throw std::runtime_error(choice().error);
  return isa;
}

int set_isa(int isa) {
  if (isa == -1) {
    g_override.store(-2, std::memory_order_release);
  } else {
    if (isa < 0 || isa > 3 || !((choice().available >> isa) & 1))
      throw std::runtime_error(std::string("fastgen: the ") + (isa >= 0 && isa < 4 ? kNames[isa] : "unknown") +
                               " CPU path is not built into this library or not supported by this CPU");
    g_override.store(isa, std::memory_order_release);
  }
  return current_isa();
}

int isa_available() { return choice().available; }

void advise_huge_pages(void* p, int64_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t(2) << 20;
  if (bytes < (int64_t)(4 * kHuge)) return;
  uintptr_t a = ((uintptr_t)p + kHuge - 1) & ~(kHuge - 1);
  uintptr_t e = ((uintptr_t)p + (uintptr_t)bytes) & ~(kHuge - 1);
  if (e > a) (void)madvise((void*)a, e - a, MADV_HUGEPAGE);
#else
  (void)p;
  (void)bytes;
#endif
}

}  // namespace fastgen_cpu
