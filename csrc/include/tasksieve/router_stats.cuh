// router_stats_update kernels (torch-free): fp64 router statistics for UNCURL's expert
// clustering, accumulated in place on the device.
//
//   RouterStats<T, Id>(logits, ..., topk_ids, k, counts, logit_sum, logit_gram, coselect,
//                      workspace, stream)                             -> cudaError_t
//   RouterStatsWorkspaceBytes(Tn, E)                                  -> size_t
//   RouterStatsLaunch(DType, ids64, ...): the same with the logit and id types as runtime tags
//   (what the torch glue csrc/cuda/router_stats.cu and the simulator runner
//   csrc/sim/sim_premoe.cu call)
//
// Contract: router_stats_update in csrc/ops.cpp; chunking and workspace layout in
// router_stats_index.h (shared with the CPU impl). T is float, __half or __nv_bfloat16, Id is
// int32_t or int64_t; every logit is converted to fp64 before any product or sum.
//
// Two launches, no floating-point atomics (the functional simulator has no atom.add.f64) and a
// bitwise deterministic result:
//   1. partial: grid (E/32 column tiles, E/32 row tiles, token chunks). A block owns the 32x32
//      tile (i0.., j0..) of logit_gram and coselect for one chunk of tokens: per pass it stages
//      32 tokens' logits of its row and column experts (fp64) and their selection multiplicities
//      S[t][e] = #{j : topk_ids[t, j] == e} in shared memory; each thread sums 4 outputs over
//      the chunk's tokens in token order. Diagonal tiles also sum logit_sum and counts. The
//      chunk's sums go to its slice of the workspace (every element written, no initialisation).
//   2. reduce: every accumulator element += the sum of its chunk slices, chunks in order.
// Ids outside [0, E) match no expert column and are skipped (never an out-of-bounds access);
// the CPU op raises on them instead. A duplicate id in a row counts once per occurrence:
// S[t][e] can exceed 1, and coselect += S^T S.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <climits>
#include <cstddef>
#include <cstdint>

#include "tasksieve/common.h"
#include "tasksieve/dtype.cuh"
#include "tasksieve/router_stats_index.h"

namespace tasksieve {
namespace router_stats_detail {

constexpr int kMaxExperts = 1024;
constexpr int kTile = 32;                  // experts per tile side, tokens per pass
constexpr int kRows = 8;                   // thread rows: a thread owns kTile / kRows outputs
constexpr int kThreads = kTile * kRows;    // 256
constexpr int kPerThread = kTile / kRows;  // 4

__device__ __forceinline__ double LoadF64(const float* p) { return static_cast<double>(*p); }
__device__ __forceinline__ double LoadF64(const __half* p) {
  return static_cast<double>(__half2float(*p));
}
__device__ __forceinline__ double LoadF64(const __nv_bfloat16* p) {
  return static_cast<double>(__bfloat162float(*p));
}

// Block (bx, by, bz): column tile j0 = bx*32, row tile i0 = by*32, chunk bz. Thread (tx, ty) =
// (threadIdx.x % 32, threadIdx.x / 32) owns rows i0 + ty + 8*r (r < 4) of column j0 + tx.
template <typename T, typename Id>
__global__ void __launch_bounds__(kThreads)
    RouterStatsPartialKernel(const T* __restrict__ logits, int64_t Tn, int E, int64_t s0,
                             int64_t s1, const Id* __restrict__ ids, int k,
                             double* __restrict__ partial) {
  __shared__ double zi[kTile][kTile + 1];  // [token][row expert]
  __shared__ double zj[kTile][kTile + 1];  // [token][column expert]
  __shared__ int si[kTile][kTile + 1];     // selection multiplicities, same layout
  __shared__ int sj[kTile][kTile + 1];
  const int tx = threadIdx.x % kTile, ty = threadIdx.x / kTile;
  const int j0 = blockIdx.x * kTile, i0 = blockIdx.y * kTile;
  const int64_t chunk = blockIdx.z;
  const bool diag = blockIdx.x == blockIdx.y;
  const int64_t t_begin = moe::rs_chunk_begin(chunk, Tn, E);
  const int64_t t_end = moe::rs_chunk_end(chunk, Tn, E);

  double gram[kPerThread];
  long long cosel[kPerThread];
#pragma unroll
  for (int r = 0; r < kPerThread; ++r) {
    gram[r] = 0.0;
    cosel[r] = 0;
  }
  double lsum = 0.0;  // diagonal tiles, ty == 0: logit_sum and counts of column j0 + tx
  long long cnt = 0;

  for (int64_t t0 = t_begin; t0 < t_end; t0 += kTile) {
    const int n = static_cast<int>(t_end - t0 < kTile ? t_end - t0 : kTile);
    // Stage: element (tt, e) of the four tiles, 4 per thread; zeros past the chunk or past E.
    for (int idx = threadIdx.x; idx < kTile * kTile; idx += kThreads) {
      const int tt = idx / kTile, e = idx % kTile;
      const int ei = i0 + e, ej = j0 + e;
      double vi = 0.0, vj = 0.0;
      int ci = 0, cj = 0;
      if (tt < n) {
        const int64_t t = t0 + tt;
        const T* row = logits + t * s0;
        if (ei < E) vi = LoadF64(row + ei * s1);
        if (ej < E) vj = LoadF64(row + ej * s1);
        const Id* sel = ids + t * k;
        for (int j = 0; j < k; ++j) {
          const int64_t id = static_cast<int64_t>(sel[j]);
          // an id outside [0, E) equals no column below E: skipped
          ci += (ei < E && id == ei) ? 1 : 0;
          cj += (ej < E && id == ej) ? 1 : 0;
        }
      }
      zi[tt][e] = vi;
      zj[tt][e] = vj;
      si[tt][e] = ci;
      sj[tt][e] = cj;
    }
    __syncthreads();
    for (int tt = 0; tt < n; ++tt) {  // token order
      const double b = zj[tt][tx];
      const long long cb = sj[tt][tx];
#pragma unroll
      for (int r = 0; r < kPerThread; ++r) {
        const int row = ty + kRows * r;
        gram[r] += zi[tt][row] * b;
        cosel[r] += static_cast<long long>(si[tt][row]) * cb;
      }
      if (diag && ty == 0) {
        lsum += b;
        cnt += cb;
      }
    }
    __syncthreads();  // the tiles are restaged by the next pass
  }

  double* slice = partial + chunk * moe::rs_slice_elems(E);
  const int j = j0 + tx;
  if (j >= E) return;
#pragma unroll
  for (int r = 0; r < kPerThread; ++r) {
    const int i = i0 + ty + kRows * r;
    if (i < E) {
      slice[moe::rs_gram_off(E) + static_cast<int64_t>(i) * E + j] = gram[r];
      slice[moe::rs_cosel_off(E) + static_cast<int64_t>(i) * E + j] = static_cast<double>(cosel[r]);
    }
  }
  if (diag && ty == 0) {
    slice[moe::rs_sum_off(E) + j] = lsum;
    slice[moe::rs_count_off(E) + j] = static_cast<double>(cnt);
  }
}

// Every element x of the slice layout: its accumulator += sum over chunks of partial[c][x],
// chunks in order. A template (on its block size) so that several .cu files can include this
// header.
template <int kReduceThreads>
__global__ void __launch_bounds__(kReduceThreads)
    RouterStatsReduceKernel(const double* __restrict__ partial, int64_t chunks, int E,
                            double* __restrict__ counts, double* __restrict__ logit_sum,
                            double* __restrict__ logit_gram, double* __restrict__ coselect) {
  const int64_t n = moe::rs_slice_elems(E);
  const int64_t x = static_cast<int64_t>(blockIdx.x) * kReduceThreads + threadIdx.x;
  if (x >= n) return;
  double s = 0.0;
  for (int64_t c = 0; c < chunks; ++c) s += partial[c * n + x];
  if (x < moe::rs_cosel_off(E)) {
    logit_gram[x - moe::rs_gram_off(E)] += s;
  } else if (x < moe::rs_sum_off(E)) {
    coselect[x - moe::rs_cosel_off(E)] += s;
  } else if (x < moe::rs_count_off(E)) {
    logit_sum[x - moe::rs_sum_off(E)] += s;
  } else {
    counts[x - moe::rs_count_off(E)] += s;
  }
}

}  // namespace router_stats_detail

// Scratch of RouterStats: fp64 [chunks, rs_slice_elems(E)], no initialisation needed.
inline size_t RouterStatsWorkspaceBytes(int64_t Tn, int64_t E) {
  return moe::rs_workspace_bytes(Tn, E);
}

// router_stats_update (csrc/ops.cpp):
//   logits     [Tn, E] with strides (s0, s1), in elements
//   topk_ids   [Tn, k] contiguous; ids outside [0, E) are skipped
//   counts, logit_sum fp64 [E]; logit_gram, coselect fp64 [E, E]; all contiguous, += in place
// 1 <= k, 1 <= E <= 1024. workspace: RouterStatsWorkspaceBytes(Tn, E) bytes. Tn = 0: nothing.
template <typename T, typename Id>
cudaError_t RouterStats(const T* logits, int64_t Tn, int64_t E, int64_t s0, int64_t s1,
                        const Id* topk_ids, int64_t k, double* counts, double* logit_sum,
                        double* logit_gram, double* coselect, void* workspace,
                        size_t workspace_bytes, cudaStream_t stream) {
  namespace d = router_stats_detail;
  if (Tn < 0 || E < 1 || E > d::kMaxExperts || k < 1 || k > INT_MAX)
    return cudaErrorInvalidValue;
  if (Tn == 0) return cudaSuccess;
  if (workspace == nullptr || workspace_bytes < RouterStatsWorkspaceBytes(Tn, E))
    return cudaErrorInvalidValue;
  const int64_t chunks = moe::rs_num_chunks(Tn, E);
  const unsigned tiles = static_cast<unsigned>(ceil_div<int64_t>(E, d::kTile));
  double* partial = static_cast<double*>(workspace);
  const dim3 grid(tiles, tiles, static_cast<unsigned>(chunks));
  d::RouterStatsPartialKernel<T, Id><<<grid, d::kThreads, 0, stream>>>(
      logits, Tn, static_cast<int>(E), s0, s1, topk_ids, static_cast<int>(k), partial);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  constexpr int kReduce = 256;
  const int64_t blocks = ceil_div<int64_t>(moe::rs_slice_elems(E), kReduce);
  d::RouterStatsReduceKernel<kReduce><<<static_cast<unsigned>(blocks), kReduce, 0, stream>>>(
      partial, chunks, static_cast<int>(E), counts, logit_sum, logit_gram, coselect);
  return cudaGetLastError();
}

// ---- Entry point of the torch glue (csrc/cuda/router_stats.cu) and the simulator runner
// (csrc/sim/sim_premoe.cu): the dtype dispatch lives here, so both reach the same variants.

// RouterStats for logits of dtype `dt` (fp32, fp16 or bf16) and int64 (ids64) or int32 ids.
inline cudaError_t RouterStatsLaunch(DType dt, bool ids64, const void* logits, int64_t Tn,
                                     int64_t E, int64_t s0, int64_t s1, const void* topk_ids,
                                     int64_t k, double* counts, double* logit_sum,
                                     double* logit_gram, double* coselect, void* workspace,
                                     size_t workspace_bytes, cudaStream_t stream) {
  return DispatchFloat(dt, [&](auto tag) {
    using T = typename decltype(tag)::type;
    const T* z = static_cast<const T*>(logits);
    return ids64 ? RouterStats<T, int64_t>(z, Tn, E, s0, s1,
                                           static_cast<const int64_t*>(topk_ids), k, counts,
                                           logit_sum, logit_gram, coselect, workspace,
                                           workspace_bytes, stream)
                 : RouterStats<T, int32_t>(z, Tn, E, s0, s1,
                                           static_cast<const int32_t*>(topk_ids), k, counts,
                                           logit_sum, logit_gram, coselect, workspace,
                                           workspace_bytes, stream);
  });
}

#ifdef TASKSIEVE_COMPILE_CHECK
#define TASKSIEVE_INSTANTIATE_ROUTER_STATS(T, Id)                                              \
  template cudaError_t RouterStats<T, Id>(const T*, int64_t, int64_t, int64_t, int64_t,        \
                                          const Id*, int64_t, double*, double*, double*,       \
                                          double*, void*, size_t, cudaStream_t);
TASKSIEVE_INSTANTIATE_ROUTER_STATS(float, int32_t)
TASKSIEVE_INSTANTIATE_ROUTER_STATS(float, int64_t)
TASKSIEVE_INSTANTIATE_ROUTER_STATS(__half, int32_t)
TASKSIEVE_INSTANTIATE_ROUTER_STATS(__half, int64_t)
TASKSIEVE_INSTANTIATE_ROUTER_STATS(__nv_bfloat16, int32_t)
TASKSIEVE_INSTANTIATE_ROUTER_STATS(__nv_bfloat16, int64_t)
#undef TASKSIEVE_INSTANTIATE_ROUTER_STATS
#endif

}  // namespace tasksieve
