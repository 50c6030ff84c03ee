// CUDA bindings of the PreMoe expert GEMM ops (schemas in csrc/ops.cpp): argument checks,
// device guard, allocation, current stream, then the torch-free entry points of
// include/tasksieve/expert_gemm.cuh (ExpertGemmLaunch, MoeForwardLaunch: dtype dispatch, tile
// height, workspace layout and launch sequence there, shared with the simulator runner
// csrc/sim/sim_premoe.cu).
//
//   expert_gemm  x [T, K] / [T*top_k, K], w [E_c, N, K] (fp16/bf16, K % 8 == 0), moe_align's
//                sorted_ids / tile_expert / num_padded (block_m 16, 32 or 64) -> y [T*top_k, N_out]
//   moe_forward  MoeForward: moe_align's kernels -> expert_gemm(gather, silu_mul) into h [T*k, I]
//                -> expert_gemm(h, w2, router weight) into fp32 y [T*k, H] -> sum over k, all
//                in one workspace (MoeForwardPlan)
//
// Nothing here syncs with the host: num_padded is read by the kernels on the device, so the
// values inside the index tensors are not validated here; tiles past num_padded or with an
// expert outside [0, E_c) are skipped and slot ids outside [0, T*top_k) are padding (never an
// out-of-bounds access). The CPU ops raise on such values instead. float32 is CPU-only: the
// CUDA kernels are tensor-core (WMMA fp16/bf16) kernels, and fp32 inputs get a clear error.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <optional>

#include "../checks/moe_gemm_checks.h"
#include "tasksieve/common.h"
#include "tasksieve/dtype.cuh"
#include "tasksieve/expert_gemm.cuh"
#include "tasksieve/expert_gemm_index.h"

namespace tasksieve {
namespace {

// After check_cuda_dtype: float16 or bfloat16.
DType to_dtype(at::ScalarType t) {
  return t == at::kHalf ? DType::kFloat16 : DType::kBFloat16;
}

void check_cuda_dtype(const char* op, at::ScalarType dt) {
  TORCH_CHECK(dt == at::kHalf || dt == at::kBFloat16, "tasksieve.", op,
              ": x must be float16 or bfloat16 on CUDA (tensor-core kernels; float32 runs on "
              "CPU only), got ", dt);
}

// The kernels load 16-byte chunks: a contiguous tensor whose data does not start on a 16-byte
// boundary (a view with an odd offset) is copied once into a fresh, aligned allocation.
at::Tensor aligned_contiguous(const at::Tensor& t) {
  at::Tensor c = t.contiguous();
  return is_aligned(c.const_data_ptr(), 16) ? c : c.clone();
}

at::Tensor expert_gemm_cuda(const at::Tensor& x, const at::Tensor& w,
                            const at::Tensor& sorted_ids, const at::Tensor& tile_expert,
                            const at::Tensor& num_padded, int64_t block_m, int64_t top_k,
                            bool gather, c10::string_view activation,
                            const std::optional<at::Tensor>& topk_weights) {
  TORCH_CHECK(x.is_cuda(), "tasksieve.expert_gemm: x must be a CUDA tensor here, got ",
              x.device());
  const checks::ExpertGemmDims d = checks::check_expert_gemm_args(
      x, w, sorted_ids, tile_expert, num_padded, block_m, top_k, gather, activation,
      topk_weights);
  check_cuda_dtype("expert_gemm", x.scalar_type());
  TORCH_CHECK(block_m == 16 || block_m == 32 || block_m == 64,
              "tasksieve.expert_gemm: block_m must be 16, 32 or 64 on CUDA, got ", block_m);
  TORCH_CHECK(d.K % 8 == 0, "tasksieve.expert_gemm: x.size(1) (K) must be a multiple of 8 on "
              "CUDA (16-byte loads), got ", d.K);
  TORCH_CHECK(d.tiles <= 2147483647LL && ceil_div(d.N_out, int64_t{64}) <= 65535,
              "tasksieve.expert_gemm: too many tiles for one launch (P / block_m = ", d.tiles,
              ", N_out = ", d.N_out, ")");

  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor y = at::zeros({d.S, d.N_out}, x.options());
  if (d.S == 0 || d.N_out == 0 || d.P == 0) return y;
  const at::Tensor xc = aligned_contiguous(x), wc = aligned_contiguous(w);
  const at::Tensor ids = sorted_ids.contiguous(), tiles = tile_expert.contiguous();
  const at::Tensor np = num_padded.contiguous();
  std::optional<at::Tensor> wts;
  if (topk_weights.has_value()) wts = topk_weights->to(at::kFloat).contiguous();
  const float* wp = wts.has_value() ? wts->const_data_ptr<float>() : nullptr;
  C10_CUDA_CHECK(ExpertGemmLaunch(to_dtype(x.scalar_type()), xc.const_data_ptr(),
                                  wc.const_data_ptr(), ids.const_data_ptr<int32_t>(),
                                  tiles.const_data_ptr<int32_t>(), np.const_data_ptr<int32_t>(),
                                  wp, y.data_ptr(), d.S, d.K, d.N, d.E_c, d.P, block_m, top_k,
                                  gather, d.silu_mul, c10::cuda::getCurrentCUDAStream()));
  return y;
}

at::Tensor moe_forward_cuda(const at::Tensor& x, const at::Tensor& w13, const at::Tensor& w2,
                            const at::Tensor& topk_ids, const at::Tensor& topk_weights,
                            const std::optional<at::Tensor>& expert_map) {
  TORCH_CHECK(x.is_cuda(), "tasksieve.moe_forward: x must be a CUDA tensor here, got ",
              x.device());
  const checks::MoeForwardDims d =
      checks::check_moe_forward_args(x, w13, w2, topk_ids, topk_weights, expert_map);
  check_cuda_dtype("moe_forward", x.scalar_type());
  TORCH_CHECK(d.H % 8 == 0 && d.I % 8 == 0, "tasksieve.moe_forward: H and I must be multiples "
              "of 8 on CUDA (16-byte loads), got H = ", d.H, ", I = ", d.I);
  const int64_t T = d.T, H = d.H, I = d.I, k = d.k, S = T * k;

  // moe_align's limits (its CUDA kernel runs inside MoeForward).
  TORCH_CHECK(d.num_experts <= moe_route_detail::kMaxExperts, "tasksieve.moe_forward: "
              "num_experts (", expert_map.has_value() ? "expert_map.size(0)" : "w13.size(0)",
              ") must be at most ", moe_route_detail::kMaxExperts, " for the CUDA kernel, got ",
              d.num_experts);

  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor out = at::empty({T, H}, x.options());
  if (T == 0 || H == 0) return out;
  // Tile height, moe_align's layout and the workspace of the launch sequence: MoeForwardPlan
  // in the header, shared with the simulator runner.
  const MoeForwardPlan plan = MakeMoeForwardPlan(T, H, I, d.E_c, k, d.num_experts,
                                                 x.element_size());
  TORCH_CHECK(plan.P <= 2147483647LL, "tasksieve.moe_forward: the padded size P = ", plan.P,
              " (T*k = ", S, ", num_experts = ", d.num_experts, ", block_m = ", plan.block_m,
              ") must fit in int32");
  const at::Tensor xc = aligned_contiguous(x), w13c = aligned_contiguous(w13),
                   w2c = aligned_contiguous(w2);
  const at::Tensor ids = topk_ids.contiguous();
  std::optional<at::Tensor> map_c;
  if (expert_map.has_value()) map_c = expert_map->contiguous();
  const at::Tensor wts = topk_weights.to(at::kFloat).contiguous();
  at::Tensor ws = at::empty({static_cast<int64_t>(plan.bytes)}, x.options().dtype(at::kByte));
  C10_CUDA_CHECK(MoeForwardLaunch(
      to_dtype(x.scalar_type()), xc.const_data_ptr(), w13c.const_data_ptr(),
      w2c.const_data_ptr(), ids.scalar_type() == at::kLong, ids.const_data_ptr(),
      wts.const_data_ptr<float>(), map_c.has_value() ? map_c->const_data_ptr<int32_t>() : nullptr,
      out.data_ptr(), T, H, I, d.E_c, k, d.num_experts, plan, ws.data_ptr(),
      c10::cuda::getCurrentCUDAStream()));
  return out;
}

}  // namespace
}  // namespace tasksieve

TORCH_LIBRARY_IMPL(tasksieve, CUDA, m) {
  m.impl("expert_gemm", &tasksieve::expert_gemm_cuda);
  m.impl("moe_forward", &tasksieve::moe_forward_cuda);
}
