// Window-granular KV compaction for WindowKV (torch-free, dtype-agnostic: copies bytes).
//
//   GatherWindows(descs, num, idx, B, Hk, N, keep, window, tail, stream)        -> cudaError_t
//   GatherWindowsInplace(descs, num, idx, B, Hk, N, keep, window, tail, stream) -> cudaError_t
//   MakeGatherDesc(src, src strides, dst, dst strides, D, elem_bytes) -> GatherDesc
//                  (element strides -> byte strides: how the glue and the simulator runner
//                  describe a tensor of the list)
//
// Math, for every tensor t of the list, b < B, h < Hk, with L = keep*window + tail:
//   dst_t[b, h, p*window + u]    = src_t[b, h, idx[b, h, p]*window + u]   p < keep, u < window
//   dst_t[b, h, keep*window + u] = src_t[b, h, N - tail + u]              u < tail
// (row mapping: window::gather_source_row). A window index v is valid iff
// window::window_index_valid(v, window, N, tail); an invalid window is written as zeros, so no
// access is ever out of bounds (the device cannot raise without a host sync).
//
// The descriptors of up to kGatherMaxDescs tensors travel by value as one __grid_constant__
// kernel parameter (~2.6 KB < the 4 KB parameter limit), so a layer group's K and V lists are
// compacted in one launch; longer lists are chunked. Each tensor is copied with the widest unit
// (16, 8, 4, 2 or 1 bytes) that its pointers, byte strides and row size allow.
#pragma once

#include <cuda_runtime.h>

#include <climits>
#include <cstdint>

#include "tasksieve/common.h"
#include "tasksieve/window_index.h"

namespace tasksieve {

// One tensor of the list: [B, Hk, rows, row_bytes] with byte strides (any sign); rows are
// row_bytes contiguous bytes (the head dim). For the in-place variant only src and the src_*
// strides are used (dst == src).
struct GatherDesc {
  const void* src = nullptr;
  void* dst = nullptr;
  int64_t src_stride_b = 0, src_stride_h = 0, src_stride_n = 0;  // bytes
  int64_t dst_stride_b = 0, dst_stride_h = 0, dst_stride_n = 0;  // bytes
  int64_t row_bytes = 0;
  int32_t unit_bytes = 1;  // set by the launchers: widest aligned copy unit
};

// The descriptor of one tensor [B, Hk, N, D] with element strides (src_stride_b, _h, _n), head
// dim contiguous, elements of elem_bytes bytes, and of its output [B, Hk, L, D] with element
// strides (dst_stride_b, _h, _n). In place the dst fields are ignored (the glue passes src's).
inline GatherDesc MakeGatherDesc(const void* src, int64_t src_stride_b, int64_t src_stride_h,
                                 int64_t src_stride_n, void* dst, int64_t dst_stride_b,
                                 int64_t dst_stride_h, int64_t dst_stride_n, int64_t D,
                                 int64_t elem_bytes) {
  GatherDesc g;
  g.src = src;
  g.src_stride_b = src_stride_b * elem_bytes;
  g.src_stride_h = src_stride_h * elem_bytes;
  g.src_stride_n = src_stride_n * elem_bytes;
  g.row_bytes = D * elem_bytes;
  g.dst = dst;
  g.dst_stride_b = dst_stride_b * elem_bytes;
  g.dst_stride_h = dst_stride_h * elem_bytes;
  g.dst_stride_n = dst_stride_n * elem_bytes;
  return g;
}

constexpr int kGatherMaxDescs = 32;

namespace gather_windows_detail {

constexpr int kThreads = 256;
constexpr int64_t kMaxRowsPerBlock = 1024;
constexpr int64_t kBytesPerBlock = 16384;  // out-of-place: target bytes per block and tensor
constexpr int kInplaceUnits = 4;           // in-place: units held in registers per thread

struct DescBatch {
  GatherDesc d[kGatherMaxDescs];
  int32_t count;
};

// Calls f(V{}) with V the copy unit of `unit_bytes` bytes (uniform over the block).
template <typename F>
__device__ __forceinline__ void WithUnit(int32_t unit_bytes, F&& f) {
  switch (unit_bytes) {
    case 16: f(uint4{}); break;
    case 8: f(uint2{}); break;
    case 4: f(uint32_t{}); break;
    case 2: f(uint16_t{}); break;
    default: f(uint8_t{}); break;
  }
}

inline bool FitsUnit(const GatherDesc& g, int64_t u, bool inplace) {
  bool ok = g.row_bytes % u == 0 && is_aligned(g.src, static_cast<size_t>(u)) &&
            g.src_stride_b % u == 0 && g.src_stride_h % u == 0 && g.src_stride_n % u == 0;
  if (!inplace)
    ok = ok && is_aligned(g.dst, static_cast<size_t>(u)) && g.dst_stride_b % u == 0 &&
         g.dst_stride_h % u == 0 && g.dst_stride_n % u == 0;
  return ok;
}

inline int32_t UnitBytes(const GatherDesc& g, bool inplace) {
  for (int32_t u = 16; u > 1; u /= 2)
    if (FitsUnit(g, u, inplace)) return u;
  return 1;
}

// Copies rows [r0, r0 + nrows) of one (tensor, b, h) slice; src_row[rr] is the source row of
// output row r0 + rr, or -1 for zeros. Units are V-sized; consecutive threads take consecutive
// units of a row, so warps read and write contiguous bytes.
template <typename V>
__device__ __forceinline__ void CopyRows(const char* __restrict__ src, int64_t src_stride_n,
                                         char* __restrict__ dst, int64_t dst_stride_n,
                                         int64_t row_bytes, const int64_t* src_row, int64_t r0,
                                         int64_t nrows) {
  const int64_t upr = row_bytes / static_cast<int64_t>(sizeof(V));
  const int64_t total = nrows * upr;
  for (int64_t e = threadIdx.x; e < total; e += kThreads) {
    const int64_t rr = e / upr, u = e % upr;
    const int64_t s = src_row[rr];
    V v{};
    if (s >= 0) v = *reinterpret_cast<const V*>(src + s * src_stride_n + u * sizeof(V));
    *reinterpret_cast<V*>(dst + (r0 + rr) * dst_stride_n + u * sizeof(V)) = v;
  }
}

// Out of place, one block per (tensor t, b, h, tile of rows_per_block output rows).
// A template (on its block size, always kThreads) so that several .cu files can include
// this header without defining the kernel twice.
template <int Threads>
__global__ void __launch_bounds__(Threads)
    GatherWindowsKernel(const __grid_constant__ DescBatch batch, const int32_t* __restrict__ idx,
                        int64_t B, int64_t Hk, int64_t N, int64_t keep, int64_t window,
                        int64_t tail, int64_t rows_per_block, int64_t row_tiles) {
  __shared__ int64_t src_row[kMaxRowsPerBlock];
  int64_t bid = blockIdx.x;
  const int64_t tile = bid % row_tiles;
  bid /= row_tiles;
  const int64_t h = bid % Hk;
  bid /= Hk;
  const int64_t b = bid % B, t = bid / B;
  if (t >= batch.count) return;  // uniform over the block
  const GatherDesc& g = batch.d[t];
  const int64_t L = keep * window + tail;
  const int64_t r0 = tile * rows_per_block;
  const int64_t nrows = ts_min(rows_per_block, L - r0);
  const int32_t* idx_row = idx + (b * Hk + h) * keep;
  for (int64_t rr = threadIdx.x; rr < nrows; rr += kThreads)
    src_row[rr] = window::gather_source_row(r0 + rr, idx_row, keep, window, N, tail);
  __syncthreads();
  const char* src = static_cast<const char*>(g.src) + b * g.src_stride_b + h * g.src_stride_h;
  char* dst = static_cast<char*>(g.dst) + b * g.dst_stride_b + h * g.dst_stride_h;
  WithUnit(g.unit_bytes, [&](auto unit) {
    CopyRows<decltype(unit)>(src, g.src_stride_n, dst, g.dst_stride_n, g.row_bytes, src_row, r0,
                             nrows);
  });
}

// In place: moves rows [src_row0, src_row0 + nrows) to [dst_row0, ...) of one slice with
// dst_row0 < src_row0 (src_row0 < 0: write zeros). Forward chunks of kThreads*kInplaceUnits
// units: the whole chunk is loaded into registers, then __syncthreads, then stored, then
// __syncthreads. A store of chunk c lands on rows < the rows chunk c+1 reads (dst < src and rows
// do not overlap), so this is a correct memmove. Every thread of the block must call it.
template <typename V>
__device__ __forceinline__ void MoveRows(char* base, int64_t stride_n, int64_t row_bytes,
                                         int64_t src_row0, int64_t dst_row0, int64_t nrows) {
  const int64_t upr = row_bytes / static_cast<int64_t>(sizeof(V));
  const int64_t total = nrows * upr;
  for (int64_t e0 = 0; e0 < total; e0 += static_cast<int64_t>(kThreads) * kInplaceUnits) {
    V v[kInplaceUnits];
#pragma unroll
    for (int k = 0; k < kInplaceUnits; ++k) {
      const int64_t e = e0 + k * kThreads + threadIdx.x;
      v[k] = V{};
      if (src_row0 >= 0 && e < total)
        v[k] = *reinterpret_cast<const V*>(base + (src_row0 + e / upr) * stride_n +
                                           (e % upr) * sizeof(V));
    }
    __syncthreads();
#pragma unroll
    for (int k = 0; k < kInplaceUnits; ++k) {
      const int64_t e = e0 + k * kThreads + threadIdx.x;
      if (e < total)
        *reinterpret_cast<V*>(base + (dst_row0 + e / upr) * stride_n + (e % upr) * sizeof(V)) =
            v[k];
    }
    __syncthreads();
  }
}

// Walks output windows p = 0..keep-1 in ascending order, then the tail. Requires idx ascending
// and distinct per row (checked by the CPU op, not here), so that every window moves towards
// the front and never onto a source still to be read. v == p moves nothing.
template <typename V>
__device__ __forceinline__ void CompactSlice(char* base, int64_t stride_n, int64_t row_bytes,
                                             const int32_t* idx_row, int64_t N, int64_t keep,
                                             int64_t window, int64_t tail) {
  for (int64_t p = 0; p < keep; ++p) {
    const int64_t v = idx_row[p];  // same address for the whole block: one broadcast load
    if (v == p) continue;           // uniform
    const int64_t s = window::window_index_valid(v, window, N, tail) ? v * window : -1;
    MoveRows<V>(base, stride_n, row_bytes, s, p * window, window);
  }
  if (N - tail != keep * window)
    MoveRows<V>(base, stride_n, row_bytes, N - tail, keep * window, tail);
}

// In place, one block per (tensor t, b, h).
// A template (on its block size, always kThreads) so that several .cu files can include
// this header without defining the kernel twice.
template <int Threads>
__global__ void __launch_bounds__(Threads)
    GatherWindowsInplaceKernel(const __grid_constant__ DescBatch batch,
                               const int32_t* __restrict__ idx, int64_t B, int64_t Hk, int64_t N,
                               int64_t keep, int64_t window, int64_t tail) {
  int64_t bid = blockIdx.x;
  const int64_t h = bid % Hk;
  bid /= Hk;
  const int64_t b = bid % B, t = bid / B;
  if (t >= batch.count) return;
  const GatherDesc& g = batch.d[t];
  char* base =
      static_cast<char*>(const_cast<void*>(g.src)) + b * g.src_stride_b + h * g.src_stride_h;
  const int32_t* idx_row = idx + (b * Hk + h) * keep;
  WithUnit(g.unit_bytes, [&](auto unit) {
    CompactSlice<decltype(unit)>(base, g.src_stride_n, g.row_bytes, idx_row, N, keep, window,
                                 tail);
  });
}

inline bool ValidArgs(const GatherDesc* descs, int64_t num, const int32_t* idx, int64_t B,
                      int64_t Hk, int64_t N, int64_t keep, int64_t window, int64_t tail) {
  if (num < 0 || (num > 0 && descs == nullptr) || B < 0 || Hk < 0 || N < 0 || keep < 0 ||
      window < 1 || tail < 0 || tail > N)
    return false;
  if (keep > 0 && B > 0 && Hk > 0 && idx == nullptr) return false;
  for (int64_t i = 0; i < num; ++i)
    if (descs[i].row_bytes < 0) return false;
  return true;
}

}  // namespace gather_windows_detail

// Out of place. For each of the `num` descriptors:
//   src  [B, Hk, N, row_bytes]                 any byte strides
//   dst  [B, Hk, keep*window + tail, row_bytes] any byte strides (torch: contiguous)
//   idx  int32 [B, Hk, keep] contiguous, shared by all tensors
// Requires window >= 1, 0 <= tail <= N. Duplicate or unsorted idx are fine here. One launch per
// kGatherMaxDescs tensors; nothing is launched when there is nothing to copy.
inline cudaError_t GatherWindows(const GatherDesc* descs, int64_t num, const int32_t* idx,
                                 int64_t B, int64_t Hk, int64_t N, int64_t keep, int64_t window,
                                 int64_t tail, cudaStream_t stream) {
  namespace d = gather_windows_detail;
  if (!d::ValidArgs(descs, num, idx, B, Hk, N, keep, window, tail)) return cudaErrorInvalidValue;
  const int64_t L = keep * window + tail;
  if (num == 0 || B == 0 || Hk == 0 || L == 0) return cudaSuccess;
  for (int64_t start = 0; start < num; start += kGatherMaxDescs) {
    d::DescBatch batch{};
    batch.count = static_cast<int32_t>(ts_min<int64_t>(kGatherMaxDescs, num - start));
    int64_t max_row = 1;
    for (int i = 0; i < batch.count; ++i) {
      batch.d[i] = descs[start + i];
      batch.d[i].unit_bytes = d::UnitBytes(batch.d[i], /*inplace=*/false);
      max_row = ts_max(max_row, batch.d[i].row_bytes);
    }
    const int64_t rows_per_block =
        ts_clamp<int64_t>(d::kBytesPerBlock / max_row, 1, d::kMaxRowsPerBlock);
    const int64_t row_tiles = ceil_div(L, rows_per_block);
    const int64_t blocks = batch.count * B * Hk * row_tiles;
    if (blocks > INT_MAX) return cudaErrorInvalidConfiguration;
    d::GatherWindowsKernel<d::kThreads><<<static_cast<unsigned>(blocks), d::kThreads, 0, stream>>>(
        batch, idx, B, Hk, N, keep, window, tail, rows_per_block, row_tiles);
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

// In place: compacts each src tensor [B, Hk, N, row_bytes] into its own first
// keep*window + tail rows (dst fields ignored). Requires keep*window + tail <= N, idx ascending
// and distinct per row (not checked here), and tensors of the list that do not share memory.
inline cudaError_t GatherWindowsInplace(const GatherDesc* descs, int64_t num, const int32_t* idx,
                                        int64_t B, int64_t Hk, int64_t N, int64_t keep,
                                        int64_t window, int64_t tail, cudaStream_t stream) {
  namespace d = gather_windows_detail;
  if (!d::ValidArgs(descs, num, idx, B, Hk, N, keep, window, tail) || keep * window + tail > N)
    return cudaErrorInvalidValue;
  if (num == 0 || B == 0 || Hk == 0 || keep * window + tail == 0) return cudaSuccess;
  for (int64_t start = 0; start < num; start += kGatherMaxDescs) {
    d::DescBatch batch{};
    batch.count = static_cast<int32_t>(ts_min<int64_t>(kGatherMaxDescs, num - start));
    for (int i = 0; i < batch.count; ++i) {
      batch.d[i] = descs[start + i];
      batch.d[i].unit_bytes = d::UnitBytes(batch.d[i], /*inplace=*/true);
    }
    const int64_t blocks = batch.count * B * Hk;
    if (blocks > INT_MAX) return cudaErrorInvalidConfiguration;
    d::GatherWindowsInplaceKernel<d::kThreads><<<static_cast<unsigned>(blocks), d::kThreads, 0, stream>>>(
        batch, idx, B, Hk, N, keep, window, tail);
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

}  // namespace tasksieve
