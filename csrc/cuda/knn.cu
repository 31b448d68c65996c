// fastgen::knn on CUDA: exact k-nearest-neighbour search, batched, one launch per pass.
//
// query [B, N, D], key [B, M, D] (float32, float16 or bfloat16, one dtype, on one CUDA device),
// 1 <= k <= min(M, 64), M < 2^31 - 1. Returns dist2 float32 [B, N, k] ascending and index int64
// [B, N, k]; ties go to the lowest key index. dist2 is the squared distance computed in double by
// direct differences from the inputs, rounded once to fp32. B independent sets (conditional IMLE)
// are searched by one launch of each kernel: no loop over B on the host, no host synchronisation.
//
// Algorithm (never an N x M matrix in memory):
//  1. Fast pass (knn_fast_kernel): a block owns TQ = 64 queries of one batch element and a range of
//     key tiles (TK = 64 keys); query and key tiles are staged, D in chunks of DC = 32, into shared
//     memory as fp32 (fp16 / bf16 values are exact in fp32), and each thread accumulates a 4 x 4
//     micro-tile of DIRECT-DIFFERENCE distances v = sum_d fma(t_d, t_d, .), t_d = fl(q_d - k_d), in
//     fp32. No ||q||^2 - 2 q.k + ||k||^2 expansion and no tensor cores: there is no cancellation,
//     whatever the data's offset, and the rounding error is relative (see 3). Per query a sorted list
//     of the C = 32 * ceil((k + 16) / 32) lexicographically smallest (v, index) pairs is kept in
//     shared memory; a warp updates it (ballot of the keys below the current C-th pair, insertion
//     by warp shuffles). When B * ceil(N / 64) blocks cannot fill the GPU (few queries, many keys)
//     the keys are split into S ranges handled by different blocks; each writes its list to a
//     workspace [B * N, S, C].
//  2. Finalize (knn_final_kernel, a warp per query): merges the S lists into the C smallest pairs,
//     recomputes the candidates' distances exactly in double (direct differences, lanes over D,
//     a fixed-order butterfly reduction: identical rows give bit-identical distances), ranks them by
//     (distance, index) and writes the top k.
//  3. Certificate: with u = 2^-24, the fp32 value of any key satisfies
//        |v - d| <= g d + a,   g = gamma_{D+2} = (D+2) u / (1 - (D+2) u),   a = 2 (D+2) 2^-126
//     (one rounding for the difference, D fused multiply-adds of non-negative terms; a covers
//     underflow, also when subnormals are flushed), and v = +inf only if d >= FLT_MAX / (1 + g).
//     Every key outside the candidates has v >= T, the C-th smallest v (also across the S ranges:
//     each range's own C-th value is >= the merged one), so d >= (min(T, FLT_MAX) - a) / (1 + g).
//     If that is strictly above the candidates' exact k-th distance (bounded above by its double
//     value times 1 + (D + 8) 2^-52), no other key can enter the top k, ties included: the result is
//     exact. Otherwise the query is appended to a failure list (atomic counter in device memory).
//     When M <= C every key is a candidate and nothing needs certifying.
//  4. Fallback (knn_fallback_kernel, a warp per failed query, grid-stride over the device-side
//     count, so no host synchronisation): an exact scan of all M keys, pruned by the same bound:
//     each key's fp32 value gives a lower bound of its exact distance; keys whose bound exceeds
//     tau = (the candidates' exact k-th distance) (1 + (D + 8) 2^-52) >= the true k-th distance
//     cannot be in the top k, the others are evaluated in double (each lane keeps a sorted top-k of
//     its keys, then k rounds of a warp arg-min by (distance, index)). Queries fail only for
//     near-exact ties spanning more than C - k candidates (duplicated keys, lattices, 16-bit data
//     far from the origin).
//
// Offsets are int64 everywhere (inputs above 2^31 elements). NaN / inf inputs are rejected by the
// Python layer (fastgen.knn validates before calling a non-CPU backend).
//
// LibTorch stable ABI (as fastgen._C): torch::stable tensors and registration, the device guard of
// torch/csrc/stable/accelerator.h and the current stream from the stable C shim
// (aoti_torch_get_current_cuda_stream); torch::headeronly::Half / BFloat16 are header-only.
#ifndef USE_CUDA
#define USE_CUDA 1  // declares the CUDA entry points of the C shim
#endif
#include <cuda_runtime.h>
#include <torch/csrc/inductor/aoti_torch/c/shim.h>
#include <torch/csrc/stable/accelerator.h>

#include "../stable.h"

#include <algorithm>
#include <cfloat>
#include <climits>
#include <cmath>
#include <cstdint>

namespace {

constexpr int TQ = 64;            // queries per block
constexpr int TK = 64;            // keys per tile
constexpr int DC = 32;            // feature chunk staged in shared memory
constexpr int THREADS = 256;      // 16 x 16 threads, 4 x 4 (query x key) micro-tile each
constexpr int LDS = TQ + 4;       // row stride of the transposed tiles [DC][LDS] (float4-aligned)
constexpr int SDS = TK + 1;       // row stride of the distance tile [TQ][SDS]
constexpr int TILE_FLOATS = (2 * DC * LDS > TQ * SDS) ? 2 * DC * LDS : TQ * SDS;
constexpr int EXTRA = 16;         // candidates beyond k (at least)
constexpr int MAX_K = 64;
constexpr int WARPS_FINAL = 4;    // warps per block of the finalize / fallback kernels
constexpr int32_t SENT = INT_MAX; // index of an empty list slot (value +inf)
constexpr unsigned FULL = 0xffffffffu;

static_assert(TQ == 64 && TK == 64 && THREADS == 256, "the thread layout below assumes 64 x 64 tiles");

template <typename T>
__device__ __forceinline__ float to_f(T x) {
  return static_cast<float>(x);
}

template <typename V>
__device__ __forceinline__ bool lex_less(V a, int32_t ia, V b, int32_t ib) {
  return a < b || (a == b && ia < ib);
}

// Insert (x, j) into a warp's sorted list of 32 * CP pairs held in registers (lane l owns slots
// l, 32 + l, ...): entries lexicographically after (x, j) move one slot up, the last one drops out.
template <int CP>
__device__ __forceinline__ void warp_insert(float (&rv)[CP], int32_t (&ri)[CP], float x, int32_t j, int lane) {
  int pos = 0;
#pragma unroll
  for (int p = 0; p < CP; ++p) pos += __popc(__ballot_sync(FULL, lex_less(rv[p], ri[p], x, j)));
  if (pos >= 32 * CP) return;  // warp-uniform
  float carry_v = 0.f;         // slot 32 p - 1 (lane 31 of the previous register)
  int32_t carry_i = 0;
#pragma unroll
  for (int p = 0; p < CP; ++p) {
    float up_v = __shfl_up_sync(FULL, rv[p], 1);
    int32_t up_i = __shfl_up_sync(FULL, ri[p], 1);
    const float last_v = __shfl_sync(FULL, rv[p], 31);
    const int32_t last_i = __shfl_sync(FULL, ri[p], 31);
    if (lane == 0) {
      up_v = carry_v;
      up_i = carry_i;
    }
    const int slot = p * 32 + lane;
    if (slot > pos) {
      rv[p] = up_v;
      ri[p] = up_i;
    } else if (slot == pos) {
      rv[p] = x;
      ri[p] = j;
    }
    carry_v = last_v;
    carry_i = last_i;
  }
}

// ------------------------------------------------------------------------------------------------
// 1. fast pass
// ------------------------------------------------------------------------------------------------
template <typename T, int CP>
__global__ void __launch_bounds__(THREADS)
knn_fast_kernel(const T* __restrict__ q, const T* __restrict__ key, int64_t N, int64_t M, int64_t D, int64_t nqt,
                int64_t S, float* __restrict__ wv, int32_t* __restrict__ wi) {
  constexpr int C = 32 * CP;
  extern __shared__ float4 smem4[];
  float* sQ = reinterpret_cast<float*>(smem4);  // [DC][LDS] queries, transposed
  float* sK = sQ + DC * LDS;                     // [DC][LDS] keys, transposed
  float* sD = sQ;                                // [TQ][SDS] distances (aliases the tiles)
  float* lv = sQ + TILE_FLOATS;                  // [TQ][C] sorted candidate values
  int32_t* li = reinterpret_cast<int32_t*>(lv + TQ * C);  // [TQ][C] their key indices

  const int64_t blk = blockIdx.x;
  const int64_t s = blk % S;
  const int64_t qt = (blk / S) % nqt;
  const int64_t b = blk / (S * nqt);
  const int64_t q0 = qt * TQ;
  const int nq = (int)(N - q0 < TQ ? N - q0 : TQ);
  const T* qb = q + (b * N + q0) * D;
  const T* kb = key + b * M * D;
  const int64_t nkt = (M + TK - 1) / TK;
  const int64_t t0 = s * nkt / S, t1 = (s + 1) * nkt / S;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int ty = tid >> 4, tx = tid & 15;  // queries 4 ty .. 4 ty + 3, keys 4 tx .. 4 tx + 3
  const bool active = warp * 8 < nq;       // warp w computes queries 8 w .. 8 w + 7

  for (int e = tid; e < TQ * C; e += THREADS) {
    lv[e] = INFINITY;
    li[e] = SENT;
  }

  for (int64_t t = t0; t < t1; ++t) {
    const int64_t k0 = t * TK;
    const int nk = (int)(M - k0 < TK ? M - k0 : TK);
    float acc[4][4];
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) acc[i][j] = 0.f;
    for (int64_t d0 = 0; d0 < D; d0 += DC) {
      const int dc = (int)(D - d0 < DC ? D - d0 : DC);
      __syncthreads();  // the previous chunk / distance tile / list update is done
      for (int e = tid; e < TQ * DC; e += THREADS) {
        const int r = e / DC, d = e % DC;
        sQ[d * LDS + r] = (r < nq && d < dc) ? to_f(qb[(int64_t)r * D + d0 + d]) : 0.f;
        sK[d * LDS + r] = (r < nk && d < dc) ? to_f(kb[(k0 + r) * D + d0 + d]) : 0.f;
      }
      __syncthreads();
      if (active) {
        // padded dimensions are 0 - 0: fma(0, 0, acc) == acc exactly
#pragma unroll 8
        for (int d = 0; d < DC; ++d) {
          const float4 a4 = *reinterpret_cast<const float4*>(sQ + d * LDS + 4 * ty);
          const float4 c4 = *reinterpret_cast<const float4*>(sK + d * LDS + 4 * tx);
          const float qa[4] = {a4.x, a4.y, a4.z, a4.w};
          const float kc[4] = {c4.x, c4.y, c4.z, c4.w};
#pragma unroll
          for (int i = 0; i < 4; ++i)
#pragma unroll
            for (int j = 0; j < 4; ++j) {
              const float df = qa[i] - kc[j];
              acc[i][j] = fmaf(df, df, acc[i][j]);
            }
        }
      }
    }
    __syncthreads();  // everyone is done reading the tiles that sD aliases
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) sD[(4 * ty + i) * SDS + 4 * tx + j] = acc[i][j];
    __syncthreads();

    // running top-C: warp w updates the lists of queries 8 w .. 8 w + 7
    for (int r = 0; r < 8; ++r) {
      const int qi = warp * 8 + r;
      if (qi >= nq) break;  // warp-uniform
      float* v = lv + qi * C;
      int32_t* id = li + qi * C;
      const float wv_ = v[C - 1];
      const int32_t wi_ = id[C - 1];
      const float x0 = lane < nk ? sD[qi * SDS + lane] : INFINITY;
      const float x1 = lane + 32 < nk ? sD[qi * SDS + lane + 32] : INFINITY;
      const int32_t j0 = (int32_t)k0 + lane, j1 = (int32_t)k0 + lane + 32;
      unsigned m0 = __ballot_sync(FULL, lane < nk && lex_less(x0, j0, wv_, wi_));
      unsigned m1 = __ballot_sync(FULL, lane + 32 < nk && lex_less(x1, j1, wv_, wi_));
      if ((m0 | m1) == 0u) continue;
      float rv[CP];
      int32_t ri[CP];
#pragma unroll
      for (int p = 0; p < CP; ++p) {
        rv[p] = v[p * 32 + lane];
        ri[p] = id[p * 32 + lane];
      }
      while (m0) {  // in increasing key index
        const int src = __ffs(m0) - 1;
        m0 &= m0 - 1;
        warp_insert<CP>(rv, ri, __shfl_sync(FULL, x0, src), (int32_t)k0 + src, lane);
      }
      while (m1) {
        const int src = __ffs(m1) - 1;
        m1 &= m1 - 1;
        warp_insert<CP>(rv, ri, __shfl_sync(FULL, x1, src), (int32_t)k0 + 32 + src, lane);
      }
#pragma unroll
      for (int p = 0; p < CP; ++p) {
        v[p * 32 + lane] = rv[p];
        id[p * 32 + lane] = ri[p];
      }
    }
  }
  __syncthreads();
  for (int e = tid; e < nq * C; e += THREADS) {
    const int qi = e / C, slot = e % C;
    const int64_t row = ((b * N + q0 + qi) * S + s) * C + slot;
    wv[row] = lv[e];
    wi[row] = li[e];
  }
}

// ------------------------------------------------------------------------------------------------
// 2 + 3. merge the S lists, exact re-rank in double, top k, certificate
// ------------------------------------------------------------------------------------------------
template <typename T, int CP>
__global__ void __launch_bounds__(WARPS_FINAL * 32)
knn_final_kernel(const T* __restrict__ q, const T* __restrict__ key, int64_t BN, int64_t N, int64_t M, int64_t D,
                 int64_t k, int64_t S, const float* __restrict__ wv, const int32_t* __restrict__ wi, double g32,
                 double a32, double g64, float* __restrict__ out_d, int64_t* __restrict__ out_i,
                 unsigned long long* __restrict__ fail_count, int64_t* __restrict__ fail_list,
                 double* __restrict__ fail_tau) {
  constexpr int C = 32 * CP;
  __shared__ double sd[WARPS_FINAL][C];
  __shared__ int32_t sid[WARPS_FINAL][C];
  __shared__ double sdk[WARPS_FINAL];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t row = (int64_t)blockIdx.x * WARPS_FINAL + warp;
  if (row >= BN) return;  // whole warps; no block-wide barrier below
  const int64_t b = row / N;

  float rv[CP];
  int32_t ri[CP];
  const float* v0 = wv + row * S * C;
  const int32_t* i0 = wi + row * S * C;
#pragma unroll
  for (int p = 0; p < CP; ++p) {
    rv[p] = v0[p * 32 + lane];
    ri[p] = i0[p * 32 + lane];
  }
  for (int64_t s = 1; s < S; ++s) {
#pragma unroll
    for (int p = 0; p < CP; ++p) {
      const float x = v0[s * C + p * 32 + lane];
      const int32_t j = i0[s * C + p * 32 + lane];
      const float wv_ = __shfl_sync(FULL, rv[CP - 1], 31);
      const int32_t wi_ = __shfl_sync(FULL, ri[CP - 1], 31);
      unsigned m = __ballot_sync(FULL, j != SENT && lex_less(x, j, wv_, wi_));
      while (m) {
        const int src = __ffs(m) - 1;
        m &= m - 1;
        warp_insert<CP>(rv, ri, __shfl_sync(FULL, x, src), __shfl_sync(FULL, j, src), lane);
      }
    }
  }
  const float Tc = __shfl_sync(FULL, rv[CP - 1], 31);  // the C-th value
  const int32_t Tc_id = __shfl_sync(FULL, ri[CP - 1], 31);
  int nc = 0;  // candidates (sorted, empty slots last)
#pragma unroll
  for (int p = 0; p < CP; ++p) {
    nc += __popc(__ballot_sync(FULL, ri[p] != SENT));
    sid[warp][p * 32 + lane] = ri[p];
  }
  __syncwarp();

  // exact distances of the candidates: double direct differences, lanes over D
  const T* qr = q + row * D;
  const T* kb = key + b * M * D;
  for (int c = 0; c < nc; ++c) {
    const T* kr = kb + (int64_t)sid[warp][c] * D;
    double acc = 0.0;
    for (int64_t d = lane; d < D; d += 32) {
      const double t = (double)to_f(qr[d]) - (double)to_f(kr[d]);
      acc = fma(t, t, acc);
    }
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) acc += __shfl_xor_sync(FULL, acc, off);
    if (lane == 0) sd[warp][c] = acc;
  }
  __syncwarp();

  // rank by (distance, index): indices are distinct, so the ranks are 0 .. nc - 1
  for (int c = lane; c < nc; c += 32) {
    const double dc = sd[warp][c];
    const int32_t ic = sid[warp][c];
    int rank = 0;
    for (int e = 0; e < nc; ++e) rank += lex_less(sd[warp][e], sid[warp][e], dc, ic) ? 1 : 0;
    if (rank < k) {
      out_d[row * k + rank] = (float)dc;
      out_i[row * k + rank] = ic;
    }
    if (rank == k - 1) sdk[warp] = dc;
  }
  __syncwarp();

  if (lane == 0 && M > C && Tc_id != SENT) {
    // every non-candidate key has exact d >= (min(T, FLT_MAX) - a32) / (1 + g32); the exact k-th
    // distance of the candidates is <= sdk (1 + g64)
    const double lower = (fmin((double)Tc, (double)FLT_MAX) - a32) / (1.0 + g32);
    const double upper = sdk[warp] * (1.0 + g64);
    if (!(lower > upper)) {
      const unsigned long long pos = atomicAdd(fail_count, 1ull);
      fail_list[pos] = row;
      fail_tau[pos] = upper;  // >= the exact k-th distance: prunes the fallback's scan
    }
  }
}

// ------------------------------------------------------------------------------------------------
// 4. exact brute force (double) of the queries the certificate could not settle
// ------------------------------------------------------------------------------------------------
template <typename T>
__global__ void __launch_bounds__(WARPS_FINAL * 32)
knn_fallback_kernel(const T* __restrict__ q, const T* __restrict__ key, int64_t N, int64_t M, int64_t D, int k,
                    double g32, double a32, const unsigned long long* __restrict__ fail_count,
                    const int64_t* __restrict__ fail_list, const double* __restrict__ fail_tau,
                    float* __restrict__ out_d, int64_t* __restrict__ out_i) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t nf = (int64_t)*fail_count;
  for (int64_t f = (int64_t)blockIdx.x * WARPS_FINAL + warp; f < nf; f += (int64_t)gridDim.x * WARPS_FINAL) {
    const int64_t row = fail_list[f];
    const double tau = fail_tau[f];
    const int64_t b = row / N;
    const T* qr = q + row * D;
    const T* kb = key + b * M * D;
    double lv[MAX_K];
    int32_t li[MAX_K];
    int n = 0;
    for (int64_t j = lane; j < M; j += 32) {  // each lane: sorted top k of its keys (index order)
      const T* kr = kb + j * D;
      // fp32 pass first: a key whose rigorous lower bound exceeds tau (>= the exact k-th distance)
      // cannot be in the top k; only the others are evaluated in double
      float v = 0.f;
      for (int64_t d = 0; d < D; ++d) {
        const float df = to_f(qr[d]) - to_f(kr[d]);
        v = fmaf(df, df, v);
      }
      if ((fmin((double)v, (double)FLT_MAX) - a32) / (1.0 + g32) > tau) continue;
      double dd = 0.0;
      for (int64_t d = 0; d < D; ++d) {
        const double t = (double)to_f(qr[d]) - (double)to_f(kr[d]);
        dd = fma(t, t, dd);
      }
      if (n < k || dd < lv[n - 1]) {  // a later index never wins a tie
        int pos = n < k ? n : k - 1;
        while (pos > 0 && lv[pos - 1] > dd) {
          lv[pos] = lv[pos - 1];
          li[pos] = li[pos - 1];
          --pos;
        }
        lv[pos] = dd;
        li[pos] = (int32_t)j;
        if (n < k) ++n;
      }
    }
    int h = 0;  // head of this lane's list
    for (int r = 0; r < k; ++r) {
      const double hv = h < n ? lv[h] : INFINITY;
      const int32_t hi = h < n ? li[h] : SENT;
      double bv = hv;
      int32_t bi = hi;
#pragma unroll
      for (int off = 16; off > 0; off >>= 1) {
        const double ov = __shfl_xor_sync(FULL, bv, off);
        const int32_t oi = __shfl_xor_sync(FULL, bi, off);
        if (lex_less(ov, oi, bv, bi)) {
          bv = ov;
          bi = oi;
        }
      }
      if (lane == 0) {
        out_d[row * k + r] = (float)bv;
        out_i[row * k + r] = bi;
      }
      if (h < n && hi == bi) ++h;  // the owner of the winner advances (indices are distinct)
    }
  }
}

// ------------------------------------------------------------------------------------------------
// host side
// ------------------------------------------------------------------------------------------------
using fastgen::Tensor;

// CUDA runtime errors as std::runtime_error (RuntimeError in Python), with the call and the reason.
#define FG_CUDA_CHECK(expr)                                                                       \
  do {                                                                                             \
    const cudaError_t fg_err_ = (expr);                                                            \
    FG_CHECK(fg_err_ == cudaSuccess, "fastgen::knn (CUDA): ", #expr, " failed: ", cudaGetErrorString(fg_err_)); \
  } while (0)

template <typename T, int CP>
void launch(const Tensor& qc, const Tensor& kc, int64_t k, Tensor& dist, Tensor& index, cudaStream_t stream) {
  constexpr int C = 32 * CP;
  const int64_t B = qc.size(0), N = qc.size(1), M = kc.size(1), D = qc.size(2);
  int dev = 0, sm_count = 0, smem_optin = 0;
  FG_CUDA_CHECK(cudaGetDevice(&dev));
  FG_CUDA_CHECK(cudaDeviceGetAttribute(&sm_count, cudaDevAttrMultiProcessorCount, dev));
  FG_CUDA_CHECK(cudaDeviceGetAttribute(&smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
  const int64_t sms = sm_count;
  const int64_t nqt = (N + TQ - 1) / TQ, nkt = (M + TK - 1) / TK;
  const int64_t blocks0 = B * nqt;
  // split the keys when the query tiles alone cannot fill the GPU (two blocks per SM), keeping
  // at least 4 key tiles per split
  int64_t S = 1;
  if (blocks0 < 2 * sms) {
    S = (2 * sms + blocks0 - 1) / blocks0;
    S = std::min<int64_t>(S, std::max<int64_t>(1, nkt / 4));
    S = std::min<int64_t>(S, 64);
  }
  FG_CHECK(blocks0 * S < (int64_t)INT_MAX, "fastgen::knn (CUDA): too many query tiles (B * N too large)");
  const int64_t BN = B * N;
  FG_CHECK((BN + WARPS_FINAL - 1) / WARPS_FINAL < (int64_t)INT_MAX, "fastgen::knn (CUDA): B * N too large");
  Tensor wv = fastgen::empty(qc, {BN * S * C}, fastgen::kFloat);
  Tensor wi = fastgen::empty(qc, {BN * S * C}, fastgen::kInt);
  Tensor fail_count = fastgen::zeros(qc, {1}, fastgen::kLong);
  Tensor fail_list = fastgen::empty(qc, {BN}, fastgen::kLong);
  Tensor fail_tau = fastgen::empty(qc, {BN}, fastgen::kDouble);

  const size_t smem = (size_t)TILE_FLOATS * sizeof(float) + (size_t)TQ * C * (sizeof(float) + sizeof(int32_t));
  FG_CHECK(smem <= (size_t)smem_optin, "fastgen::knn (CUDA): needs ", smem,
              " bytes of shared memory per block, this GPU allows ", smem_optin);
  auto fast = knn_fast_kernel<T, CP>;
  FG_CUDA_CHECK(cudaFuncSetAttribute(fast, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem));
  const T* qp = static_cast<const T*>(qc.const_data_ptr());
  const T* kp = static_cast<const T*>(kc.const_data_ptr());
  fast<<<(unsigned)(blocks0 * S), THREADS, smem, stream>>>(qp, kp, N, M, D, nqt, S, wv.mutable_data_ptr<float>(),
                                                            wi.mutable_data_ptr<int32_t>());
  FG_CUDA_CHECK(cudaGetLastError());

  const double u32 = std::ldexp(1.0, -24);
  const double n = (double)D + 2.0;
  // (D >= 2^23: no useful bound; every query with M > C goes to the exact fallback)
  const double g32 = n * u32 < 0.5 ? 1.01 * (n * u32 / (1.0 - n * u32)) + std::ldexp(1.0, -50) : INFINITY;
  const double a32 = 2.0 * n * std::ldexp(1.0, -126);  // underflow, with the (1 + g) growth, also under FTZ
  const double g64 = ((double)D + 8.0) * std::ldexp(1.0, -52);
  auto* fc = reinterpret_cast<unsigned long long*>(fail_count.mutable_data_ptr<int64_t>());
  const unsigned fin_blocks = (unsigned)((BN + WARPS_FINAL - 1) / WARPS_FINAL);
  knn_final_kernel<T, CP><<<fin_blocks, WARPS_FINAL * 32, 0, stream>>>(
      qp, kp, BN, N, M, D, k, S, wv.mutable_data_ptr<float>(), wi.mutable_data_ptr<int32_t>(), g32, a32, g64,
      dist.mutable_data_ptr<float>(), index.mutable_data_ptr<int64_t>(), fc, fail_list.mutable_data_ptr<int64_t>(),
      fail_tau.mutable_data_ptr<double>());
  FG_CUDA_CHECK(cudaGetLastError());

  const unsigned fb_blocks = (unsigned)std::min<int64_t>((int64_t)fin_blocks, 8 * sms);
  knn_fallback_kernel<T><<<fb_blocks, WARPS_FINAL * 32, 0, stream>>>(
      qp, kp, N, M, D, (int)k, g32, a32, fc, fail_list.mutable_data_ptr<int64_t>(), fail_tau.mutable_data_ptr<double>(),
      dist.mutable_data_ptr<float>(), index.mutable_data_ptr<int64_t>());
  FG_CUDA_CHECK(cudaGetLastError());
}

template <typename T>
void launch_k(const Tensor& qc, const Tensor& kc, int64_t k, Tensor& dist, Tensor& index, cudaStream_t stream) {
  const int64_t cp = (k + EXTRA + 31) / 32;  // C = 32 cp >= k + 16
  if (cp == 1) {
    launch<T, 1>(qc, kc, k, dist, index, stream);
  } else if (cp == 2) {
    launch<T, 2>(qc, kc, k, dist, index, stream);
  } else {
    launch<T, 3>(qc, kc, k, dist, index, stream);
  }
}

std::tuple<Tensor, Tensor> knn_cuda(Tensor query, Tensor key, int64_t k) {
  FG_CHECK_VALUE(query.dim() == 3, "fastgen::knn: query must be [B, N, D], got ", fastgen::shape_str(query.sizes()));
  FG_CHECK_VALUE(key.dim() == 3, "fastgen::knn: key must be [B, M, D], got ", fastgen::shape_str(key.sizes()));
  FG_CHECK_VALUE(query.size(0) == key.size(0), "fastgen::knn: batch sizes differ: query ", query.size(0), ", key ",
           key.size(0));
  FG_CHECK_VALUE(query.size(2) == key.size(2), "fastgen::knn: feature dims D differ: query ", query.size(2), ", key ",
           key.size(2));
  FG_CHECK_VALUE(query.is_cuda() && key.is_cuda() && query.get_device_index() == key.get_device_index(),
           "fastgen::knn (CUDA): query and key must be on the same CUDA device");
  FG_CHECK(query.scalar_type() == key.scalar_type(), "fastgen::knn: query and key dtypes differ (",
           fastgen::dtype_name(query.scalar_type()), ", ", fastgen::dtype_name(key.scalar_type()), ")");
  const auto st = query.scalar_type();
  FG_CHECK(st == fastgen::kFloat || st == fastgen::kHalf || st == fastgen::kBFloat16,
           "fastgen::knn (CUDA backend): query and key must be float32, float16 or bfloat16, got ",
           fastgen::dtype_name(st), " (use backend='torch' or 'triton' for float64)");
  const int64_t B = query.size(0), N = query.size(1), M = key.size(1), D = query.size(2);
  FG_CHECK_VALUE(k >= 1 && k <= M, "fastgen::knn: need 1 <= k <= M, got k = ", k, ", M = ", M);
  FG_CHECK_VALUE(k <= MAX_K, "fastgen::knn (CUDA backend): k must be <= ", MAX_K, ", got k = ", k);
  FG_CHECK_VALUE(M < (int64_t)INT_MAX, "fastgen::knn (CUDA backend): M (key rows) must be < 2^31 - 1, got ", M);
  FG_CHECK_VALUE(D >= 1, "fastgen::knn: D must be >= 1");
  const int32_t device = query.get_device_index();
  const torch::stable::accelerator::DeviceGuard guard(device);
  void* stream_ptr = nullptr;
  TORCH_ERROR_CODE_CHECK(aoti_torch_get_current_cuda_stream(device, &stream_ptr));
  const cudaStream_t stream = static_cast<cudaStream_t>(stream_ptr);
  const Tensor qc = torch::stable::contiguous(query), kc = torch::stable::contiguous(key);
  Tensor dist = fastgen::empty(query, {B, N, k}, fastgen::kFloat);
  Tensor index = fastgen::empty(query, {B, N, k}, fastgen::kLong);
  if (B * N == 0) return {dist, index};
  if (st == fastgen::kFloat) {
    launch_k<float>(qc, kc, k, dist, index, stream);
  } else if (st == fastgen::kHalf) {
    launch_k<torch::headeronly::Half>(qc, kc, k, dist, index, stream);
  } else {
    launch_k<torch::headeronly::BFloat16>(qc, kc, k, dist, index, stream);
  }
  return {dist, index};
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(fastgen, CUDA, m) { m.impl("_knn_kernel", TORCH_BOX(&knn_cuda)); }
