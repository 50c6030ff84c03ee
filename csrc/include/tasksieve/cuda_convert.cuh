// fp16 / bf16 <-> fp32 conversions shared by the CUDA kernels that load half-precision tiles and
// accumulate in fp32 (block_sparse_attention, expert_gemm); the float identities let a kernel
// template write fp32 outputs through the same code. Explicit templates rather than the
// cuda_fp16 operators, which the torch build disables (__CUDA_NO_HALF_CONVERSIONS__ etc.).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace tasksieve {
namespace cuda_convert {

template <typename T>
__device__ __forceinline__ float to_float(T x);
template <>
__device__ __forceinline__ float to_float<__half>(__half x) { return __half2float(x); }
template <>
__device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 x) {
  return __bfloat162float(x);
}

template <>
__device__ __forceinline__ float to_float<float>(float x) { return x; }

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

}  // namespace cuda_convert
}  // namespace tasksieve
