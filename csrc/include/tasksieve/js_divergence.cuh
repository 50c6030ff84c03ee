// Row-wise Jensen-Shannon distance (torch-free).
//
//   JsDivergence<T>(p, q, out, rows, n, eps, stream) -> cudaError_t
//
// p, q: [rows, n] T contiguous (T = float, __half or __nv_bfloat16); out: float32 [rows].
// Per row (fp32 math, the formulas of flex_index.h):
//   p_i <- js_normalize(p_i, sum p, n)             (a row summing to 0 is uniform)
//   p_i <- js_clamp(p_i, eps) / sum_k js_clamp(p_k, eps)      (likewise q; no 0 * log 0)
//   out = sqrt(max(0, 1/2 sum p log(p/m) + 1/2 sum q log(q/m))),  m = (p + q) / 2
// One warp per row, three sweeps over the row (sums, clamped sums, divergence), warp-shuffle
// reductions in a fixed order: deterministic.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <climits>
#include <cstdint>

#include "tasksieve/common.h"
#include "tasksieve/dtype.cuh"
#include "tasksieve/flex_index.h"

namespace tasksieve {
namespace js_detail {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

__device__ __forceinline__ float Load(const float* p, int64_t i) { return p[i]; }
__device__ __forceinline__ float Load(const __half* p, int64_t i) { return __half2float(p[i]); }
__device__ __forceinline__ float Load(const __nv_bfloat16* p, int64_t i) {
  return __bfloat162float(p[i]);
}

__device__ __forceinline__ float WarpSum(float v) {
#pragma unroll
  for (int off = 16; off > 0; off /= 2) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    JsDivergenceKernel(const T* __restrict__ p, const T* __restrict__ q, float* __restrict__ out,
                       int64_t rows, int64_t n, float eps) {
  const int lane = threadIdx.x % 32;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32;
  if (row >= rows) return;  // whole warps exit together
  const T* pr = p + row * n;
  const T* qr = q + row * n;
  float sp = 0.f, sq = 0.f;
  for (int64_t i = lane; i < n; i += 32) sp += Load(pr, i), sq += Load(qr, i);
  sp = WarpSum(sp);
  sq = WarpSum(sq);
  float cp = 0.f, cq = 0.f;
  for (int64_t i = lane; i < n; i += 32) {
    cp += flex::js_clamp(flex::js_normalize(Load(pr, i), sp, n), eps);
    cq += flex::js_clamp(flex::js_normalize(Load(qr, i), sq, n), eps);
  }
  cp = WarpSum(cp);
  cq = WarpSum(cq);
  float acc = 0.f;
  for (int64_t i = lane; i < n; i += 32) {
    const float pi = flex::js_clamp(flex::js_normalize(Load(pr, i), sp, n), eps) / cp;
    const float qi = flex::js_clamp(flex::js_normalize(Load(qr, i), sq, n), eps) / cq;
    acc += flex::js_term(pi, qi);
  }
  acc = WarpSum(acc);
  if (lane == 0) out[row] = flex::js_finish(acc);
}

}  // namespace js_detail

// rows >= 0, n >= 1, eps > 0. rows == 0 launches nothing. One launch on `stream`.
template <typename T>
cudaError_t JsDivergence(const T* p, const T* q, float* out, int64_t rows, int64_t n, float eps,
                         cudaStream_t stream) {
  namespace d = js_detail;
  if (rows < 0 || n < 1 || !(eps > 0.f)) return cudaErrorInvalidValue;
  if (rows == 0) return cudaSuccess;
  const int64_t blocks = ceil_div<int64_t>(rows, d::kWarps);
  if (blocks > INT_MAX) return cudaErrorInvalidConfiguration;
  d::JsDivergenceKernel<T>
      <<<static_cast<unsigned>(blocks), d::kThreads, 0, stream>>>(p, q, out, rows, n, eps);
  return cudaGetLastError();
}

// The entry point of the CUDA glue and the simulator runner: p, q of element type `dt` (fp64
// inputs are cast to fp32 by the caller), contiguous [rows, n]; out fp32 [rows].
inline cudaError_t JsDivergenceLaunch(DType dt, const void* p, const void* q, float* out,
                                      int64_t rows, int64_t n, float eps, cudaStream_t stream) {
  return DispatchFloat(dt, [&](auto tag) {
    using T = typename decltype(tag)::type;
    return JsDivergence<T>(static_cast<const T*>(p), static_cast<const T*>(q), out, rows, n, eps,
                           stream);
  });
}

#ifdef TASKSIEVE_COMPILE_CHECK
#define TASKSIEVE_INSTANTIATE_JS_DIVERGENCE(T)                                              \
  template cudaError_t JsDivergence<T>(const T*, const T*, float*, int64_t, int64_t, float, \
                                       cudaStream_t);
TASKSIEVE_INSTANTIATE_JS_DIVERGENCE(float)
TASKSIEVE_INSTANTIATE_JS_DIVERGENCE(__half)
TASKSIEVE_INSTANTIATE_JS_DIVERGENCE(__nv_bfloat16)
#undef TASKSIEVE_INSTANTIATE_JS_DIVERGENCE
#endif

}  // namespace tasksieve
