// CUDA binding of block_sparse_attention (schema in csrc/ops.cpp): argument checks, device
// guard, current stream, dtype dispatch to include/tasksieve/block_sparse_attention.cuh.
//
//   q [B, Nq, H, D], k/v [B, Nk, Hk, D] (fp16/bf16, D 64 or 128), block_idx int32
//   [B, H, nbq, max_k], block_cnt int32 [B, H, nbq] -> out [B, Nq, H, D], lse fp32 [B, H, Nq]
//
// Nothing here syncs with the host, so values inside block_idx/block_cnt are not validated:
// counts are clamped into [0, max_k] and out-of-range columns are skipped by the kernel (never
// an out-of-bounds access). The CPU op raises on both instead.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>
#include <optional>
#include <tuple>

#include "tasksieve/block_index.h"
#include "tasksieve/block_sparse_attention.cuh"

namespace tasksieve {
namespace {

#define TS_CHECK(cond, ...) \
  TORCH_CHECK(cond, "tasksieve.block_sparse_attention: ", __VA_ARGS__)

template <typename T>
cudaError_t launch_bsa(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                       const at::Tensor& idx, const at::Tensor& cnt, at::Tensor& out,
                       at::Tensor& lse, int64_t block_size, float scale, bool causal,
                       cudaStream_t stream) {
  return BlockSparseAttention<T>(
      static_cast<const T*>(q.const_data_ptr()), static_cast<const T*>(k.const_data_ptr()),
      static_cast<const T*>(v.const_data_ptr()), idx.const_data_ptr<int32_t>(),
      cnt.const_data_ptr<int32_t>(), static_cast<T*>(out.data_ptr()), lse.data_ptr<float>(),
      q.size(0), q.size(1), k.size(1), q.size(2), k.size(2), q.size(3), idx.size(3), block_size,
      q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2), v.stride(0),
      v.stride(1), v.stride(2), scale, causal, stream);
}

std::tuple<at::Tensor, at::Tensor> block_sparse_attention_cuda(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& block_idx,
    const at::Tensor& block_cnt, int64_t block_size, std::optional<double> scale_opt,
    bool causal) {
  TS_CHECK(q.dim() == 4, "q must be a 4-D tensor [B, Nq, H, D], got shape ", q.sizes());
  TS_CHECK(k.dim() == 4, "k must be a 4-D tensor [B, Nk, Hk, D], got shape ", k.sizes());
  TS_CHECK(v.dim() == 4, "v must be a 4-D tensor [B, Nk, Hk, D], got shape ", v.sizes());
  TS_CHECK(q.is_cuda(), "q must be a CUDA tensor here, got ", q.device());
  TS_CHECK(k.device() == q.device(), "k must be on the device of q (", q.device(), "), got ",
           k.device());
  TS_CHECK(v.device() == q.device(), "v must be on the device of q (", q.device(), "), got ",
           v.device());
  TS_CHECK(block_idx.device() == q.device(), "block_idx must be on the device of q (",
           q.device(), "), got ", block_idx.device());
  TS_CHECK(block_cnt.device() == q.device(), "block_cnt must be on the device of q (",
           q.device(), "), got ", block_cnt.device());
  const auto dt = q.scalar_type();
  TS_CHECK(dt == at::kHalf || dt == at::kBFloat16,
           "q must be float16 or bfloat16 on CUDA, got ", dt);
  TS_CHECK(k.scalar_type() == dt, "k must have the dtype of q (", dt, "), got ", k.scalar_type());
  TS_CHECK(v.scalar_type() == dt, "v must have the dtype of q (", dt, "), got ", v.scalar_type());
  const int64_t B = q.size(0), Nq = q.size(1), H = q.size(2), D = q.size(3);
  const int64_t Nk = k.size(1), Hk = k.size(2);
  TS_CHECK(k.size(0) == B, "k must have the batch size of q (", B, "), got ", k.size(0));
  TS_CHECK(v.sizes() == k.sizes(), "v must have the shape of k ", k.sizes(), ", got ", v.sizes());
  TS_CHECK(D == 64 || D == 128, "q head dim D must be 64 or 128 on CUDA, got ", D);
  TS_CHECK(k.size(3) == D, "k head dim must equal q head dim (", D, "), got ", k.size(3));
  TS_CHECK(Hk >= 1 && H % Hk == 0, "k heads Hk must be >= 1 and divide the q heads H=", H,
           ", got Hk=", Hk);
  TS_CHECK(Nq <= Nk, "q length Nq must be <= the k length Nk=", Nk, ", got Nq=", Nq);
  TS_CHECK(q.stride(3) == 1, "q must have a contiguous last dim, got strides ", q.strides());
  TS_CHECK(k.stride(3) == 1, "k must have a contiguous last dim, got strides ", k.strides());
  TS_CHECK(v.stride(3) == 1, "v must have a contiguous last dim, got strides ", v.strides());
  TS_CHECK(block_size == 16 || block_size == 32 || block_size == 64 || block_size == 128,
           "block_size must be 16, 32, 64 or 128, got ", block_size);
  const int64_t nbq = block::num_blocks(Nq, block_size);
  TS_CHECK(block_idx.scalar_type() == at::kInt, "block_idx must be int32, got ",
           block_idx.scalar_type());
  TS_CHECK(block_cnt.scalar_type() == at::kInt, "block_cnt must be int32, got ",
           block_cnt.scalar_type());
  TS_CHECK(block_idx.dim() == 4 && block_idx.size(0) == B && block_idx.size(1) == H &&
               block_idx.size(2) == nbq,
           "block_idx must have shape [B, H, nbq, max_k] = [", B, ", ", H, ", ", nbq,
           ", max_k] (nbq = ceil(Nq / block_size)), got ", block_idx.sizes());
  TS_CHECK(block_cnt.dim() == 3 && block_cnt.size(0) == B && block_cnt.size(1) == H &&
               block_cnt.size(2) == nbq,
           "block_cnt must have shape [B, H, nbq] = [", B, ", ", H, ", ", nbq, "], got ",
           block_cnt.sizes());
  const double scale = scale_opt.has_value() ? *scale_opt : 1.0 / std::sqrt(double(D));
  TS_CHECK(std::isfinite(scale), "scale must be finite, got ", scale);

  const c10::cuda::CUDAGuard guard(q.device());
  at::Tensor out = at::empty({B, Nq, H, D}, q.options());
  at::Tensor lse = at::empty({B, H, Nq}, q.options().dtype(at::kFloat));
  if (B == 0 || Nq == 0 || H == 0) return {out, lse};
  const at::Tensor idx = block_idx.contiguous();
  const at::Tensor cnt = block_cnt.contiguous();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  cudaError_t err;
  if (dt == at::kHalf) {
    err = launch_bsa<__half>(q, k, v, idx, cnt, out, lse, block_size, float(scale), causal,
                             stream);
  } else {
    err = launch_bsa<__nv_bfloat16>(q, k, v, idx, cnt, out, lse, block_size, float(scale),
                                    causal, stream);
  }
  C10_CUDA_CHECK(err);
  return {out, lse};
}

#undef TS_CHECK

}  // namespace
}  // namespace tasksieve

TORCH_LIBRARY_IMPL(tasksieve, CUDA, m) {
  m.impl("block_sparse_attention", &tasksieve::block_sparse_attention_cuda);
}
