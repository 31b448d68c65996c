// fastgen::knn on CPU, the compute code: exact k-nearest-neighbour search, OpenMP + a hand-vectorised
// micro-kernel. Compiled once per instruction set (csrc/cpu/isa/knn_<isa>.cpp, see isa_begin.h):
// FASTGEN_ISA_LEVEL 2 runs an 8 x 48 AVX-512 tile, 1 a 6 x 16 AVX2 + FMA tile, 0 a 4 x 12 SSE tile
// on x86-64 (a portable 4 x 16 tile elsewhere).
// The tensor boundary (checks, allocation, registration) is csrc/cpu/knn.cpp.
//
// query [B, N, D], key [B, M, D] (float32, float64, float16 or bfloat16, same dtype), 1 <= k <= M.
// Returns dist2 [B, N, k] (float64 for float64 input, else float32), ascending, and
// index [B, N, k] int64; ties go to the lowest key index. dist2 is the exact squared distance
// (computed in double from the original inputs) rounded once to the output dtype.
//
// Algorithm (per batch; never an N x M matrix):
//  1. Centre: mu = mean of the keys (double, rounded to fp32); a = fl32(q - mu), b = fl32(k - mu)
//     (one fp32 subtraction for fp32 / fp16 / bf16 inputs, see centre()). Keys are packed
//     into tiles of NR keys, transposed ([D][NR], then the NR norms ||b||^2), queries into panels
//     of MR queries ([D][MR]).
//  2. Fast pass: for each (MR x NR) tile the micro-kernel computes r = ||b||^2 - 2 a.b in fp32
//     registers (FMA chains of length L, summed into a tile accumulator: the rounding error grows
//     with L + D / L, not D), compares r with each query's running threshold and, rarely, inserts
//     into a per-query max-heap of the C = k + extra smallest r (the candidates). Blocked over
//     keys (a key block stays in L2) and over queries (long query ranges: the keys are streamed
//     from memory once per range); OpenMP over (query range, key chunk) tasks, so small N with
//     large M still fills every core (per-chunk heaps are merged afterwards). See scan_plan.
//  3. Exact re-rank: the C candidates' distances are recomputed in double by direct differences
//     from the original inputs and sorted by (distance, index).
//  4. Certificate: with delta a rigorous bound on |(||a||^2 + r) - ||q - k||^2| (fp32 rounding of the
//     centring, the dot-product chains, the norms and the final FMA; see bound_delta), every key that
//     is not a candidate has ||q - k||^2 >= ||a||^2 + T - delta, where T is the C-th smallest r. If
//     that is strictly above the exact k-th distance, the top k are exact. Otherwise the query goes
//     to the fallback pass: the same micro-kernel rescans all keys and every key whose lower bound
//     ||a||^2 + r - delta is <= the current exact k-th distance is evaluated exactly (an exact
//     brute-force scan, pruned by the rigorous bound). So the result is always exact.
//  M <= C (few keys) and inputs so large that fp32 could overflow go straight to an exact
//  brute-force scan in double. NaN / inf inputs are detected from the packed norms (ValueError).
//
// Micro-kernel vs BLAS (measured on the 2-core AMD EPYC Zen 5 this was written on, thread CPU
// time, one thread): the 8 x 48 AVX-512 tile runs at 221-242 GFLOP/s (fp32 FMA peak 250), MKL
// sgemm (torch.mm) at ~90 and OpenBLAS (numpy, faiss's BLAS) at ~105 GFLOP/s on bounded tiles;
// a FAISS-style sgemm-on-tiles path would be >= 2x slower before its separate top-k pass, so the
// distances never leave the registers here.
#include "kernel_common.h"
// (every header is included above, before the target switch)
#include "isa_begin.h"

namespace {

// ------------------------------------------------------------------------------------------
// SIMD abstraction: one vector type, loads, broadcast, FMA, compare -> bitmask.
// ------------------------------------------------------------------------------------------
#if FASTGEN_ISA_LEVEL == 2
struct Simd {
  static constexpr int W = 16;
  static constexpr bool kFMA = true;  // _mm512_fmadd_ps: one rounding per step
  using V = __m512;
  static inline V zero() { return _mm512_setzero_ps(); }
  static inline V load(const float* p) { return _mm512_loadu_ps(p); }
  static inline V set1(float x) { return _mm512_set1_ps(x); }
  static inline V fma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
  static inline V add(V a, V b) { return _mm512_add_ps(a, b); }
  static inline void store(float* p, V v) { _mm512_storeu_ps(p, v); }
  static inline uint64_t lt(V a, V b) { return (uint64_t)_mm512_cmp_ps_mask(a, b, _CMP_LT_OQ); }
  static inline uint64_t le(V a, V b) { return (uint64_t)_mm512_cmp_ps_mask(a, b, _CMP_LE_OQ); }
};
constexpr int MR = 8;  // queries per micro-tile
constexpr int NV = 3;  // vectors of keys per micro-tile: 8 x 48, 24 accumulators
#elif FASTGEN_ISA_LEVEL == 1
struct Simd {
  static constexpr int W = 8;
  static constexpr bool kFMA = true;
  using V = __m256;
  static inline V zero() { return _mm256_setzero_ps(); }
  static inline V load(const float* p) { return _mm256_loadu_ps(p); }
  static inline V set1(float x) { return _mm256_set1_ps(x); }
  static inline V fma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
  static inline V add(V a, V b) { return _mm256_add_ps(a, b); }
  static inline void store(float* p, V v) { _mm256_storeu_ps(p, v); }
  static inline uint64_t lt(V a, V b) { return (uint64_t)(uint32_t)_mm256_movemask_ps(_mm256_cmp_ps(a, b, _CMP_LT_OQ)); }
  static inline uint64_t le(V a, V b) { return (uint64_t)(uint32_t)_mm256_movemask_ps(_mm256_cmp_ps(a, b, _CMP_LE_OQ)); }
};
constexpr int MR = 6;  // 6 x 16, 12 accumulators (16 ymm registers)
constexpr int NV = 2;
#elif defined(__x86_64__) && (!defined(FASTGEN_NATIVE_BUILD) || defined(__SSE4_1__))
// Baseline x86-64 (SSE): 4 lanes, no FMA (a * b + c is two roundings: kFMA = false for the bound).
struct Simd {
  static constexpr int W = 4;
  static constexpr bool kFMA = false;
  using V = __m128;
  static inline V zero() { return _mm_setzero_ps(); }
  static inline V load(const float* p) { return _mm_loadu_ps(p); }
  static inline V set1(float x) { return _mm_set1_ps(x); }
  static inline V fma(V a, V b, V c) { return _mm_add_ps(_mm_mul_ps(a, b), c); }
  static inline V add(V a, V b) { return _mm_add_ps(a, b); }
  static inline void store(float* p, V v) { _mm_storeu_ps(p, v); }
  static inline uint64_t lt(V a, V b) { return (uint64_t)(uint32_t)_mm_movemask_ps(_mm_cmplt_ps(a, b)); }
  static inline uint64_t le(V a, V b) { return (uint64_t)(uint32_t)_mm_movemask_ps(_mm_cmple_ps(a, b)); }
};
constexpr int MR = 4;  // 4 x 12, 12 accumulators (16 xmm registers)
constexpr int NV = 3;
#else
// Portable fallback: plain arrays of 8 lanes; the compiler may or may not fuse a * b + c, so the
// error bound counts two roundings per step (kFMA = false).
struct Simd {
  static constexpr int W = 8;
  static constexpr bool kFMA = false;
  struct V { float x[8]; };
  static inline V zero() { V v; for (int l = 0; l < 8; ++l) v.x[l] = 0.f; return v; }
  static inline V load(const float* p) { V v; std::memcpy(v.x, p, sizeof(v.x)); return v; }
  static inline V set1(float s) { V v; for (int l = 0; l < 8; ++l) v.x[l] = s; return v; }
  static inline V fma(V a, V b, V c) { V v; for (int l = 0; l < 8; ++l) v.x[l] = a.x[l] * b.x[l] + c.x[l]; return v; }
  static inline V add(V a, V b) { V v; for (int l = 0; l < 8; ++l) v.x[l] = a.x[l] + b.x[l]; return v; }
  static inline void store(float* p, V v) { std::memcpy(p, v.x, sizeof(v.x)); }
  static inline uint64_t lt(V a, V b) { uint64_t m = 0; for (int l = 0; l < 8; ++l) m |= (uint64_t)(a.x[l] < b.x[l]) << l; return m; }
  static inline uint64_t le(V a, V b) { uint64_t m = 0; for (int l = 0; l < 8; ++l) m |= (uint64_t)(a.x[l] <= b.x[l]) << l; return m; }
};
constexpr int MR = 4;
constexpr int NV = 2;
#endif
constexpr int W = Simd::W;
constexpr int NR = NV * W;  // keys per micro-tile
static_assert(NR <= 64, "a tile's hit mask is one 64-bit word");

// ------------------------------------------------------------------------------------------
// Aligned scratch buffers.
// ------------------------------------------------------------------------------------------
template <typename T>
struct Buf {
  T* p = nullptr;
  size_t cap = 0;
  Buf() = default;
  explicit Buf(size_t count) { ensure(count); }
  // at least count elements (contents are not preserved when it grows)
  T* ensure(size_t count) {
    if (count > cap || p == nullptr) {
      release();
      size_t bytes = ((std::max<size_t>(count, 1) * sizeof(T) + 63) / 64) * 64;
      p = static_cast<T*>(std::aligned_alloc(64, bytes));
      if (p == nullptr) throw std::bad_alloc();
      cap = bytes / sizeof(T);
    }
    return p;
  }
  void release() {
    std::free(p);
    p = nullptr;
    cap = 0;
  }
  size_t bytes() const { return cap * sizeof(T); }
  ~Buf() { std::free(p); }
  Buf(const Buf&) = delete;
  Buf& operator=(const Buf&) = delete;
  T& operator[](size_t i) { return p[i]; }
  const T& operator[](size_t i) const { return p[i]; }
};

// Per-thread workspace of the fast pass, kept between calls: fresh multi-MiB buffers cost more
// in page faults than the packing itself. Buffers above 256 MiB are released after each call.
struct Workspace {
  Buf<float> kpack, qpack, rv, thr, sh;
  Buf<int32_t> ri, rn;
  Buf<double> nq, part, mu;
  void trim() {
    const size_t lim = (size_t)256 << 20;
    if (kpack.bytes() > lim) kpack.release();
    if (qpack.bytes() > lim) qpack.release();
    if (rv.bytes() > lim) rv.release();
    if (ri.bytes() > lim) ri.release();
    if (nq.bytes() > lim) nq.release();
  }
};
inline Workspace& workspace() {
  static thread_local Workspace ws;
  return ws;
}

// ------------------------------------------------------------------------------------------
// Max-heaps ordered lexicographically by (value, index): the root is the worst kept entry.
// ------------------------------------------------------------------------------------------
template <typename V>
inline bool lex_less(V a, int32_t ia, V b, int32_t ib) { return a < b || (a == b && ia < ib); }

template <typename V>
inline void heap_offer(V* v, int32_t* id, int32_t& n, int cap, V x, int32_t j) {
  int c;
  if (n < cap) {  // push, sift up
    c = n++;
    while (c > 0) {
      int p = (c - 1) >> 1;
      if (!lex_less(v[p], id[p], x, j)) break;
      v[c] = v[p]; id[c] = id[p]; c = p;
    }
  } else {
    if (!lex_less(x, j, v[0], id[0])) return;
    c = 0;  // replace the root, sift down
    for (;;) {
      int l = 2 * c + 1;
      if (l >= n) break;
      int r = l + 1;
      int m = (r < n && lex_less(v[l], id[l], v[r], id[r])) ? r : l;
      if (!lex_less(x, j, v[m], id[m])) break;
      v[c] = v[m]; id[c] = id[m]; c = m;
    }
  }
  v[c] = x; id[c] = j;
}

// Exact squared distance in double by direct differences (8 independent partial sums).
template <typename T>
inline double exact_d2(const T* __restrict a, const T* __restrict b, int64_t D) {
  double s[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t d = 0;
  for (; d + 8 <= D; d += 8) {
    for (int l = 0; l < 8; ++l) {
      double t = (double)a[d + l] - (double)b[d + l];
      s[l] += t * t;
    }
  }
  for (int l = 0; d < D; ++d, ++l) {
    double t = (double)a[d] - (double)b[d];
    s[l] += t * t;
  }
  return ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7]));
}

// Smallest float >= x (x finite double).
inline float float_up(double x) {
  float f = (float)x;
  if ((double)f < x) f = std::nextafter(f, std::numeric_limits<float>::infinity());
  return f;
}

// ------------------------------------------------------------------------------------------
// The micro-kernel. qp: query panel [D][MR]; kp: key tile [D][NR] followed by nk[NR] (||b||^2,
// NaN in padding lanes). Computes r = nk - 2 a.b for the MR x NR tile in registers, the dot
// products summed in chains of L steps (then added into acc_mem), and hands the registers to the
// epilogue epi(r[MR][NV]).
// ------------------------------------------------------------------------------------------
template <class Epi>
__attribute__((always_inline)) inline void tile_kernel(const float* __restrict qp, const float* __restrict kp,
                                                       int64_t D, int64_t L, float* __restrict acc_mem, Epi&& epi) {
  using V = Simd::V;
  V acc[MR][NV];
  bool first = true;
  for (int64_t d0 = 0; d0 < D; d0 += L) {
    const int64_t d1 = std::min(D, d0 + L);
    for (int r = 0; r < MR; ++r)
      for (int v = 0; v < NV; ++v) acc[r][v] = Simd::zero();
    for (int64_t d = d0; d < d1; ++d) {
      const float* kr = kp + d * NR;
      const float* qr = qp + d * MR;
      V kv[NV];
      for (int v = 0; v < NV; ++v) kv[v] = Simd::load(kr + v * W);
      for (int r = 0; r < MR; ++r) {
        const V b = Simd::set1(qr[r]);
        for (int v = 0; v < NV; ++v) acc[r][v] = Simd::fma(b, kv[v], acc[r][v]);
      }
    }
    if (d1 < D) {  // not the last chain: add into the tile accumulator in memory
      for (int r = 0; r < MR; ++r)
        for (int v = 0; v < NV; ++v) {
          float* p = acc_mem + (r * NV + v) * W;
          Simd::store(p, first ? acc[r][v] : Simd::add(Simd::load(p), acc[r][v]));
        }
      first = false;
    } else if (!first) {
      for (int r = 0; r < MR; ++r)
        for (int v = 0; v < NV; ++v) acc[r][v] = Simd::add(Simd::load(acc_mem + (r * NV + v) * W), acc[r][v]);
    }
  }
  const float* nk = kp + D * NR;
  V nkv[NV];
  for (int v = 0; v < NV; ++v) nkv[v] = Simd::load(nk + v * W);
  const V m2 = Simd::set1(-2.0f);
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < NV; ++v) acc[r][v] = Simd::fma(m2, acc[r][v], nkv[v]);
  epi(acc);
}

// ------------------------------------------------------------------------------------------
// Running top-C of the fast pass, one per (key chunk, query): the C lexicographically smallest
// (r, key index) seen so far, kept sorted (C <= 64: insertion) or as a max-heap (larger C), and
// the query's threshold = the C-th value (+inf until C keys were seen). Keys arrive in increasing
// index order, so "r < threshold" is exactly "(r, index) < the C-th kept pair". Every key of the
// chunk that is not kept has r >= the chunk's final C-th value.
// ------------------------------------------------------------------------------------------
struct TopC {
  float* v;       // [rows][rb]: sorted ascending, +inf in unused slots (sorted modes)
  int32_t* id;    // [rows][rb]
  int32_t* n;     // [rows]: entries (heap mode)
  float* thr;     // [rows]
  int64_t C;
  int64_t rb;     // row stride
  int mode;       // kSimd (C <= 32, AVX-512, rb = 32), kSorted (C <= 64), kHeap
};
enum { kSimd = 0, kSorted = 1, kHeap = 2 };

inline int topc_mode(int64_t C) {
#if FASTGEN_ISA_LEVEL == 2
  if (C <= 32) return kSimd;
#endif
  return C <= 64 ? kSorted : kHeap;
}
inline int64_t topc_stride(int64_t C) { return topc_mode(C) == kSimd ? 32 : C; }

// insert (x, j) into the sorted array v/id[0..C) (+inf padded); precondition x < v[C-1]
inline void sorted_insert(float* v, int32_t* id, int64_t C, float x, int32_t j) {
  int64_t pos = C - 1;
  while (pos > 0 && v[pos - 1] > x) {  // ties: the earlier (lower) index stays first
    v[pos] = v[pos - 1];
    id[pos] = id[pos - 1];
    --pos;
  }
  v[pos] = x;
  id[pos] = j;
}

// Fast-pass epilogue: rows with an r below their threshold insert those keys.
struct TopCEpi {
  const TopC& R;
  int64_t row0;   // first row of this query panel
  int32_t key0;   // index of the tile's first key
  __attribute__((always_inline)) inline void operator()(Simd::V (&x)[MR][NV]) const {
    float* thr = R.thr + row0;
    uint64_t masks[MR];
    uint64_t any = 0;
    for (int r = 0; r < MR; ++r) {
      const Simd::V t = Simd::set1(thr[r]);
      uint64_t mk = 0;
      for (int v = 0; v < NV; ++v) mk |= Simd::lt(x[r][v], t) << (v * W);
      masks[r] = mk;
      any |= mk;
    }
    if (__builtin_expect(any == 0, 1)) return;
    alignas(64) float vals[NR];
    for (int r = 0; r < MR; ++r) {
      uint64_t mk = masks[r];
      if (!mk) continue;
      for (int v = 0; v < NV; ++v) Simd::store(vals + v * W, x[r][v]);
      const int64_t row = row0 + r;
      float* bv = R.v + row * R.rb;
      int32_t* bi = R.id + row * R.rb;
#if FASTGEN_ISA_LEVEL == 2
      if (R.mode == kSimd) {
        // the row's C (<= 32) best as two sorted vectors; each insertion is branch-free: lanes
        // holding values > x shift right by one, x lands in the first of them (after equal values:
        // x's index is larger). Lanes >= C are scratch, never stored.
        __m512 v0 = _mm512_loadu_ps(bv), v1 = _mm512_loadu_ps(bv + 16);
        __m512i i0 = _mm512_loadu_si512(bi), i1 = _mm512_loadu_si512(bi + 16);
        const __m512i sh0 = _mm512_setr_epi32(0, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14);
        const __m512i sh1 = _mm512_setr_epi32(15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30);
        while (mk) {
          const int bit = __builtin_ctzll(mk);
          mk &= mk - 1;
          const __m512 xv = _mm512_set1_ps(vals[bit]);
          const __m512i jv = _mm512_set1_epi32(key0 + bit);
          const uint32_t gt = (uint32_t)_mm512_cmp_ps_mask(v0, xv, _CMP_GT_OQ) |
                              ((uint32_t)_mm512_cmp_ps_mask(v1, xv, _CMP_GT_OQ) << 16);
          const uint32_t pos = gt & (0u - gt);  // the first lane > x
          const __m512 s1 = _mm512_permutex2var_ps(v0, sh1, v1);
          const __m512i t1 = _mm512_permutex2var_epi32(i0, sh1, i1);
          const __m512 s0 = _mm512_permutexvar_ps(sh0, v0);
          const __m512i t0 = _mm512_permutexvar_epi32(sh0, i0);
          v0 = _mm512_mask_mov_ps(_mm512_mask_mov_ps(v0, (__mmask16)gt, s0), (__mmask16)pos, xv);
          v1 = _mm512_mask_mov_ps(_mm512_mask_mov_ps(v1, (__mmask16)(gt >> 16), s1), (__mmask16)(pos >> 16), xv);
          i0 = _mm512_mask_mov_epi32(_mm512_mask_mov_epi32(i0, (__mmask16)gt, t0), (__mmask16)pos, jv);
          i1 = _mm512_mask_mov_epi32(_mm512_mask_mov_epi32(i1, (__mmask16)(gt >> 16), t1), (__mmask16)(pos >> 16), jv);
        }
        const uint32_t keep = R.C >= 32 ? 0xffffffffu : ((1u << R.C) - 1u);
        _mm512_mask_storeu_ps(bv, (__mmask16)keep, v0);
        _mm512_mask_storeu_ps(bv + 16, (__mmask16)(keep >> 16), v1);
        _mm512_mask_storeu_epi32(bi, (__mmask16)keep, i0);
        _mm512_mask_storeu_epi32(bi + 16, (__mmask16)(keep >> 16), i1);
        thr[r] = bv[R.C - 1];
        continue;
      }
#endif
      float th = thr[r];
      if (R.mode == kSorted) {
        while (mk) {
          const int bit = __builtin_ctzll(mk);
          mk &= mk - 1;
          const float xv = vals[bit];
          if (!(xv < th)) continue;
          sorted_insert(bv, bi, R.C, xv, key0 + bit);
          th = bv[R.C - 1];
        }
      } else {
        int32_t n = R.n[row];
        while (mk) {
          const int bit = __builtin_ctzll(mk);
          mk &= mk - 1;
          const float xv = vals[bit];
          if (!(xv < th)) continue;
          heap_offer(bv, bi, n, (int)R.C, xv, key0 + bit);
          th = n == R.C ? bv[0] : std::numeric_limits<float>::infinity();
        }
        R.n[row] = n;
      }
      thr[r] = th;
    }
  }
};

// Fallback epilogue: for each row with keys whose r is <= the row's threshold, h(row, mask).
template <class Handler>
struct CollectEpi {
  const float* thr;
  Handler h;
  __attribute__((always_inline)) inline void operator()(Simd::V (&x)[MR][NV]) {
    for (int r = 0; r < MR; ++r) {
      const Simd::V t = Simd::set1(thr[r]);
      uint64_t mk = 0;
      for (int v = 0; v < NV; ++v) mk |= Simd::le(x[r][v], t) << (v * W);
      if (__builtin_expect(mk != 0, 0)) h(r, mk);
    }
  }
};
template <class Handler>
CollectEpi(const float*, Handler) -> CollectEpi<Handler>;

constexpr double U32 = 1.0 / 16777216.0;  // 2^-24, unit roundoff of fp32

inline double gamma_n(double n) { return n * U32 / (1.0 - n * U32); }

// Rigorous bound on |(||a'||^2 + r) - ||q - k||^2| for any key: see the header comment.
//   r error:  |fl(nk) - ||b'||^2| <= u B^2 (nk rounded once from double),
//             |fl(a'.b') - a'.b'| <= gamma(steps) ||a'|| ||b'|| (chains of L, then P - 1 adds),
//             final FMA: u (B^2 + 2 A B) (one rounding).
//   centring: a' = fl32(q - mu) with |a' - a| <= eps |a| elementwise, eps = u + 2^-52 (the double
//             subtraction, then the rounding to fp32); the same for b', so
//             | ||a' - b'||^2 - ||a - b||^2 | <= (2 eps + eps^2) (||a|| + ||b||)^2.
//   plus an absolute term for underflow (flush-to-zero included): 2^-125 per operation.
struct Bound {
  double B;       // max ||b'|| over the keys
  double steps;   // roundings in one dot-product chain
  int64_t D;
  double operator()(double A) const {
    const double u = U32;
    const double eps = U32 + std::ldexp(1.0, -52);
    // nk: rounded once from a double sum (u + D 2^-52); final FMA: u (B^2 (1 + u) + 2 A B (1 + gamma))
    const double e_r = B * B * (2.0 * u + (double)D * std::ldexp(1.0, -52) + 2.0 * u * u) +
                       2.0 * A * B * (gamma_n(steps) + u) * (1.0 + gamma_n(steps));
    const double AB = (A + B) / (1.0 - eps);
    const double e_c = (2.0 * eps + eps * eps) * AB * AB;
    const double tiny = (double)(D + 8) * std::ldexp(1.0, -125) * 4.0;
    return 1.01 * (e_r + e_c) + tiny;
  }
};

// Number of candidates kept by the fast pass, C = k + extra: enough that the certificate holds
// for almost every query on tight clusters far from the origin (measured on clustered data, std
// 1e-2, offset 1e3; see bench/knn.py), few enough that keeping and re-ranking them stays cheap.
// The rounding error of the fp32 expansion grows with D, so the margin grows with D.
inline int64_t n_candidates(int64_t k, int64_t D) {
  int64_t extra = 8 * (1 + (D >= 128) + (D >= 384) + (D >= 768));
  if (D >= 256) extra += k;
  return k + extra;
}

// Chain length of the dot-product accumulation: about sqrt(D), at least 16.
inline int64_t chain_length(int64_t D) {
  int64_t L = 16;
  while (L * L < D) L *= 2;
  return std::min(L, D);
}

inline bool debug_enabled() {
  static const bool on = [] {
    const char* e = std::getenv("FASTGEN_KNN_DEBUG");
    return e != nullptr && e[0] == '1';
  }();
  return on;
}

// process CPU time (all threads), for FASTGEN_KNN_DEBUG=1 phase timings on a shared machine
inline double debug_clock() {
  timespec ts;
  clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
  return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

inline int num_threads_for(int64_t work) {
  int nt = omp_get_max_threads();
  if (omp_in_parallel()) nt = 1;
  // tiny problems are not worth waking threads for
  // below ~0.5 ms of single-thread work a second thread gains little and, on a shared machine,
  // costs more than it gains (every barrier waits for a descheduled thread)
  if (work < (int64_t)1 << 26) nt = 1;
  return std::max(nt, 1);
}

// ------------------------------------------------------------------------------------------
// Exact brute force (double): for M <= C, for inputs whose squares could overflow fp32, and as
// the reference path. Writes the top k of the listed queries.
// ------------------------------------------------------------------------------------------
template <typename T, typename OutT>
void brute_force(const T* q, const T* key, int64_t N, int64_t M, int64_t D, int64_t k, OutT* od, int64_t* oi,
                 int nt) {
#pragma omp parallel num_threads(nt) if (nt > 1)
  {
    std::vector<double> hv(k);
    std::vector<int32_t> hi(k);
    std::vector<std::pair<double, int32_t>> tmp(k);
#pragma omp for schedule(dynamic, 4)
    for (int64_t i = 0; i < N; ++i) {
      int32_t n = 0;
      const T* qi = q + i * D;
      for (int64_t j = 0; j < M; ++j) {
        double d = exact_d2(qi, key + j * D, D);
        heap_offer(hv.data(), hi.data(), n, (int)k, d, (int32_t)j);
      }
      for (int32_t s = 0; s < n; ++s) tmp[s] = {hv[s], hi[s]};
      std::sort(tmp.begin(), tmp.begin() + n);
      for (int64_t s = 0; s < k; ++s) {
        od[i * k + s] = (OutT)tmp[s].first;
        oi[i * k + s] = tmp[s].second;
      }
    }
  }
}

template <typename T>
inline void prefetch_row(const T* p, int64_t D) {
  const char* c = reinterpret_cast<const char*>(p);
  for (int64_t off = 0; off < D * (int64_t)sizeof(T); off += 64) __builtin_prefetch(c + off, 0, 3);
}

// Input status: 0 finite, 1 a query value is NaN / inf, 2 a key value is NaN / inf.
template <typename T>
inline bool all_finite(const T* x, int64_t n) {
  bool ok = true;
  for (int64_t s = 0; s < n; ++s) ok &= std::isfinite((double)x[s]);
  return ok;
}

template <typename T>
inline int input_status(const T* q, const T* key, int64_t N, int64_t M, int64_t D) {
  if (!all_finite(key, M * D)) return 2;
  if (!all_finite(q, N * D)) return 1;
  return 0;
}

// ------------------------------------------------------------------------------------------
// The scan over (query panel, key tile) pairs shared by the fast pass and the fallback rescan.
// Tasks are (query range of rp panels, key chunk); a task walks its key chunk in blocks of kb
// tiles (~384 KiB, kept in L2) and passes every panel of its range over each block, so the keys
// are streamed from memory once per query range. Key chunks split M when there are too few
// ranges to keep every thread busy (small N, large M); each chunk has its own top-k state, merged
// afterwards.
// scan_task must be inlined into the OpenMP region: called out of line it ran 30 % slower.
// ------------------------------------------------------------------------------------------
struct ScanPlan {
  int64_t n_panels, rp, n_ranges, n_chunks, n_kt, kb;
  int64_t tasks() const { return n_ranges * n_chunks; }
};

// max_chunks: the most key chunks allowed (each chunk must hold enough keys for the state it keeps)
inline ScanPlan scan_plan(int64_t n_panels, int64_t n_kt, int64_t D, int nt, int64_t max_chunks) {
  const int64_t panel_bytes = D * MR * (int64_t)sizeof(float);
  // a range's panels (up to ~768 KiB) stay in L2 / L3 while every key block passes over them: the
  // keys (often larger than L3) are streamed from memory once per range (measured at D = 512, one
  // thread: 16 panels a range 181 ms, 32 170 ms, 48 and more 165-168 ms)
  const int64_t rp_max = std::max<int64_t>(1, std::min<int64_t>(256, (768 * 1024) / panel_bytes));
  // at least 4 ranges a thread where there are panels for them, a multiple of nt (even finish)
  int64_t n_ranges = std::max<int64_t>((n_panels + rp_max - 1) / rp_max, std::min<int64_t>(n_panels, 4 * nt));
  n_ranges = std::min<int64_t>(n_panels, (n_ranges + nt - 1) / nt * nt);
  const int64_t rp = (n_panels + n_ranges - 1) / n_ranges;  // balanced ranges
  n_ranges = (n_panels + rp - 1) / rp;
  // too few panels (small N): split the keys into chunks too
  int64_t n_chunks = 1;
  if (nt > 1 && n_ranges < 4 * nt) n_chunks = (4 * nt + n_ranges - 1) / n_ranges;
  n_chunks = std::max<int64_t>(1, std::min<int64_t>(n_chunks, max_chunks));
  const int64_t tile_bytes = (D + 1) * NR * (int64_t)sizeof(float);
  const int64_t kb = std::max<int64_t>(1, (384 * 1024) / tile_bytes);
  return {n_panels, rp, n_ranges, n_chunks, n_kt, kb};
}

// One task of the plan: the micro-kernel on every (panel, tile) pair of the task, with the
// epilogue make_epi(chunk, panel, tile).
template <class MakeEpi>
__attribute__((always_inline)) inline void scan_task(const ScanPlan& sp, int64_t task, const float* panels, const float* kpack, int64_t D,
                      int64_t L, float* acc_mem, MakeEpi&& make_epi) {
  const int64_t qr = task / sp.n_chunks, kc = task % sp.n_chunks;
  const int64_t p0 = qr * sp.rp, p1 = std::min(sp.n_panels, p0 + sp.rp);
  const int64_t t0 = kc * sp.n_kt / sp.n_chunks, t1 = (kc + 1) * sp.n_kt / sp.n_chunks;
  const int64_t tile_stride = (D + 1) * NR;
  for (int64_t tb = t0; tb < t1; tb += sp.kb) {
    const int64_t te = std::min(t1, tb + sp.kb);
    for (int64_t p = p0; p < p1; ++p) {
      const float* qp = panels + p * D * MR;
      for (int64_t t = tb; t < te; ++t) tile_kernel(qp, kpack + t * tile_stride, D, L, acc_mem, make_epi(kc, p, t));
    }
  }
}

// ------------------------------------------------------------------------------------------
// Centring and packing. The shift s is the mean of (a sample of) the keys rounded to fp32; any
// shift leaves the distances unchanged. Inputs that convert to fp32 exactly (fp32, fp16, bf16) are
// centred by one fp32 subtraction, a' = fl32(x - s); double inputs in double, then rounded once
// more. Either way |a' - (x - s)| <= (u + 2^-52) |x - s| (Bound's eps).
// ------------------------------------------------------------------------------------------
template <typename T>
inline float centre(T x, float s) { return (float)x - s; }
template <>
inline float centre<double>(double x, float s) { return (float)(x - (double)s); }

// Rows [j0, j0 + cnt) of x ([rows][D]) into the transposed panel out[d * LD + l] (l < cnt;
// lanes cnt..LD-1 are zero), and their ||.||^2 (of the fp32 centred values, summed in double)
// into nrm[0..LD).
template <typename T, int LD>
inline void pack_rows(const T* x, int64_t j0, int64_t cnt, int64_t D, const float* sh, float* out, double* nrm) {
#if FASTGEN_ISA_LEVEL == 2
  if constexpr (std::is_same<T, float>::value && LD % 8 == 0) {
    if (D < ((int64_t)1 << 26)) {  // gather offsets l * D fit in int32
      // column d of 8 / 16 rows per gather; the rows' cache lines stay in L1 for 16 columns
      constexpr int NG = LD / 16, NH = (LD % 16) / 8;  // 16-lane and 8-lane groups
      const __m512i off16 = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                               _mm512_set1_epi32((int)D));
      const __m256i off8 = _mm256_mullo_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), _mm256_set1_epi32((int)D));
      __mmask16 m16[NG > 0 ? NG : 1];
      __mmask8 m8[NH > 0 ? NH : 1];
      __m512d acc[2 * NG + NH + 1];
      for (int g = 0; g < 2 * NG + NH + 1; ++g) acc[g] = _mm512_setzero_pd();
      for (int g = 0; g < NG; ++g) {
        const int64_t v = std::max<int64_t>(0, std::min<int64_t>(16, cnt - 16 * g));
        m16[g] = (__mmask16)(v >= 16 ? 0xffffu : ((1u << v) - 1u));
      }
      for (int h = 0; h < NH; ++h) {
        const int64_t v = std::max<int64_t>(0, std::min<int64_t>(8, cnt - 16 * NG - 8 * h));
        m8[h] = (__mmask8)(v >= 8 ? 0xffu : ((1u << v) - 1u));
      }
      for (int64_t d = 0; d < D; ++d) {
        const __m512 s16 = _mm512_set1_ps(sh[d]);
        for (int g = 0; g < NG; ++g) {
          __m512 c = _mm512_setzero_ps();
          if (m16[g]) {
            const float* base = x + (j0 + 16 * g) * D + d;
            c = _mm512_maskz_sub_ps(m16[g], _mm512_mask_i32gather_ps(_mm512_setzero_ps(), m16[g], off16, base, 4),
                                    s16);
          }
          _mm512_storeu_ps(out + d * LD + 16 * g, c);
          const __m512d lo = _mm512_cvtps_pd(_mm512_castps512_ps256(c));
          const __m512d hi = _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(c), 1)));
          acc[2 * g] = _mm512_fmadd_pd(lo, lo, acc[2 * g]);
          acc[2 * g + 1] = _mm512_fmadd_pd(hi, hi, acc[2 * g + 1]);
        }
        for (int h = 0; h < NH; ++h) {
          __m256 c = _mm256_setzero_ps();
          if (m8[h]) {
            const float* base = x + (j0 + 16 * NG + 8 * h) * D + d;
            c = _mm256_maskz_sub_ps(m8[h], _mm256_mmask_i32gather_ps(_mm256_setzero_ps(), m8[h], off8, base, 4),
                                    _mm256_set1_ps(sh[d]));
          }
          _mm256_storeu_ps(out + d * LD + 16 * NG + 8 * h, c);
          const __m512d w = _mm512_cvtps_pd(c);
          acc[2 * NG + h] = _mm512_fmadd_pd(w, w, acc[2 * NG + h]);
        }
      }
      for (int g = 0; g < 2 * NG + NH; ++g) _mm512_storeu_pd(nrm + 8 * g, acc[g]);
      return;
    }
  }
#endif
  // generic: blocks of 16 dims (the panel rows being written stay in L1)
  for (int64_t d0 = 0; d0 < D; d0 += 16) {
    const int64_t d1 = std::min(D, d0 + 16);
    for (int l = 0; l < LD; ++l) {
      if (l < cnt) {
        const T* xj = x + (j0 + l) * D;
        for (int64_t d = d0; d < d1; ++d) out[d * LD + l] = centre(xj[d], sh[d]);
      } else {
        for (int64_t d = d0; d < d1; ++d) out[d * LD + l] = 0.0f;
      }
    }
  }
  for (int l = 0; l < LD; ++l) nrm[l] = 0.0;
  for (int64_t d = 0; d < D; ++d)
    for (int l = 0; l < LD; ++l) nrm[l] += (double)out[d * LD + l] * (double)out[d * LD + l];
}

// ------------------------------------------------------------------------------------------
// One batch element. Returns the input status (the outputs are complete only when it is 0).
// ------------------------------------------------------------------------------------------
template <typename T, typename OutT>
int knn_one(const T* q, const T* key, int64_t N, int64_t M, int64_t D, int64_t k, OutT* od, int64_t* oi,
            int nt_max) {
  if (N == 0) return 0;
  const int64_t C = n_candidates(k, D);
  const int nt = nt_max > 1 ? num_threads_for(N * M * D) : 1;
  if (M <= C) {
    if (const int st = input_status(q, key, N, M, D)) return st;
    brute_force(q, key, N, M, D, k, od, oi, nt);
    return 0;
  }
  const bool dbg = debug_enabled();
  double t_start = dbg ? debug_clock() : 0.0, t_packed = 0.0, t_fast = 0.0;

  const int64_t n_kt = (M + NR - 1) / NR;  // key tiles
  const int64_t tile_stride = (D + 1) * NR;
  const int64_t n_qp = (N + MR - 1) / MR;  // query panels
  const int64_t Npad = n_qp * MR;
  const int64_t L = chain_length(D);
  const int64_t P = (D + L - 1) / L;
  const int64_t RB = topc_stride(C);
  const int64_t n_mu = std::min<int64_t>(M, 4096);  // keys averaged for the centre

  // tasks of the fast pass (scan_plan); a key chunk must hold at least C keys
  const ScanPlan plan = scan_plan(n_qp, n_kt, D, nt, n_kt / std::max<int64_t>(1, (C + NR - 1) / NR));
  const int64_t nks = plan.n_chunks;

  Workspace& ws = workspace();
  struct TrimGuard {
    Workspace& w;
    ~TrimGuard() { w.trim(); }
  } trim_guard{ws};
  double* mu = ws.mu.ensure(D);
  float* sh = ws.sh.ensure(D);  // the shift: mu rounded to fp32
  float* kpack = ws.kpack.ensure((size_t)(n_kt * tile_stride));
  float* qpack = ws.qpack.ensure((size_t)(n_qp * D * MR));
  double* nq = ws.nq.ensure(Npad);
  float* rv = ws.rv.ensure((size_t)(nks * Npad * RB));
  int32_t* ri = ws.ri.ensure((size_t)(nks * Npad * RB));
  int32_t* rn = ws.rn.ensure((size_t)(nks * Npad));
  float* thr = ws.thr.ensure((size_t)(nks * Npad));
  std::fill(mu, mu + D, 0.0);
  const TopC res{rv, ri, rn, thr, C, RB, topc_mode(C)};
  double b2max = 0.0, a2max = 0.0;
  int nonfinite = 0;
  bool overflow = false;
  Bound bound{0.0, 0.0, D};
  std::vector<int64_t> failed;
  std::vector<double> fail_tau;

  auto pack_queries = [&](int64_t p, double& a2m, int& bad) {
    double nrm[MR];
    pack_rows<T, MR>(q, p * MR, std::min<int64_t>(MR, N - p * MR), D, sh, qpack + p * D * MR, nrm);
    for (int r = 0; r < MR; ++r) {
      nq[p * MR + r] = nrm[r];
      a2m = std::max(a2m, nrm[r]);
      bad |= !std::isfinite(nrm[r]);
    }
    for (int64_t kc = 0; kc < nks; ++kc)
      for (int r = 0; r < MR; ++r) {
        const int64_t row = kc * Npad + p * MR + r;
        thr[row] = std::numeric_limits<float>::infinity();
        rn[row] = 0;
        for (int64_t e = 0; e < RB; ++e) {
          rv[row * RB + e] = std::numeric_limits<float>::infinity();
          ri[row * RB + e] = -1;
        }
      }
  };

  // ---- 1. centre and pack ----
  // shift: the mean of (a strided sample of at most 4096) keys, in double, rounded to fp32. Any
  // shift leaves the distances unchanged; the bound uses the norms of the centred data, whatever
  // the shift is.
  for (int64_t u = 0; u < n_mu; ++u) {
    const T* kj = key + (u * M / n_mu) * D;
    for (int64_t d = 0; d < D; ++d) mu[d] += (double)kj[d];
  }
  for (int64_t d = 0; d < D; ++d) sh[d] = (float)(mu[d] / (double)n_mu);

  // One parallel region, three barriers (after packing, after the fast pass, at the end): on a
  // shared machine every barrier waits for the slowest thread.
#pragma omp parallel num_threads(nt) if (nt > 1)
  {
    // keys: tiles [D][NR] + norms; queries: panels [D][MR] (pack_rows)
#pragma omp for schedule(dynamic, 8) reduction(max : b2max, a2max) reduction(| : nonfinite)
    for (int64_t item = 0; item < n_kt + n_qp; ++item) {
      if (item >= n_kt) {  // a query panel [D][MR]
        const int64_t p = item - n_kt;
        pack_queries(p, a2max, nonfinite);
        continue;
      }
      const int64_t t = item;
      float* kp = kpack + t * tile_stride;
      double nrm[NR];  // ||b'||^2 in double
      pack_rows<T, NR>(key, t * NR, std::min<int64_t>(NR, M - t * NR), D, sh, kp, nrm);
      float* nk = kp + D * NR;
      for (int l = 0; l < NR; ++l) {
        if (t * NR + l < M) {
          nk[l] = (float)nrm[l];
          b2max = std::max(b2max, nrm[l]);
          nonfinite |= !std::isfinite(nrm[l]);
        } else {
          nk[l] = std::numeric_limits<float>::quiet_NaN();  // padding: never compares true
        }
      }
    }
    // (the reductions are complete after the loop's barrier; every thread derives the same values)
    // fp32 must not overflow in the fast pass: |a_i| <= A, partial sums <= A B, |r| <= B^2 + 2AB.
    const double sab = std::sqrt(a2max) + std::sqrt(b2max);
    // (a NaN / inf norm: a non-finite input, or a finite one whose centred value overflows fp32)
    const bool ovf = nonfinite || !(sab * sab < 1e36);
    const Bound bnd{std::sqrt(b2max), (Simd::kFMA ? (double)L : 2.0 * (double)L) + (double)P, D};
#pragma omp master
    {
      overflow = ovf;
      bound = bnd;
      if (dbg) t_packed = debug_clock();
    }

    // ---- 2. fast pass: candidates = the C smallest r = ||b||^2 - 2 a.b per query ----
    if (!ovf) {
      alignas(64) float acc_mem[MR * NR];
#pragma omp for schedule(dynamic, 1)
      for (int64_t task = 0; task < plan.tasks(); ++task)
        scan_task(plan, task, qpack, kpack, D, L, acc_mem, [&](int64_t kc, int64_t p, int64_t t) {
          return TopCEpi{res, kc * Npad + p * MR, (int32_t)(t * NR)};
        });
      // implicit barrier

      // ---- 3 + 4. merge chunks, exact re-rank, certificate ----
#pragma omp master
      {
        if (dbg) t_fast = debug_clock();
      }
      std::vector<std::pair<float, int32_t>> cand(nks * RB);
      std::vector<std::pair<double, int32_t>> ex(C);
      std::vector<int64_t> my_failed;
      std::vector<double> my_tau;
#pragma omp for schedule(dynamic, 16) nowait
      for (int64_t i = 0; i < N; ++i) {
        int64_t nc = 0;
        for (int64_t kc = 0; kc < nks; ++kc) {
          const int64_t row = kc * Npad + i;
          const int64_t cnt = res.mode == kHeap ? rn[row] : C;
          for (int64_t s = 0; s < cnt; ++s)
            if (ri[row * RB + s] >= 0) cand[nc++] = {rv[row * RB + s], ri[row * RB + s]};
        }
        // the C smallest (value, index) pairs; Tc = the C-th smallest value. Every key that is not a
        // candidate has r >= Tc.
        if (nc > C) {
          std::nth_element(cand.begin(), cand.begin() + (C - 1), cand.begin() + nc);
          nc = C;
        }
        // in increasing r: the k-th smallest r bounds the exact k-th distance from above
        // (Dk <= nq + r_(k) + delta), so a candidate with r > r_(k) + 2 delta cannot be in the top
        // k and needs no exact evaluation
        std::sort(cand.begin(), cand.begin() + nc);
        const float Tc = cand[nc - 1].first;
        const double delta = bnd(std::sqrt(nq[i]));
        const double rk = (double)cand[k - 1].first;
        const double cut = rk + 2.0 * delta + (double)(D + 8) * std::ldexp(1.0, -51) * (nq[i] + std::fabs(rk) + delta);
        int64_t ne = k;
        while (ne < nc && (double)cand[ne].first <= cut) ++ne;
        const T* qi = q + i * D;
        // the key rows are random reads from memory: keep PF rows in flight
        constexpr int64_t PF = 4;
        for (int64_t s = 0; s < std::min(ne, PF); ++s) prefetch_row(key + (int64_t)cand[s].second * D, D);
        for (int64_t s = 0; s < ne; ++s) {
          if (s + PF < ne) prefetch_row(key + (int64_t)cand[s + PF].second * D, D);
          ex[s] = {exact_d2(qi, key + (int64_t)cand[s].second * D, D), cand[s].second};
        }
        std::partial_sort(ex.begin(), ex.begin() + k, ex.begin() + ne);
        const double Dk = ex[k - 1].first;
        // the double rounding of nq, Dk (D-term sums) and of this comparison
        const double slop = (double)(D + 8) * std::ldexp(1.0, -52) * (nq[i] + std::fabs((double)Tc) + delta + Dk);
        if (nq[i] + (double)Tc - delta - slop > Dk) {  // certified: no other key can reach the top k
          for (int64_t s = 0; s < k; ++s) {
            od[i * k + s] = (OutT)ex[s].first;
            oi[i * k + s] = ex[s].second;
          }
        } else {
          my_failed.push_back(i);
          my_tau.push_back(Dk - nq[i] + delta + slop);
        }
      }
#pragma omp critical
      {
        failed.insert(failed.end(), my_failed.begin(), my_failed.end());
        fail_tau.insert(fail_tau.end(), my_tau.begin(), my_tau.end());
      }
    }
  }
  if (overflow) {
    if (const int st = input_status(q, key, N, M, D)) return st;
    brute_force(q, key, N, M, D, k, od, oi, nt);
    return 0;
  }
  if (dbg)
    fprintf(stderr,
            "fastgen.knn: N=%lld M=%lld D=%lld k=%lld C=%lld L=%lld nks=%lld threads=%d: %zu of %lld queries "
            "uncertified; cpu time: pack %.2f ms, fast pass %.2f ms, re-rank %.2f ms\n",
            (long long)N, (long long)M, (long long)D, (long long)k, (long long)C, (long long)L, (long long)nks, nt,
            failed.size(), (long long)N, 1e3 * (t_packed - t_start), 1e3 * (t_fast - t_packed),
            1e3 * (debug_clock() - t_fast));
  if (failed.empty()) return 0;

  // ---- fallback: rescan every key for the uncertified queries; evaluate exactly every key whose
  // rigorous lower bound ||a||^2 + r - delta does not exceed the current exact k-th distance ----
  std::vector<int64_t> order(failed.size());
  for (size_t s = 0; s < order.size(); ++s) order[s] = (int64_t)s;
  std::sort(order.begin(), order.end(), [&](int64_t x, int64_t y) { return failed[x] < failed[y]; });
  std::vector<int64_t> fq(failed.size());
  std::vector<double> ftau(failed.size());
  for (size_t s = 0; s < order.size(); ++s) {
    fq[s] = failed[order[s]];
    ftau[s] = fail_tau[order[s]];
  }
  const int64_t nf = (int64_t)fq.size();
  const int64_t n_fp = (nf + MR - 1) / MR;
  const int64_t Fpad = n_fp * MR;
  Buf<float> fpack((size_t)(n_fp * D * MR));
  for (int64_t p = 0; p < n_fp; ++p) {
    float* fp = fpack.p + p * D * MR;
    for (int r = 0; r < MR; ++r) {
      const int64_t s = p * MR + r;
      if (s < nf) {
        const int64_t i = fq[s];
        const float* src = qpack + (i / MR) * D * MR + (i % MR);
        for (int64_t d = 0; d < D; ++d) fp[d * MR + r] = src[d * MR];
      } else {
        for (int64_t d = 0; d < D; ++d) fp[d * MR + r] = 0.0f;
      }
    }
  }
  const ScanPlan fplan = scan_plan(n_fp, n_kt, D, nt, n_kt);
  const int64_t fks = fplan.n_chunks;
  Buf<double> ev((size_t)(fks * Fpad * k));
  Buf<int32_t> ei((size_t)(fks * Fpad * k));
  std::vector<int32_t> en(fks * Fpad, 0);
  Buf<float> tau((size_t)(fks * Fpad));
  for (int64_t kc = 0; kc < fks; ++kc)
    for (int64_t s = 0; s < Fpad; ++s)
      tau[kc * Fpad + s] = s < nf ? float_up(ftau[s]) : std::numeric_limits<float>::quiet_NaN();

#pragma omp parallel num_threads(nt) if (nt > 1)
  {
    alignas(64) float acc_mem[MR * NR];
#pragma omp for schedule(dynamic, 1)
    for (int64_t task = 0; task < fplan.tasks(); ++task)
      scan_task(fplan, task, fpack.p, kpack, D, L, acc_mem, [&](int64_t kc, int64_t p, int64_t t) {
        const int64_t row0 = kc * Fpad + p * MR;
        float* tau_p = tau.p + row0;
        const int32_t key0 = (int32_t)(t * NR);
        // rows whose r is <= their threshold: evaluate those keys exactly, tighten the threshold
        return CollectEpi{tau_p, [&, p, row0, tau_p, key0](int r, uint64_t m) {
          const int64_t i = fq[p * MR + r];
          const int64_t row = row0 + r;
          double* v = ev.p + row * k;
          int32_t* id = ei.p + row * k;
          int32_t& n = en[row];
          const T* qi = q + i * D;
          while (m) {
            const int bit = __builtin_ctzll(m);
            m &= m - 1;
            const int32_t j = key0 + bit;
            heap_offer(v, id, n, (int)k, exact_d2(qi, key + (int64_t)j * D, D), j);
          }
          if (n == k) {  // tighten: only keys that can still beat the k-th
            const double delta = bound(std::sqrt(nq[i]));
            const double slop = (double)(D + 8) * std::ldexp(1.0, -52) * (nq[i] + delta + v[0]);
            tau_p[r] = std::min(tau_p[r], float_up(v[0] - nq[i] + delta + slop));
          }
        }};
      });
    std::vector<std::pair<double, int32_t>> ex(fks * k);
#pragma omp for schedule(dynamic, 4)
    for (int64_t s = 0; s < nf; ++s) {
      int64_t n = 0;
      for (int64_t kc = 0; kc < fks; ++kc) {
        const int64_t row = kc * Fpad + s;
        for (int32_t e = 0; e < en[row]; ++e) ex[n++] = {ev[row * k + e], ei[row * k + e]};
      }
      // n >= k: the k best candidates of the fast pass have d <= Dk and are collected again
      std::partial_sort(ex.begin(), ex.begin() + std::min<int64_t>(k, n), ex.begin() + n);
      const int64_t i = fq[s];
      for (int64_t e = 0; e < k; ++e) {
        od[i * k + e] = e < n ? (OutT)ex[e].first : std::numeric_limits<OutT>::quiet_NaN();
        oi[i * k + e] = e < n ? ex[e].second : -1;
      }
    }
  }
  return 0;
}

template <typename T, typename OutT>
int knn_batched(const T* q, const T* key, int64_t B, int64_t N, int64_t M, int64_t D, int64_t k, OutT* od,
                int64_t* oi) {
  const int nt = num_threads_for(B * N * M * D);
  std::vector<int> status(B, 0);
  if (B >= 2 * nt && nt > 1) {
    // many small problems: one thread per batch element
#pragma omp parallel for num_threads(nt) schedule(dynamic, 1)
    for (int64_t b = 0; b < B; ++b)
      status[b] = knn_one<T, OutT>(q + b * N * D, key + b * M * D, N, M, D, k, od + b * N * k, oi + b * N * k, 1);
  } else {
    for (int64_t b = 0; b < B; ++b)
      if ((status[b] = knn_one<T, OutT>(q + b * N * D, key + b * M * D, N, M, D, k, od + b * N * k, oi + b * N * k,
                                        nt)))
        break;
  }
  for (int64_t b = 0; b < B; ++b)
    if (status[b]) return status[b];
  return 0;
}

}  // namespace

int knn(DType dt, const void* query, const void* key, int64_t B, int64_t N, int64_t M, int64_t D, int64_t k,
        void* dist, int64_t* index) {
  if (B * N == 0) return 0;
  // fp16 / bf16 inputs are read directly (their values are exact in fp32 and double)
  switch (dt) {
    case DType::kFloat32:
      return knn_batched<float, float>(static_cast<const float*>(query), static_cast<const float*>(key), B, N, M, D,
                                       k, static_cast<float*>(dist), index);
    case DType::kFloat64:
      return knn_batched<double, double>(static_cast<const double*>(query), static_cast<const double*>(key), B, N, M,
                                         D, k, static_cast<double*>(dist), index);
    case DType::kFloat16:
      return knn_batched<Half, float>(static_cast<const Half*>(query), static_cast<const Half*>(key), B, N, M, D, k,
                                      static_cast<float*>(dist), index);
    case DType::kBFloat16:
      return knn_batched<BFloat16, float>(static_cast<const BFloat16*>(query), static_cast<const BFloat16*>(key), B,
                                          N, M, D, k, static_cast<float*>(dist), index);
  }
  return 0;
}

#include "isa_end.h"
