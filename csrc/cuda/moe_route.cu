// CUDA bindings of the PreMoe routing ops (schemas in csrc/ops.cpp): argument checks, device
// guard, allocation, current stream, then the torch-free entry points of
// include/tasksieve/moe_route.cuh (TcessUpdateLaunch, RouteTopkLaunch, MoeAlignLaunch: dtype
// dispatch there, shared with the simulator runner csrc/sim/sim_premoe.cu), error check.
//
//   tcess_update  router_logits [T, E] (fp32/fp16/bf16), acc fp64 [E] (+=), count int64 [1] (+=)
//   route_topk    router_logits [T, E] -> (topk_weights fp32 [T, k], topk_ids int32 [T, k])
//   moe_align     topk_ids int32/int64 [T, k] -> (sorted_ids int32 [P], tile_expert int32
//                 [P / block_m], num_padded int32 [1])
//
// E (num_experts) is at most 1024 here. Nothing syncs with the host except route_topk's check
// that keep_mask keeps at least top_k experts (one read of the mask's count; skipped while the
// stream is being captured into a CUDA graph, where the kernel fills unfillable columns with
// id -1, weight 0). moe_align does not validate values on the device: a slot whose id or
// expert_map entry is outside [0, E) is dropped.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <optional>

#include "../checks/moe_route_checks.h"
#include "tasksieve/dtype.cuh"
#include "tasksieve/moe_index.h"
#include "tasksieve/moe_route.cuh"

namespace tasksieve {
namespace {

#define TS_CHECK(cond, op, ...) TORCH_CHECK(cond, "tasksieve.", op, ": ", __VA_ARGS__)

constexpr int64_t kMaxExperts = moe_route_detail::kMaxExperts;

// The checks admit only float32, float16 and bfloat16 logits.
DType to_dtype(at::ScalarType t) {
  return t == at::kHalf ? DType::kFloat16
                        : (t == at::kBFloat16 ? DType::kBFloat16 : DType::kFloat32);
}

void check_cuda_experts(const char* op, const char* what, int64_t E) {
  TS_CHECK(E <= kMaxExperts, op, what, " must be at most ", kMaxExperts,
           " for the CUDA kernel, got ", E);
}

void tcess_update_cuda(const at::Tensor& router_logits, int64_t top_k, double r, at::Tensor acc,
                       at::Tensor count) {
  const char* op = "tcess_update";
  checks::check_tcess_update_args(router_logits, top_k, r, acc, count);
  TS_CHECK(router_logits.is_cuda(), op, "router_logits must be a CUDA tensor here, got ",
           router_logits.device());
  const int64_t Tn = router_logits.size(0), E = router_logits.size(1);
  check_cuda_experts(op, "E (router_logits.size(1))", E);
  c10::cuda::CUDAGuard guard(router_logits.device());
  if (Tn == 0) return;
  at::Tensor acc_c = acc.is_contiguous() ? acc : acc.contiguous();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t s0 = router_logits.stride(0), s1 = router_logits.stride(1);
  const size_t ws_bytes = TcessUpdateWorkspaceBytes(Tn, E);
  at::Tensor ws = at::empty({static_cast<int64_t>(ws_bytes)},
                            router_logits.options().dtype(at::kByte));
  C10_CUDA_CHECK(TcessUpdateLaunch(to_dtype(router_logits.scalar_type()),
                                   router_logits.const_data_ptr(), Tn, E, s0, s1, top_k,
                                   static_cast<float>(r), acc_c.data_ptr<double>(),
                                   count.data_ptr<int64_t>(), ws.data_ptr(), ws_bytes, stream));
  if (!acc.is_same(acc_c)) acc.copy_(acc_c);
}

bool stream_is_capturing(cudaStream_t stream) {
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  C10_CUDA_CHECK(cudaStreamIsCapturing(stream, &status));
  return status != cudaStreamCaptureStatusNone;
}

std::tuple<at::Tensor, at::Tensor> route_topk_cuda(const at::Tensor& router_logits, int64_t top_k,
                                                   c10::string_view scoring, bool renormalize,
                                                   const std::optional<at::Tensor>& keep_mask,
                                                   const std::optional<at::Tensor>& bias,
                                                   double scaling, bool mask_full) {
  const char* op = "route_topk";
  const moe::Scoring kind =
      checks::check_route_topk_args(router_logits, top_k, scoring, keep_mask, bias, scaling);
  TS_CHECK(router_logits.is_cuda(), op, "router_logits must be a CUDA tensor here, got ",
           router_logits.device());
  const int64_t Tn = router_logits.size(0), E = router_logits.size(1);
  check_cuda_experts(op, "E (router_logits.size(1))", E);
  c10::cuda::CUDAGuard guard(router_logits.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  at::Tensor keep_c, bias_c;
  if (keep_mask.has_value()) {
    if (!stream_is_capturing(stream)) checks::check_route_topk_kept(*keep_mask, top_k);
    keep_c = keep_mask->contiguous();
  }
  if (bias.has_value()) bias_c = bias->contiguous();
  at::Tensor w = at::empty({Tn, top_k}, router_logits.options().dtype(at::kFloat));
  at::Tensor ids = at::empty({Tn, top_k}, router_logits.options().dtype(at::kInt));
  if (Tn == 0) return {w, ids};
  const bool* kp = keep_c.defined() ? keep_c.const_data_ptr<bool>() : nullptr;
  const float* bp = bias_c.defined() ? bias_c.const_data_ptr<float>() : nullptr;
  const int64_t s0 = router_logits.stride(0), s1 = router_logits.stride(1);
  C10_CUDA_CHECK(RouteTopkLaunch(to_dtype(router_logits.scalar_type()),
                                 router_logits.const_data_ptr(), Tn, E, s0, s1, top_k, kind,
                                 renormalize, kp, bp, static_cast<float>(scaling), mask_full,
                                 w.data_ptr<float>(), ids.data_ptr<int32_t>(), stream));
  return {w, ids};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> moe_align_cuda(
    const at::Tensor& topk_ids, int64_t num_experts, int64_t block_m,
    const std::optional<at::Tensor>& expert_map) {
  const char* op = "moe_align";
  checks::check_moe_align_args(topk_ids, num_experts, block_m, expert_map);
  TS_CHECK(topk_ids.is_cuda(), op, "topk_ids must be a CUDA tensor here, got ",
           topk_ids.device());
  check_cuda_experts(op, "num_experts", num_experts);
  c10::cuda::CUDAGuard guard(topk_ids.device());
  const at::Tensor ids = topk_ids.contiguous();
  at::Tensor map_c;
  if (expert_map.has_value()) map_c = expert_map->contiguous();
  const int64_t S = ids.numel();
  const int64_t P = moe::align_padded_size(S, num_experts, block_m);
  auto opts = topk_ids.options().dtype(at::kInt);
  at::Tensor sorted = at::empty({P}, opts);
  at::Tensor tiles = at::empty({P / block_m}, opts);
  at::Tensor num_padded = at::empty({1}, opts);
  const size_t ws_bytes = MoeAlignWorkspaceBytes(S, num_experts);
  at::Tensor ws = at::empty({static_cast<int64_t>(ws_bytes)}, topk_ids.options().dtype(at::kByte));
  const int32_t* mp = map_c.defined() ? map_c.const_data_ptr<int32_t>() : nullptr;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  C10_CUDA_CHECK(MoeAlignLaunch(ids.scalar_type() == at::kLong, ids.const_data_ptr(), S,
                                num_experts, block_m, mp, sorted.data_ptr<int32_t>(),
                                tiles.data_ptr<int32_t>(), num_padded.data_ptr<int32_t>(),
                                ws.data_ptr(), ws_bytes, stream));
  return {sorted, tiles, num_padded};
}

#undef TS_CHECK

}  // namespace
}  // namespace tasksieve

TORCH_LIBRARY_IMPL(tasksieve, CUDA, m) {
  m.impl("tcess_update", &tasksieve::tcess_update_cuda);
  m.impl("route_topk", &tasksieve::route_topk_cuda);
  m.impl("moe_align", &tasksieve::moe_align_cuda);
}
