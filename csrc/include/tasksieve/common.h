// Small helpers shared by host code and CUDA kernels. Torch-free; compiles with g++ and nvcc.
//
//   TS_HOST_DEVICE   __host__ __device__ under nvcc, empty otherwise
//   TS_INLINE        inline (+ __forceinline__ semantics under nvcc)
//   ceil_div, round_up, ts_min, ts_max, ts_clamp     integer/float arithmetic usable in kernels
//   is_aligned(ptr, bytes)                           pointer alignment test before vector casts
//   ts_is_nan, ts_nan_to_neg_inf                     NaN handling without <cmath> overloads
#pragma once

#include <cstddef>
#include <cstdint>

#if defined(__CUDACC__)
#define TS_HOST_DEVICE __host__ __device__
#define TS_INLINE __forceinline__
#else
#define TS_HOST_DEVICE
#define TS_INLINE inline
#endif

namespace tasksieve {

template <typename T>
TS_HOST_DEVICE TS_INLINE constexpr T ceil_div(T a, T b) {
  return (a + b - 1) / b;
}

template <typename T>
TS_HOST_DEVICE TS_INLINE constexpr T round_up(T a, T b) {
  return ceil_div(a, b) * b;
}

template <typename T>
TS_HOST_DEVICE TS_INLINE constexpr T ts_min(T a, T b) {
  return b < a ? b : a;
}

template <typename T>
TS_HOST_DEVICE TS_INLINE constexpr T ts_max(T a, T b) {
  return a < b ? b : a;
}

template <typename T>
TS_HOST_DEVICE TS_INLINE constexpr T ts_clamp(T v, T lo, T hi) {
  return v < lo ? lo : (hi < v ? hi : v);
}

TS_HOST_DEVICE TS_INLINE bool is_aligned(const void* p, std::size_t bytes) {
  return (reinterpret_cast<std::uintptr_t>(p) % bytes) == 0;
}

// x != x is true exactly for NaN (we never build with fast-math, which would break it).
TS_HOST_DEVICE TS_INLINE bool ts_is_nan(float x) { return x != x; }

// -inf as a float without <cmath>/<math.h> overload differences between host and device.
TS_HOST_DEVICE TS_INLINE float ts_neg_inf() { return -__builtin_huge_valf(); }

TS_HOST_DEVICE TS_INLINE float ts_nan_to_neg_inf(float x) {
  return ts_is_nan(x) ? ts_neg_inf() : x;
}

}  // namespace tasksieve
