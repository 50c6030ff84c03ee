// CUDA binding of router_stats_update (schema in csrc/ops.cpp): argument checks, device guard,
// workspace, current stream, then the torch-free entry point RouterStatsLaunch of
// include/tasksieve/router_stats.cuh (dtype dispatch there, shared with the simulator runner
// csrc/sim/sim_premoe.cu), error check.
//
//   router_stats_update  router_logits [T, E] (fp32/fp16/bf16), topk_ids int32/int64 [T, k];
//                        counts, logit_sum fp64 [E], logit_gram, coselect fp64 [E, E] (+=)
//
// E is at most 1024 here. Nothing syncs with the host: the values of topk_ids are not checked,
// ids outside [0, E) are skipped by the kernel (the CPU op raises on them).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../checks/router_stats_checks.h"
#include "tasksieve/dtype.cuh"
#include "tasksieve/router_stats.cuh"

namespace tasksieve {
namespace {

void router_stats_update_cuda(const at::Tensor& router_logits, const at::Tensor& topk_ids,
                              at::Tensor counts, at::Tensor logit_sum, at::Tensor logit_gram,
                              at::Tensor coselect) {
  checks::check_router_stats_update_args(router_logits, topk_ids, counts, logit_sum, logit_gram,
                                         coselect);
  TORCH_CHECK(router_logits.is_cuda(),
              "tasksieve.router_stats_update: router_logits must be a CUDA tensor here, got ",
              router_logits.device());
  const int64_t Tn = router_logits.size(0), E = router_logits.size(1);
  constexpr int64_t kMax = router_stats_detail::kMaxExperts;
  TORCH_CHECK(E <= kMax,
              "tasksieve.router_stats_update: E (router_logits.size(1)) must be at most ", kMax,
              " for the CUDA kernel, got ", E);
  c10::cuda::CUDAGuard guard(router_logits.device());
  if (Tn == 0) return;
  const at::Tensor ids = topk_ids.contiguous();
  const auto dt = router_logits.scalar_type();
  const DType dtype = dt == at::kHalf ? DType::kFloat16
                                      : (dt == at::kBFloat16 ? DType::kBFloat16 : DType::kFloat32);
  const size_t ws_bytes = RouterStatsWorkspaceBytes(Tn, E);
  at::Tensor ws = at::empty({static_cast<int64_t>(ws_bytes)},
                            router_logits.options().dtype(at::kByte));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  C10_CUDA_CHECK(RouterStatsLaunch(
      dtype, ids.scalar_type() == at::kLong, router_logits.const_data_ptr(), Tn, E,
      router_logits.stride(0), router_logits.stride(1), ids.const_data_ptr(), ids.size(1),
      counts.data_ptr<double>(), logit_sum.data_ptr<double>(), logit_gram.data_ptr<double>(),
      coselect.data_ptr<double>(), ws.data_ptr(), ws_bytes, stream));
}

}  // namespace
}  // namespace tasksieve

TORCH_LIBRARY_IMPL(tasksieve, CUDA, m) {
  m.impl("router_stats_update", &tasksieve::router_stats_update_cuda);
}
