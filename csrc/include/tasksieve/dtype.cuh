// The element types the kernels take, as a runtime tag, and the one switch that turns the tag
// into a template argument. The torch glue (csrc/cuda/) maps at::ScalarType to DType and the
// simulator runners (csrc/sim/) map their dtype names to it, so both reach the same kernel
// variant through the same launcher.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

namespace tasksieve {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

template <typename T>
struct TypeTag {
  using type = T;
};

// f(TypeTag<T>{}) for T in {float, __half, __nv_bfloat16}; cudaErrorInvalidValue otherwise.
// `f` returns cudaError_t: `return DispatchFloat(dt, [&](auto tag) { using T = typename
// decltype(tag)::type; return Kernel<T>(...); });`
template <typename F>
cudaError_t DispatchFloat(DType dt, F&& f) {
  switch (dt) {
    case DType::kFloat32:
      return f(TypeTag<float>{});
    case DType::kFloat16:
      return f(TypeTag<__half>{});
    case DType::kBFloat16:
      return f(TypeTag<__nv_bfloat16>{});
  }
  return cudaErrorInvalidValue;
}

// The tensor-core kernels take only the 16-bit types.
template <typename F>
cudaError_t DispatchHalf(DType dt, F&& f) {
  switch (dt) {
    case DType::kFloat16:
      return f(TypeTag<__half>{});
    case DType::kBFloat16:
      return f(TypeTag<__nv_bfloat16>{});
    default:
      return cudaErrorInvalidValue;
  }
}

}  // namespace tasksieve
