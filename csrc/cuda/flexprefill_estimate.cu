// CUDA bindings of the FlexPrefill estimation ops (schemas in csrc/ops.cpp): argument checks,
// device guard, current stream, dtype dispatch to the torch-free kernels in include/tasksieve/,
// error check. Nothing here syncs with the host.
//
//   js_divergence  p, q [..., n] (fp32/fp64/fp16/bf16) -> fp32 [...]        (js_divergence.cuh)
//   flex_estimate  q [B, Nq, H, D], k [B, Nk, Hk, D] (fp32/fp16/bf16), block_size in
//                  {16, 32, 64, 128} -> (vertical, slash, estimate) fp32 [B, H, nb]
//                                                                            (flex_estimate.cuh)
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

#include "tasksieve/flex_estimate.cuh"
#include "tasksieve/flex_index.h"
#include "tasksieve/js_divergence.cuh"

namespace tasksieve {
namespace {

constexpr int64_t kMaxHeadDim = 256;

at::Tensor js_divergence_cuda(const at::Tensor& p, const at::Tensor& q, double eps) {
  TORCH_CHECK(p.is_cuda(), "tasksieve.js_divergence: p must be a CUDA tensor here, got ",
              p.device());
  TORCH_CHECK(q.device() == p.device(), "tasksieve.js_divergence: q must be on the device of p (",
              p.device(), "), got ", q.device());
  const auto dt = p.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble || dt == at::kHalf || dt == at::kBFloat16,
              "tasksieve.js_divergence: p must be a float tensor (float32, float64, float16 or "
              "bfloat16), got ", dt);
  TORCH_CHECK(q.scalar_type() == dt, "tasksieve.js_divergence: q must have the dtype of p (", dt,
              "), got ", q.scalar_type());
  TORCH_CHECK(p.dim() >= 1, "tasksieve.js_divergence: p must have at least 1 dim [..., n], got "
              "a 0-d tensor");
  TORCH_CHECK(q.sizes() == p.sizes(), "tasksieve.js_divergence: q must have the shape of p (",
              p.sizes(), "), got ", q.sizes());
  const int64_t n = p.size(-1);
  TORCH_CHECK(n >= 1, "tasksieve.js_divergence: the last dim n of p must be >= 1, got ", n);
  TORCH_CHECK(std::isfinite(eps) && eps > 0,
              "tasksieve.js_divergence: eps must be finite and > 0, got ", eps);
  const float feps = static_cast<float>(eps);
  TORCH_CHECK(feps > 0, "tasksieve.js_divergence: eps must be representable in float32 (> 0), "
              "got ", eps);
  c10::cuda::CUDAGuard guard(p.device());
  auto out_sizes = p.sizes().vec();
  out_sizes.pop_back();
  at::Tensor out = at::empty(out_sizes, p.options().dtype(at::kFloat));
  const int64_t rows = out.numel();
  if (rows == 0) return out;
  at::Tensor pc = p, qc = q;
  if (dt == at::kDouble) pc = p.to(at::kFloat), qc = q.to(at::kFloat);
  pc = pc.contiguous();
  qc = qc.contiguous();
  float* o = out.data_ptr<float>();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  cudaError_t err;
  switch (pc.scalar_type()) {
    case at::kFloat:
      err = JsDivergence<float>(pc.const_data_ptr<float>(), qc.const_data_ptr<float>(), o, rows,
                                n, feps, stream);
      break;
    case at::kHalf:
      err = JsDivergence<__half>(static_cast<const __half*>(pc.const_data_ptr()),
                                 static_cast<const __half*>(qc.const_data_ptr()), o, rows, n,
                                 feps, stream);
      break;
    default:
      err = JsDivergence<__nv_bfloat16>(static_cast<const __nv_bfloat16*>(pc.const_data_ptr()),
                                        static_cast<const __nv_bfloat16*>(qc.const_data_ptr()),
                                        o, rows, n, feps, stream);
      break;
  }
  C10_CUDA_CHECK(err);
  return out;
}

template <typename T>
cudaError_t launch_flex_estimate(const at::Tensor& q, const at::Tensor& k, float* v, float* s,
                                 float* e, void* ws, size_t ws_bytes, int64_t bs, float scale,
                                 cudaStream_t stream) {
  return FlexEstimate<T>(static_cast<const T*>(q.const_data_ptr()),
                         static_cast<const T*>(k.const_data_ptr()), v, s, e, ws, ws_bytes,
                         q.size(0), q.size(1), q.size(2), k.size(2), k.size(1), q.size(3), bs,
                         q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1),
                         k.stride(2), scale, stream);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> flex_estimate_cuda(const at::Tensor& q,
                                                                  const at::Tensor& k,
                                                                  int64_t block_size,
                                                                  std::optional<double> scale) {
  TORCH_CHECK(q.dim() == 4,
              "tasksieve.flex_estimate: q must be a 4-D tensor [B, Nq, H, D], got shape ",
              q.sizes());
  TORCH_CHECK(k.dim() == 4,
              "tasksieve.flex_estimate: k must be a 4-D tensor [B, Nk, Hk, D], got shape ",
              k.sizes());
  TORCH_CHECK(q.is_cuda(), "tasksieve.flex_estimate: q must be a CUDA tensor here, got ",
              q.device());
  TORCH_CHECK(k.device() == q.device(), "tasksieve.flex_estimate: k must be on the device of q (",
              q.device(), "), got ", k.device());
  const auto dt = q.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16,
              "tasksieve.flex_estimate: q must be float32, float16 or bfloat16, got ", dt);
  TORCH_CHECK(k.scalar_type() == dt, "tasksieve.flex_estimate: k must have the dtype of q (", dt,
              "), got ", k.scalar_type());
  const int64_t B = q.size(0), Nq = q.size(1), H = q.size(2), D = q.size(3);
  const int64_t Nk = k.size(1), Hk = k.size(2);
  TORCH_CHECK(k.size(0) == B, "tasksieve.flex_estimate: k must have the batch size of q (", B,
              "), got ", k.size(0));
  TORCH_CHECK(D >= 1 && D <= kMaxHeadDim,
              "tasksieve.flex_estimate: q head dim D must be in [1, 256], got ", D);
  TORCH_CHECK(k.size(3) == D, "tasksieve.flex_estimate: k head dim must equal q head dim (", D,
              "), got ", k.size(3));
  TORCH_CHECK(Hk >= 1 && H % Hk == 0,
              "tasksieve.flex_estimate: k heads Hk must be >= 1 and divide the q heads H=", H,
              ", got Hk=", Hk);
  TORCH_CHECK(q.stride(3) == 1 || D == 1,
              "tasksieve.flex_estimate: q must be contiguous in the last dim (stride 1), got "
              "stride ", q.stride(3));
  TORCH_CHECK(k.stride(3) == 1 || D == 1,
              "tasksieve.flex_estimate: k must be contiguous in the last dim (stride 1), got "
              "stride ", k.stride(3));
  TORCH_CHECK(Nq <= Nk, "tasksieve.flex_estimate: q length Nq must be <= the k length Nk=", Nk,
              " (queries are the last Nq positions), got Nq=", Nq);
  TORCH_CHECK(block_size >= 1, "tasksieve.flex_estimate: block_size must be >= 1, got ",
              block_size);
  TORCH_CHECK(flex_estimate_detail::SupportedBlockSize(block_size),
              "tasksieve.flex_estimate: block_size must be 16, 32, 64 or 128 on CUDA (the CPU "
              "op takes any block_size >= 1), got ", block_size);
  TORCH_CHECK(!scale.has_value() || std::isfinite(*scale),
              "tasksieve.flex_estimate: scale must be finite, got ", scale.value_or(0.0));

  c10::cuda::CUDAGuard guard(q.device());
  const int64_t nb = flex::num_blocks(Nk, block_size);
  auto opts = q.options().dtype(at::kFloat);
  at::Tensor vert = at::empty({B, H, nb}, opts);
  at::Tensor slash = at::empty({B, H, nb}, opts);
  at::Tensor est = at::empty({B, H, nb}, opts);
  if (vert.numel() == 0) return {vert, slash, est};
  const size_t ws_bytes = FlexEstimateWorkspaceBytes(B, Nq, H, Hk, Nk, D, block_size);
  at::Tensor ws = at::empty({static_cast<int64_t>(ws_bytes)}, q.options().dtype(at::kByte));
  const float sc =
      static_cast<float>(scale.has_value() ? *scale : 1.0 / std::sqrt(static_cast<double>(D)));
  float* v = vert.data_ptr<float>();
  float* s = slash.data_ptr<float>();
  float* e = est.data_ptr<float>();
  void* w = ws_bytes ? ws.data_ptr() : nullptr;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  cudaError_t err;
  switch (dt) {
    case at::kFloat:
      err = launch_flex_estimate<float>(q, k, v, s, e, w, ws_bytes, block_size, sc, stream);
      break;
    case at::kHalf:
      err = launch_flex_estimate<__half>(q, k, v, s, e, w, ws_bytes, block_size, sc, stream);
      break;
    default:
      err = launch_flex_estimate<__nv_bfloat16>(q, k, v, s, e, w, ws_bytes, block_size, sc,
                                                stream);
      break;
  }
  C10_CUDA_CHECK(err);
  return {vert, slash, est};
}

}  // namespace

TORCH_LIBRARY_IMPL(tasksieve, CUDA, m) {
  m.impl("js_divergence", &js_divergence_cuda);
  m.impl("flex_estimate", &flex_estimate_cuda);
}

}  // namespace tasksieve
