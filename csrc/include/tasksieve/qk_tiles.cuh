// Shared q.k tile machinery of the two-pass softmax-mass kernels (torch-free): WindowKV's
// window scorer (window_scores.cuh) and FlexPrefill's pattern estimator (flex_estimate.cuh).
//
// Tiling: a 256-thread block computes a 32-query x 64-key tile of dot products at a time,
// staging 64 head-dim elements of both operands through shared memory (fp32), 4 x 2
// accumulators per thread, so any head dim works with a fixed 25 KB of tiles.
// Row statistics: a softmax row is summarised as (m, l) = (max_j x[j], sum_j exp(x[j] - m));
// pass 1 keeps per-key-chunk partials, which RowStatsCombineKernel merges in a fixed order into
// (m, 1/l). (-inf, 0) is the empty partial.
//
// Everything here is a template, inline or constexpr: the header may be included by several
// .cu files (a non-template kernel would be defined once per translation unit and break the
// link).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "tasksieve/common.h"
#include "tasksieve/kv_rows.cuh"

namespace tasksieve {
namespace qk_tiles {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kRQ = 4;                    // queries per thread in a tile
constexpr int kRK = 2;                    // keys per thread in a tile
constexpr int kQT = kWarps * kRQ;         // 32 queries per tile (warp w: queries w, w+8, ...)
constexpr int kKT = 32 * kRK;             // 64 keys per tile (lane l: keys l, l+32)
constexpr int kDK = 64;                   // head-dim elements staged per step
constexpr int kMaxKeyTilesPerChunk = 16;  // pass-1 keys per block = up to 16 * 64
constexpr int64_t kTargetBlocks = 264;    // ~2 blocks per SM on an H100
constexpr size_t kAlign = 256;            // workspace section alignment

inline size_t AlignUp(size_t x) { return (x + kAlign - 1) / kAlign * kAlign; }

__device__ __forceinline__ float ToFloat(float x) { return x; }
__device__ __forceinline__ float ToFloat(__half x) { return __half2float(x); }
__device__ __forceinline__ float ToFloat(__nv_bfloat16 x) { return __bfloat162float(x); }

struct TileSmem {
  float q[kQT][kDK];
  float k[kKT][kDK + 1];  // +1: lane l reads row l -> distinct banks
};

// acc[r][c] = sum_{d < D} q[i0 + warp + kWarps*r][d] * key(j0 + lane + 32*c)[d], where rows
// i >= i_end or j >= j_end read as zeros. q points at the (b, head) slice (rows strided);
// krows(j) is a pointer to key j's D contiguous elements (ContigRows / PagedRows, kv_rows.cuh).
// Starts with __syncthreads, so callers may reuse shared memory written before the call once
// every thread has passed it.
template <typename T, class Rows>
__device__ __forceinline__ void TileDotsRows(const T* __restrict__ q, int64_t q_stride_row,
                                             int64_t i0, int64_t i_end, const Rows& krows,
                                             int64_t j0, int64_t j_end, int D, TileSmem& sm,
                                             float (&acc)[kRQ][kRK]) {
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
#pragma unroll
  for (int r = 0; r < kRQ; ++r)
#pragma unroll
    for (int c = 0; c < kRK; ++c) acc[r][c] = 0.f;
  for (int d0 = 0; d0 < D; d0 += kDK) {
    __syncthreads();  // the previous step's readers are done with sm
    for (int e = tid; e < kQT * kDK; e += kThreads) {
      const int row = e / kDK, d = e % kDK;
      const int64_t i = i0 + row;
      sm.q[row][d] = (i < i_end && d0 + d < D) ? ToFloat(q[i * q_stride_row + d0 + d]) : 0.f;
    }
    for (int e = tid; e < kKT * kDK; e += kThreads) {
      const int row = e / kDK, d = e % kDK;
      const int64_t j = j0 + row;
      sm.k[row][d] = (j < j_end && d0 + d < D) ? ToFloat(krows(j)[d0 + d]) : 0.f;
    }
    __syncthreads();
    const int dn = ts_min(kDK, D - d0);
#pragma unroll 4
    for (int d = 0; d < dn; ++d) {
      float kv[kRK];
#pragma unroll
      for (int c = 0; c < kRK; ++c) kv[c] = sm.k[lane + 32 * c][d];
#pragma unroll
      for (int r = 0; r < kRQ; ++r) {
        const float qv = sm.q[warp + kWarps * r][d];  // same address across the warp: broadcast
#pragma unroll
        for (int c = 0; c < kRK; ++c) acc[r][c] = fmaf(qv, kv[c], acc[r][c]);
      }
    }
  }
}

// The contiguous form: keys k[j * k_stride_row + d] of the (b, head) slice.
template <typename T>
__device__ __forceinline__ void TileDots(const T* __restrict__ q, int64_t q_stride_row,
                                         int64_t i0, int64_t i_end, const T* __restrict__ k,
                                         int64_t k_stride_row, int64_t j0, int64_t j_end, int D,
                                         TileSmem& sm, float (&acc)[kRQ][kRK]) {
  TileDotsRows(q, q_stride_row, i0, i_end, ContigRows<T>{k, k_stride_row}, j0, j_end, D, sm,
               acc);
}

// (m, l) <- merge of two softmax partials; (-inf, 0) is the empty partial.
__device__ __forceinline__ void MergeStats(float& m, float& l, float m2, float l2) {
  const float mn = fmaxf(m, m2);
  if (mn == ts_neg_inf()) return;  // both empty: avoid exp(-inf - -inf) = NaN
  l = l * expf(m - mn) + l2 * expf(m2 - mn);
  m = mn;
}

// stats[row] = (m, 1/l), merging the chunk partials part[row*chunks + c] in order of c.
// (Templated only so that the kernel has vague linkage: this header may be included by several
// .cu files. T is the launcher's element type and does not enter the math.)
template <typename T>
__global__ void RowStatsCombineKernel(const float2* __restrict__ part,
                                      float2* __restrict__ stats, int64_t rows,
                                      int64_t chunks) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (row >= rows) return;
  float m = ts_neg_inf(), l = 0.f;
  for (int64_t c = 0; c < chunks; ++c) {
    const float2 p = part[row * chunks + c];
    MergeStats(m, l, p.x, p.y);
  }
  stats[row] = make_float2(m, l > 0.f ? 1.f / l : 0.f);
}

#ifdef TASKSIEVE_COMPILE_CHECK
template __global__ void RowStatsCombineKernel<float>(const float2*, float2*, int64_t, int64_t);
#endif

}  // namespace qk_tiles
}  // namespace tasksieve
