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

#include "../checks/flexprefill_checks.h"
#include "tasksieve/flex_estimate.cuh"
#include "tasksieve/flex_index.h"
#include "tasksieve/js_divergence.cuh"

namespace tasksieve {
namespace {

at::Tensor js_divergence_cuda(const at::Tensor& p, const at::Tensor& q, double eps) {
  TORCH_CHECK(p.is_cuda(), "tasksieve.js_divergence: p must be a CUDA tensor here, got ",
              p.device());
  const checks::JsDivergenceArgs a = checks::check_js_divergence_args(p, q, eps);
  const auto dt = p.scalar_type();
  const int64_t n = a.n;
  const float feps = a.eps;
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
  checks::check_flex_estimate_ranks(q, k);
  TORCH_CHECK(q.is_cuda(), "tasksieve.flex_estimate: q must be a CUDA tensor here, got ",
              q.device());
  const checks::FlexEstimateDims dims =
      checks::check_flex_estimate_args(q, k, block_size, scale, [](int64_t bs) {
        TORCH_CHECK(flex_estimate_detail::SupportedBlockSize(bs),
                    "tasksieve.flex_estimate: block_size must be 16, 32, 64 or 128 on CUDA (the "
                    "CPU op takes any block_size >= 1), got ", bs);
      });
  const auto dt = q.scalar_type();
  const int64_t B = dims.B, Nq = dims.Nq, H = dims.H, D = dims.D, Nk = dims.Nk, Hk = dims.Hk;

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
