// CUDA binding of the FlexPrefill block selection op (schema in csrc/ops.cpp): argument checks
// (shapes, dtypes, scalars only: nothing reads device memory on the host), device guard,
// current stream, dispatch to the torch-free kernel in include/tasksieve/select_blocks.cuh.
//
//   select_blocks  vertical, slash [B, H, nb], qa_map [B, H, nbq, nb] (fp32), is_query_aware
//                  bool [B, H] -> (block_idx int32 [B, H, nbq, nb], block_cnt int32 [B, H, nbq])
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <tuple>

#include "tasksieve/flex_index.h"
#include "tasksieve/select_blocks.cuh"

namespace tasksieve {
namespace {

std::tuple<at::Tensor, at::Tensor> select_blocks_cuda(const at::Tensor& vertical,
                                                      const at::Tensor& slash,
                                                      const at::Tensor& qa_map,
                                                      const at::Tensor& is_query_aware,
                                                      int64_t q_len, int64_t kv_len,
                                                      int64_t block_size, double gamma,
                                                      int64_t min_blocks, int64_t max_blocks) {
  TORCH_CHECK(vertical.is_cuda(),
              "tasksieve.select_blocks: vertical must be a CUDA tensor here, got ",
              vertical.device());
  TORCH_CHECK(slash.device() == vertical.device(),
              "tasksieve.select_blocks: slash must be on the device of vertical (",
              vertical.device(), "), got ", slash.device());
  TORCH_CHECK(qa_map.device() == vertical.device(),
              "tasksieve.select_blocks: qa_map must be on the device of vertical (",
              vertical.device(), "), got ", qa_map.device());
  TORCH_CHECK(is_query_aware.device() == vertical.device(),
              "tasksieve.select_blocks: is_query_aware must be on the device of vertical (",
              vertical.device(), "), got ", is_query_aware.device());
  TORCH_CHECK(vertical.scalar_type() == at::kFloat,
              "tasksieve.select_blocks: vertical must be float32, got ", vertical.scalar_type());
  TORCH_CHECK(slash.scalar_type() == at::kFloat,
              "tasksieve.select_blocks: slash must be float32, got ", slash.scalar_type());
  TORCH_CHECK(qa_map.scalar_type() == at::kFloat,
              "tasksieve.select_blocks: qa_map must be float32, got ", qa_map.scalar_type());
  TORCH_CHECK(is_query_aware.scalar_type() == at::kBool,
              "tasksieve.select_blocks: is_query_aware must be bool, got ",
              is_query_aware.scalar_type());
  TORCH_CHECK(block_size >= 1, "tasksieve.select_blocks: block_size must be >= 1, got ",
              block_size);
  TORCH_CHECK(q_len >= 0 && q_len <= kv_len,
              "tasksieve.select_blocks: q_len must be in [0, kv_len=", kv_len,
              "] (queries are the last q_len positions), got q_len=", q_len);
  TORCH_CHECK(std::isfinite(gamma) && gamma > 0.0 && gamma <= 1.0,
              "tasksieve.select_blocks: gamma must be in (0, 1], got ", gamma);
  TORCH_CHECK(min_blocks >= 0, "tasksieve.select_blocks: min_blocks must be >= 0, got ",
              min_blocks);
  TORCH_CHECK(max_blocks >= min_blocks,
              "tasksieve.select_blocks: max_blocks must be >= min_blocks=", min_blocks, ", got ",
              max_blocks);
  const int64_t nb = flex::num_blocks(kv_len, block_size);
  const int64_t nbq = flex::num_blocks(q_len, block_size);
  TORCH_CHECK(vertical.dim() == 3 && vertical.size(2) == nb,
              "tasksieve.select_blocks: vertical must have shape [B, H, nb] with nb = "
              "ceil(kv_len / block_size) = ", nb, ", got ", vertical.sizes());
  const int64_t B = vertical.size(0), H = vertical.size(1);
  TORCH_CHECK(slash.sizes() == vertical.sizes(),
              "tasksieve.select_blocks: slash must have the shape of vertical (",
              vertical.sizes(), "), got ", slash.sizes());
  TORCH_CHECK(qa_map.dim() == 4 && qa_map.size(0) == B && qa_map.size(1) == H &&
                  qa_map.size(2) == nbq && qa_map.size(3) == nb,
              "tasksieve.select_blocks: qa_map must have shape [B, H, nbq, nb] = [", B, ", ", H,
              ", ", nbq, ", ", nb, "] (nbq = ceil(q_len / block_size)), got ", qa_map.sizes());
  TORCH_CHECK(is_query_aware.dim() == 2 && is_query_aware.size(0) == B &&
                  is_query_aware.size(1) == H,
              "tasksieve.select_blocks: is_query_aware must have shape [B, H] = [", B, ", ", H,
              "], got ", is_query_aware.sizes());
  TORCH_CHECK(nbq * nb <= static_cast<int64_t>(UINT32_MAX),
              "tasksieve.select_blocks: nbq * nb must be < 2^32, got ", nbq * nb);

  c10::cuda::CUDAGuard guard(vertical.device());
  auto iopts = vertical.options().dtype(at::kInt);
  at::Tensor idx = at::empty({B, H, nbq, nb}, iopts);
  at::Tensor cnt = at::empty({B, H, nbq}, iopts);
  if (idx.numel() == 0) {
    cnt.zero_();
    return {idx, cnt};
  }
  const at::Tensor vc = vertical.contiguous(), sc = slash.contiguous(),
                   mc = qa_map.contiguous(), qc = is_query_aware.contiguous();
  C10_CUDA_CHECK(SelectBlocks<float>(
      vc.const_data_ptr<float>(), sc.const_data_ptr<float>(), mc.const_data_ptr<float>(),
      qc.const_data_ptr<bool>(), idx.data_ptr<int32_t>(), cnt.data_ptr<int32_t>(), B * H, q_len,
      kv_len, block_size, gamma, min_blocks, max_blocks, c10::cuda::getCurrentCUDAStream()));
  return {idx, cnt};
}

}  // namespace

TORCH_LIBRARY_IMPL(tasksieve, CUDA, m) { m.impl("select_blocks", &select_blocks_cuda); }

}  // namespace tasksieve
