// CUDA bindings of the FlexPrefill estimation ops (schemas in csrc/ops.cpp): argument checks,
// device guard, allocation, current stream, then the torch-free launchers in include/tasksieve/
// (JsDivergenceLaunch, FlexEstimateLaunch: the dtype dispatch lives there, shared with the
// simulator runner csrc/sim/sim_flexprefill.cu). Nothing here syncs with the host.
//
//   js_divergence  p, q [..., n] (fp32/fp64/fp16/bf16) -> fp32 [...]        (js_divergence.cuh)
//   flex_estimate  q [B, Nq, H, D], k [B, Nk, Hk, D] (fp32/fp16/bf16), block_size in
//                  {16, 32, 64, 128} -> (vertical, slash, estimate) fp32 [B, H, nb]
//                                                                            (flex_estimate.cuh)
//   flex_estimate_paged  q [S, Nq, H, D] or packed (cu_seqlens_q), k_cache [num_pages,
//                  page_size, Hk, D] any strides, block_table [S, max_pages], seq_lens_k [S]
//                  -> (vertical, slash, estimate) fp32 [S, H, nb_max]        (flex_estimate.cuh)
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

// The launchers' element-type tag of a tensor the checks accepted (fp32, fp16 or bf16).
DType to_dtype(at::ScalarType t) {
  switch (t) {
    case at::kHalf:
      return DType::kFloat16;
    case at::kBFloat16:
      return DType::kBFloat16;
    default:
      TORCH_CHECK(t == at::kFloat, "tasksieve: unexpected dtype ", t);
      return DType::kFloat32;
  }
}

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
  C10_CUDA_CHECK(JsDivergenceLaunch(to_dtype(pc.scalar_type()), pc.const_data_ptr(),
                                    qc.const_data_ptr(), out.data_ptr<float>(), rows, n, feps,
                                    c10::cuda::getCurrentCUDAStream()));
  return out;
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
  C10_CUDA_CHECK(FlexEstimateLaunch(
      to_dtype(dt), q.const_data_ptr(), k.const_data_ptr(), vert.data_ptr<float>(),
      slash.data_ptr<float>(), est.data_ptr<float>(), ws_bytes ? ws.data_ptr() : nullptr,
      ws_bytes, B, Nq, H, Hk, Nk, D, block_size, q.stride(0), q.stride(1), q.stride(2),
      k.stride(0), k.stride(1), k.stride(2), sc, c10::cuda::getCurrentCUDAStream()));
  return {vert, slash, est};
}


// flex_estimate_paged: keys through the block table (FlexEstimatePagedLaunch); values inside
// block_table, seq_lens_k and cu_seqlens_q are clamped by the kernels, never validated.
std::tuple<at::Tensor, at::Tensor, at::Tensor> flex_estimate_paged_cuda(
    const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& block_table,
    const at::Tensor& seq_lens_k, int64_t block_size, std::optional<double> scale,
    const std::optional<at::Tensor>& cu_seqlens_q) {
  const char* opn = "flex_estimate_paged";
  checks::check_paged_ranks(opn, q, k_cache, nullptr);
  TORCH_CHECK(q.is_cuda(), "tasksieve.", opn, ": q must be a CUDA tensor here, got ", q.device());
  const checks::PagedDims d = checks::check_paged_args(
      opn, q, k_cache, nullptr, block_table, seq_lens_k, cu_seqlens_q,
      [&](at::ScalarType dt) {
        TORCH_CHECK(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16, "tasksieve.",
                    opn, ": q must be float32, float16 or bfloat16, got ", dt);
      },
      [&](int64_t D) {
        TORCH_CHECK(D >= 1 && D <= checks::kFlexEstimateMaxHeadDim, "tasksieve.", opn,
                    ": q head dim D must be in [1, 256], got ", D);
      });
  TORCH_CHECK(block_size >= 1, "tasksieve.", opn, ": block_size must be >= 1, got ", block_size);
  TORCH_CHECK(flex_estimate_detail::SupportedBlockSize(block_size), "tasksieve.", opn,
              ": block_size must be 16, 32, 64 or 128 on CUDA (the CPU op takes any block_size "
              ">= 1), got ", block_size);
  TORCH_CHECK(!scale.has_value() || std::isfinite(*scale), "tasksieve.", opn,
              ": scale must be finite, got ", scale.value_or(0.0));
  c10::cuda::CUDAGuard guard(q.device());
  const int64_t nb_max = flex::num_blocks(d.max_pages * d.page_size, block_size);
  auto opts = q.options().dtype(at::kFloat);
  at::Tensor vert = at::empty({d.S, d.H, nb_max}, opts);
  at::Tensor slash = at::empty({d.S, d.H, nb_max}, opts);
  at::Tensor est = at::empty({d.S, d.H, nb_max}, opts);
  if (vert.numel() == 0) return {vert, slash, est};
  const at::Tensor table = block_table.contiguous();
  const at::Tensor lens = seq_lens_k.contiguous();
  at::Tensor cu;
  if (d.packed) cu = cu_seqlens_q->contiguous();
  const size_t ws_bytes = FlexEstimatePagedWorkspaceBytes(d.S, d.Nq, d.H, d.Hk, d.D,
                                                          d.max_pages, d.page_size, block_size);
  at::Tensor ws = at::empty({static_cast<int64_t>(ws_bytes)}, q.options().dtype(at::kByte));
  const float sc = static_cast<float>(scale.has_value() ? *scale
                                                        : 1.0 / std::sqrt(static_cast<double>(d.D)));
  C10_CUDA_CHECK(FlexEstimatePagedLaunch(
      to_dtype(q.scalar_type()), q.const_data_ptr(), k_cache.const_data_ptr(),
      table.const_data_ptr<int32_t>(), lens.const_data_ptr<int32_t>(),
      d.packed ? cu.const_data_ptr<int32_t>() : nullptr, vert.data_ptr<float>(),
      slash.data_ptr<float>(), est.data_ptr<float>(), ws_bytes ? ws.data_ptr() : nullptr,
      ws_bytes, d.S, d.Nq, d.H, d.Hk, d.D, d.num_pages, d.page_size, d.max_pages, block_size,
      q.stride(0), q.stride(1), q.stride(2), k_cache.stride(0), k_cache.stride(1),
      k_cache.stride(2), sc, c10::cuda::getCurrentCUDAStream()));
  return {vert, slash, est};
}
}  // namespace

TORCH_LIBRARY_IMPL(tasksieve, CUDA, m) {
  m.impl("js_divergence", &js_divergence_cuda);
  m.impl("flex_estimate", &flex_estimate_cuda);
  m.impl("flex_estimate_paged", &flex_estimate_paged_cuda);
}

}  // namespace tasksieve
