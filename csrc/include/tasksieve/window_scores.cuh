// Fused WindowKV observation-window scorer (torch-free).
//
//   WindowScoresWorkspaceBytes(B, A, H, Hk, N, window) -> size_t
//   WindowScores<T>(q, k, kv_start, out, workspace, workspace_bytes, B, A, H, Hk, N, D, window,
//                   q strides, k strides, scale, reduce_max, stream) -> cudaError_t
//   WindowScoresLaunch(DType, q, k, ...)  the same with a runtime dtype tag (the entry point of
//                   the torch glue and the simulator runner)
//   WindowScoresDefaultScale(D) -> float   1/sqrt(D), the scale when the caller gives none
//
// Math, per batch b and query head h (G = H / Hk, hk = h / G), fp32 throughout:
//   x[i, j]  = scale * q[b, i, h, :] . k[b, j, hk, :]        query i at position N - A + i,
//              visible keys kv_start[b] <= j <= N - A + i
//   m_i      = max_j x[i, j],   l_i = sum_j exp(x[i, j] - m_i)                     (pass 1)
//   s_h[j]   = sum_i exp(x[i, j] - m_i) / l_i       for review tokens j < nw*window  (pass 2)
//   sigma_h[m] = window::window_reduce(s_h[m*window .. m*window + window), reduce_max)
//   out[b, hk, m] = (1/G) * sum_g sigma_{hk*G+g}[m]
// The [A, N] probability matrix never reaches global memory: pass 1 keeps per-chunk (m, l)
// partials (merged by a tiny combine kernel), pass 2 accumulates s_h for a block's windows in
// shared memory and reduces it straight into window scores. Every reduction has a fixed order,
// so results are deterministic (no atomics).
//
// Dot products: a block computes a 32-query x 64-key tile at a time, staging 64 head-dim
// elements of both operands through shared memory (fp32), 4 x 2 accumulators per thread, so
// any head dim works with a fixed 25 KB of tiles (qk_tiles.cuh, shared with flex_estimate.cuh).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <climits>
#include <cmath>
#include <cstddef>
#include <cstdint>

#include "tasksieve/common.h"
#include "tasksieve/dtype.cuh"
#include "tasksieve/qk_tiles.cuh"
#include "tasksieve/window_index.h"

namespace tasksieve {
namespace window_scores_detail {

// The shared tile machinery (qk_tiles.cuh): 256 threads, 32 x 64 q.k tiles, (m, l) stats.
using qk_tiles::kAlign;
using qk_tiles::kDK;
using qk_tiles::kKT;
using qk_tiles::kMaxKeyTilesPerChunk;
using qk_tiles::kQT;
using qk_tiles::kRK;
using qk_tiles::kRQ;
using qk_tiles::kTargetBlocks;
using qk_tiles::kThreads;
using qk_tiles::kWarps;
using qk_tiles::AlignUp;
using qk_tiles::MergeStats;
using qk_tiles::RowStatsCombineKernel;
using qk_tiles::TileDots;
using qk_tiles::TileSmem;

constexpr int kMaxTokensPerBlock = 1024;  // pass-2 token mass kept in shared memory

__device__ __forceinline__ int64_t KvStart(const int32_t* kv_start, int64_t b, int64_t N,
                                           int64_t A) {
  // Device values cannot be validated without a host sync: clamp into [0, N - A].
  return kv_start ? window::clamp_kv_start(kv_start[b], N, A) : 0;
}

// Pass 1, one block per (b, h, query tile qt, key chunk c):
//   part[((b*H + h)*A + i)*chunks + c] = (max_j x[i, j], sum_j exp(x[i, j] - max))
// over the visible keys j of chunk c (keys [c*tpc*64, (c+1)*tpc*64)); (-inf, 0) when none.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    WindowScoresStatsKernel(const T* __restrict__ q, const T* __restrict__ k,
                            const int32_t* __restrict__ kv_start, float2* __restrict__ part,
                            int64_t A, int64_t H, int64_t Hk, int64_t N, int D,
                            int64_t q_stride_b, int64_t q_stride_a, int64_t q_stride_h,
                            int64_t k_stride_b, int64_t k_stride_n, int64_t k_stride_h,
                            float scale, int64_t q_tiles, int64_t chunks, int64_t tiles_per_chunk) {
  __shared__ TileSmem sm;
  int64_t bid = blockIdx.x;
  const int64_t c = bid % chunks;
  bid /= chunks;
  const int64_t qt = bid % q_tiles;
  bid /= q_tiles;
  const int64_t h = bid % H, b = bid / H;
  const int64_t hk = h / (H / Hk);
  const T* qh = q + b * q_stride_b + h * q_stride_h;
  const T* kh = k + b * k_stride_b + hk * k_stride_h;
  const int64_t ks = KvStart(kv_start, b, N, A);
  const int64_t i0 = qt * kQT;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;

  float m[kRQ], l[kRQ], acc[kRQ][kRK];
#pragma unroll
  for (int r = 0; r < kRQ; ++r) m[r] = ts_neg_inf(), l[r] = 0.f;
  for (int64_t t = 0; t < tiles_per_chunk; ++t) {
    const int64_t j0 = (c * tiles_per_chunk + t) * kKT;
    if (j0 >= N) break;  // uniform over the block
    TileDots(qh, q_stride_a, i0, A, kh, k_stride_n, j0, N, D, sm, acc);
#pragma unroll
    for (int r = 0; r < kRQ; ++r) {
      const int64_t i = i0 + warp + kWarps * r;
#pragma unroll
      for (int cc = 0; cc < kRK; ++cc) {
        const int64_t j = j0 + lane + 32 * cc;
        if (i < A && window::key_visible(j, i, N, A, ks))
          MergeStats(m[r], l[r], scale * acc[r][cc], 1.f);
      }
    }
  }
  // A warp owns its queries; merge the 32 lanes' partials (fixed butterfly order).
#pragma unroll
  for (int r = 0; r < kRQ; ++r) {
#pragma unroll
    for (int off = 16; off > 0; off /= 2) {
      const float m2 = __shfl_xor_sync(0xffffffffu, m[r], off);
      const float l2 = __shfl_xor_sync(0xffffffffu, l[r], off);
      MergeStats(m[r], l[r], m2, l2);
    }
    const int64_t i = i0 + warp + kWarps * r;
    if (lane == 0 && i < A) part[((b * H + h) * A + i) * chunks + c] = make_float2(m[r], l[r]);
  }
}

// Pass 2, one block per (b, hk, run of windows [w0, w1)), looping over the G query heads:
//   s_h[j] = sum_i exp(x[i, j] - m_i) / l_i for j in [w0*window, w1*window)
//   out[b, hk, m] = (1/G) sum_g window_reduce(s_{hk*G+g}[m*window ..], window, reduce_max)
// s_h lives in shared memory when (w1 - w0) * window <= kMaxTokensPerBlock; otherwise (one
// window per block, window > kMaxTokensPerBlock) in tokens_ws[blockIdx.x * window ...].
template <typename T>
__global__ void __launch_bounds__(kThreads)
    WindowScoresMassKernel(const T* __restrict__ q, const T* __restrict__ k,
                           const int32_t* __restrict__ kv_start, const float2* __restrict__ stats,
                           float* __restrict__ tokens_ws, float* __restrict__ out, int64_t A,
                           int64_t H, int64_t Hk, int64_t N, int D, int64_t window, int64_t nw,
                           int64_t q_stride_b, int64_t q_stride_a, int64_t q_stride_h,
                           int64_t k_stride_b, int64_t k_stride_n, int64_t k_stride_h, float scale,
                           bool reduce_max, int64_t windows_per_block, int64_t wblocks) {
  __shared__ TileSmem sm;
  __shared__ float red[kWarps][kKT];
  __shared__ float s_smem[kMaxTokensPerBlock];
  __shared__ float win_acc[kMaxTokensPerBlock];  // windows_per_block <= kMaxTokensPerBlock
  int64_t bid = blockIdx.x;
  const int64_t wb = bid % wblocks;
  bid /= wblocks;
  const int64_t hk = bid % Hk, b = bid / Hk;
  const int64_t G = H / Hk;
  const int64_t w0 = wb * windows_per_block;
  const int64_t nwin = ts_min(windows_per_block, nw - w0);
  const int64_t key0 = w0 * window, key1 = (w0 + nwin) * window, ntok = key1 - key0;
  float* s = ntok <= kMaxTokensPerBlock ? s_smem
                                        : tokens_ws + static_cast<int64_t>(blockIdx.x) * window;
  const T* kh = k + b * k_stride_b + hk * k_stride_h;
  const int64_t ks = KvStart(kv_start, b, N, A);
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;

  for (int64_t w = tid; w < nwin; w += kThreads) win_acc[w] = 0.f;
  for (int64_t g = 0; g < G; ++g) {
    const int64_t h = hk * G + g;
    const T* qh = q + b * q_stride_b + h * q_stride_h;
    const float2* st = stats + (b * H + h) * A;
    for (int64_t t = tid; t < ntok; t += kThreads) s[t] = 0.f;  // ordered by TileDots' sync
    for (int64_t j0 = key0; j0 < key1; j0 += kKT) {
      float col[kRK] = {};
      float acc[kRQ][kRK];
      for (int64_t i0 = 0; i0 < A; i0 += kQT) {
        TileDots(qh, q_stride_a, i0, A, kh, k_stride_n, j0, key1, D, sm, acc);
#pragma unroll
        for (int r = 0; r < kRQ; ++r) {
          const int64_t i = i0 + warp + kWarps * r;
          if (i >= A) continue;
          const float2 mi = st[i];  // (m_i, 1/l_i)
#pragma unroll
          for (int cc = 0; cc < kRK; ++cc) {
            const int64_t j = j0 + lane + 32 * cc;
            if (j < key1 && window::key_visible(j, i, N, A, ks))
              col[cc] += expf(scale * acc[r][cc] - mi.x) * mi.y;
          }
        }
      }
      // Column sums over the 8 warps in a fixed order (deterministic, no atomics).
#pragma unroll
      for (int cc = 0; cc < kRK; ++cc) red[warp][lane + 32 * cc] = col[cc];
      __syncthreads();
      if (tid < kKT && j0 + tid < key1) {
        float v = 0.f;
#pragma unroll
        for (int w = 0; w < kWarps; ++w) v += red[w][tid];
        s[j0 + tid - key0] += v;
      }
      // red is rewritten only after the next TileDots' leading __syncthreads.
    }
    __syncthreads();  // s_h complete
    for (int64_t w = tid; w < nwin; w += kThreads)
      win_acc[w] += window::window_reduce(s + w * window, window, reduce_max);
    __syncthreads();  // readers of s done before the next head zeroes it
  }
  for (int64_t w = tid; w < nwin; w += kThreads)
    out[(b * Hk + hk) * nw + w0 + w] = win_acc[w] / static_cast<float>(G);
}

// Launch geometry and workspace layout, shared by the byte-count query and the launcher.
struct Plan {
  int64_t nw = 0, q_tiles = 0, tiles_per_chunk = 1, chunks = 0;
  int64_t windows_per_block = 1, wblocks = 0;
  bool tokens_in_smem = true;
  size_t part_off = 0, stats_off = 0, tokens_off = 0, bytes = 0;
};

inline Plan MakePlan(int64_t B, int64_t A, int64_t H, int64_t Hk, int64_t N, int64_t window) {
  Plan p;
  p.nw = window::num_windows(N, A, window);
  if (B <= 0 || A <= 0 || H <= 0 || Hk <= 0 || p.nw <= 0) return p;
  p.q_tiles = ceil_div<int64_t>(A, kQT);
  // Pass 1: split the keys so that the grid has at least ~kTargetBlocks blocks.
  const int64_t key_tiles = ceil_div<int64_t>(N, kKT);
  const int64_t rows1 = B * H * p.q_tiles;
  const int64_t want_chunks = ceil_div<int64_t>(kTargetBlocks, rows1);
  p.tiles_per_chunk = ts_clamp<int64_t>(ceil_div(key_tiles, want_chunks), 1, kMaxKeyTilesPerChunk);
  p.chunks = ceil_div(key_tiles, p.tiles_per_chunk);
  // Pass 2: windows per block, at least one key tile of work, at most the shared buffer.
  const int64_t cap = kMaxTokensPerBlock / window;  // 0 when one window exceeds the buffer
  if (cap == 0) {
    p.tokens_in_smem = false;
    p.windows_per_block = 1;
  } else {
    const int64_t want_blocks = ceil_div<int64_t>(kTargetBlocks, B * Hk);
    int64_t wpb = ceil_div(p.nw, want_blocks);
    wpb = ts_max(wpb, ceil_div<int64_t>(kKT, window));
    p.windows_per_block = ts_clamp<int64_t>(wpb, 1, cap);
  }
  p.wblocks = ceil_div(p.nw, p.windows_per_block);
  p.part_off = 0;
  p.stats_off = AlignUp(static_cast<size_t>(B * H * A * p.chunks) * sizeof(float2));
  p.tokens_off = p.stats_off + AlignUp(static_cast<size_t>(B * H * A) * sizeof(float2));
  const size_t tokens =
      p.tokens_in_smem ? 0 : static_cast<size_t>(B * Hk * p.wblocks * window) * sizeof(float);
  p.bytes = p.tokens_off + AlignUp(tokens);
  return p;
}

}  // namespace window_scores_detail

// Bytes of device workspace WindowScores needs (0 when there is nothing to compute).
// Roughly B*H*A*(chunks + 1)*8 bytes (chunks <= ceil(N/64)), plus B*Hk*N*4 bytes only when
// window > 1024.
inline size_t WindowScoresWorkspaceBytes(int64_t B, int64_t A, int64_t H, int64_t Hk, int64_t N,
                                         int64_t window) {
  if (window < 1) return 0;
  return window_scores_detail::MakePlan(B, A, H, Hk, N, window).bytes;
}

// Scores the nw = (N - A) // window review windows of every (b, KV head).
//   q         [B, A, H, D] T (the last A queries, RoPE applied), element strides
//             (q_stride_b, q_stride_a, q_stride_h), head dim contiguous
//   k         [B, N, Hk, D] T, element strides (k_stride_b, k_stride_n, k_stride_h), head dim
//             contiguous (an HF cache [B, Hk, N, D] is k_stride_n = D, k_stride_h = N*D)
//   kv_start  int32 [B] or nullptr; keys j < kv_start[b] are masked (clamped into [0, N - A])
//   out       float32 [B, Hk, nw] contiguous
//   workspace >= WindowScoresWorkspaceBytes(B, A, H, Hk, N, window) bytes, 256-byte aligned
// T = float, __half or __nv_bfloat16; math in fp32. Requires 1 <= A <= N, H % Hk == 0, D >= 1,
// window >= 1. B == 0 or nw == 0 launches nothing. Three launches on `stream`.
template <typename T>
cudaError_t WindowScores(const T* q, const T* k, const int32_t* kv_start, float* out,
                         void* workspace, size_t workspace_bytes, int64_t B, int64_t A, int64_t H,
                         int64_t Hk, int64_t N, int64_t D, int64_t window, int64_t q_stride_b,
                         int64_t q_stride_a, int64_t q_stride_h, int64_t k_stride_b,
                         int64_t k_stride_n, int64_t k_stride_h, float scale, bool reduce_max,
                         cudaStream_t stream) {
  namespace d = window_scores_detail;
  if (B < 0 || A < 1 || A > N || Hk < 1 || H < Hk || H % Hk != 0 || D < 1 || D > INT_MAX ||
      window < 1)
    return cudaErrorInvalidValue;
  const d::Plan p = d::MakePlan(B, A, H, Hk, N, window);
  if (B == 0 || p.nw == 0) return cudaSuccess;
  if (workspace == nullptr || workspace_bytes < p.bytes || !is_aligned(workspace, d::kAlign))
    return cudaErrorInvalidValue;
  const int64_t blocks1 = B * H * p.q_tiles * p.chunks;
  const int64_t rows = B * H * A;
  const int64_t blocks_c = ceil_div<int64_t>(rows, d::kThreads);
  const int64_t blocks2 = B * Hk * p.wblocks;
  if (blocks1 > INT_MAX || blocks_c > INT_MAX || blocks2 > INT_MAX)
    return cudaErrorInvalidConfiguration;

  char* ws = static_cast<char*>(workspace);
  float2* part = reinterpret_cast<float2*>(ws + p.part_off);
  float2* stats = reinterpret_cast<float2*>(ws + p.stats_off);
  float* tokens = p.tokens_in_smem ? nullptr : reinterpret_cast<float*>(ws + p.tokens_off);

  d::WindowScoresStatsKernel<T><<<static_cast<unsigned>(blocks1), d::kThreads, 0, stream>>>(
      q, k, kv_start, part, A, H, Hk, N, static_cast<int>(D), q_stride_b, q_stride_a, q_stride_h,
      k_stride_b, k_stride_n, k_stride_h, scale, p.q_tiles, p.chunks, p.tiles_per_chunk);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  d::RowStatsCombineKernel<T><<<static_cast<unsigned>(blocks_c), d::kThreads, 0, stream>>>(
      part, stats, rows, p.chunks);
  err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  d::WindowScoresMassKernel<T><<<static_cast<unsigned>(blocks2), d::kThreads, 0, stream>>>(
      q, k, kv_start, stats, tokens, out, A, H, Hk, N, static_cast<int>(D), window, p.nw,
      q_stride_b, q_stride_a, q_stride_h, k_stride_b, k_stride_n, k_stride_h, scale, reduce_max,
      p.windows_per_block, p.wblocks);
  return cudaGetLastError();
}

// The softmax scale when none is given: 1/sqrt(D), computed in double and rounded once.
inline float WindowScoresDefaultScale(int64_t D) {
  return static_cast<float>(1.0 / std::sqrt(static_cast<double>(D)));
}

// WindowScores<T> for T picked by `dt` (kFloat32 / kFloat16 / kBFloat16): the one entry point of
// the torch glue (csrc/cuda/kv_window.cu) and the simulator runner (csrc/sim/sim_windowkv.cu).
inline cudaError_t WindowScoresLaunch(DType dt, const void* q, const void* k,
                                      const int32_t* kv_start, float* out, void* workspace,
                                      size_t workspace_bytes, int64_t B, int64_t A, int64_t H,
                                      int64_t Hk, int64_t N, int64_t D, int64_t window,
                                      int64_t q_stride_b, int64_t q_stride_a, int64_t q_stride_h,
                                      int64_t k_stride_b, int64_t k_stride_n, int64_t k_stride_h,
                                      float scale, bool reduce_max, cudaStream_t stream) {
  return DispatchFloat(dt, [&](auto tag) {
    using T = typename decltype(tag)::type;
    return WindowScores<T>(static_cast<const T*>(q), static_cast<const T*>(k), kv_start, out,
                           workspace, workspace_bytes, B, A, H, Hk, N, D, window, q_stride_b,
                           q_stride_a, q_stride_h, k_stride_b, k_stride_n, k_stride_h, scale,
                           reduce_max, stream);
  });
}

#ifdef TASKSIEVE_COMPILE_CHECK
#define TASKSIEVE_INSTANTIATE_WINDOW_SCORES(T)                                                 \
  template cudaError_t WindowScores<T>(const T*, const T*, const int32_t*, float*, void*,      \
                                       size_t, int64_t, int64_t, int64_t, int64_t, int64_t,    \
                                       int64_t, int64_t, int64_t, int64_t, int64_t, int64_t,   \
                                       int64_t, int64_t, float, bool, cudaStream_t);
TASKSIEVE_INSTANTIATE_WINDOW_SCORES(float)
TASKSIEVE_INSTANTIATE_WINDOW_SCORES(__half)
TASKSIEVE_INSTANTIATE_WINDOW_SCORES(__nv_bfloat16)
#undef TASKSIEVE_INSTANTIATE_WINDOW_SCORES
#endif

}  // namespace tasksieve
