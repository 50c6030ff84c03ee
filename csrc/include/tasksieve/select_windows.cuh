// Device top-k of windows for WindowKV (torch-free).
//
//   SelectWindows(scores, out, B, Hk, nw, kk, share, stream) -> cudaError_t
//
// Math, per row (b, hk) (share=False) or per batch b (share=True):
//   score[m] = scores[b, hk, m]                                  (share=False)
//            = window::shared_score(scores[b, :, m])  = mean_hk   (share=True)
//   rank order = window::rank_before: higher score first, NaN as -inf, ties -> lower index.
//   out[b, hk, :] = the kk first windows in rank order, sorted ascending by index.
// Algorithm (one block per row, any nw < 2^31, no scratch memory): every window m has the
// distinct 64-bit key window::rank_key(score[m], m), increasing in rank order. An MSB-first
// radix select (8 passes of 8 bits, a 256-bin shared histogram each) finds the key T of the
// kk-th ranked window; exactly kk windows have key <= T. A block-wide ballot scan over m in
// ascending order then writes them in position order. Scores are re-read each pass (nw <= ~16k
// in practice, so a row is a few 64 KB reads that stay in L1/L2).
#pragma once

#include <cuda_runtime.h>

#include <climits>
#include <cstdint>

#include "tasksieve/common.h"
#include "tasksieve/window_index.h"

namespace tasksieve {
namespace select_windows_detail {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

__device__ __forceinline__ uint64_t Key(const float* __restrict__ src, int64_t m, int64_t nw,
                                        int64_t Hk, bool share) {
  const float v = share ? window::shared_score(src + m, nw, Hk) : src[m];
  return window::rank_key(v, m);
}

// One block per row; see the header comment. scores [B, Hk, nw] fp32 contiguous; out [B, Hk, kk]
// int32 contiguous; 1 <= kk <= nw.
// A template (on its block size, always kThreads) so that several .cu files can include
// this header without defining the kernel twice.
template <int Threads>
__global__ void __launch_bounds__(Threads)
    SelectWindowsKernel(const float* __restrict__ scores, int32_t* __restrict__ out, int64_t Hk,
                        int64_t nw, int64_t kk, bool share) {
  __shared__ unsigned int hist[256];
  __shared__ uint64_t s_prefix;
  __shared__ int64_t s_need;
  __shared__ int warp_count[kWarps];
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int64_t row = blockIdx.x;  // share: b; else b*Hk + hk
  const float* src = share ? scores + row * Hk * nw : scores + row * nw;

  uint64_t threshold = ~0ull;  // kk == nw: every window
  if (kk < nw) {
    uint64_t prefix = 0, mask = 0;
    int64_t need = kk;  // 1-based rank of the wanted key among keys matching `prefix`
    for (int shift = 56; shift >= 0; shift -= 8) {
      for (int i = tid; i < 256; i += kThreads) hist[i] = 0u;
      __syncthreads();
      for (int64_t m = tid; m < nw; m += kThreads) {
        const uint64_t key = Key(src, m, nw, Hk, share);
        if ((key & mask) == prefix) atomicAdd(&hist[(key >> shift) & 0xFFu], 1u);
      }
      __syncthreads();
      if (tid == 0) {
        int64_t below = 0;
        for (int bin = 0; bin < 256; ++bin) {
          if (below + hist[bin] >= need) {
            s_prefix = prefix | (static_cast<uint64_t>(bin) << shift);
            s_need = need - below;
            break;
          }
          below += hist[bin];
        }
      }
      __syncthreads();
      prefix = s_prefix;  // s_* are rewritten only after two more barriers
      need = s_need;
      mask |= 0xFFull << shift;
    }
    threshold = prefix;
  }

  // Stream compaction in index order: exactly kk windows satisfy key <= threshold.
  const int64_t out_rows = share ? Hk : 1;
  int32_t* dst = out + row * out_rows * kk;
  int64_t base = 0;
  for (int64_t m0 = 0; m0 < nw && base < kk; m0 += kThreads) {  // uniform loop
    const int64_t m = m0 + tid;
    const bool flag = m < nw && Key(src, m, nw, Hk, share) <= threshold;
    const unsigned ballot = __ballot_sync(0xffffffffu, flag);
    if (lane == 0) warp_count[warp] = __popc(ballot);
    __syncthreads();
    int64_t pos = base + __popc(ballot & ((1u << lane) - 1u));
    int64_t total = 0;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) {
      if (w < warp) pos += warp_count[w];
      total += warp_count[w];
    }
    if (flag && pos < kk)
      for (int64_t r = 0; r < out_rows; ++r) dst[r * kk + pos] = static_cast<int32_t>(m);
    base += total;
    __syncthreads();  // warp_count is rewritten next iteration
  }
}

}  // namespace select_windows_detail

// Top-kk windows per row, sorted by position.
//   scores  float32 [B, Hk, nw] contiguous (NaN ranks as -inf)
//   out     int32   [B, Hk, kk] contiguous; kk = min(keep, nw) computed by the caller
//   share   false: each (b, hk) row on its own; true: rank by the mean over hk, same row for
//           every head
// Ties go to the lower window index. kk == 0, B == 0 or Hk == 0 launches nothing.
inline cudaError_t SelectWindows(const float* scores, int32_t* out, int64_t B, int64_t Hk,
                                 int64_t nw, int64_t kk, bool share, cudaStream_t stream) {
  namespace d = select_windows_detail;
  if (B < 0 || Hk < 0 || nw < 0 || kk < 0 || kk > nw || nw > INT_MAX)
    return cudaErrorInvalidValue;
  if (B == 0 || Hk == 0 || kk == 0) return cudaSuccess;
  const int64_t rows = share ? B : B * Hk;
  if (rows > INT_MAX) return cudaErrorInvalidConfiguration;
  d::SelectWindowsKernel<d::kThreads><<<static_cast<unsigned>(rows), d::kThreads, 0, stream>>>(
      scores, out, Hk, nw, kk, share);
  return cudaGetLastError();
}

}  // namespace tasksieve
