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

#include "../checks/flexprefill_checks.h"
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
  const checks::SelectBlocksDims dims = checks::check_select_blocks_args(
      vertical, slash, qa_map, is_query_aware, q_len, kv_len, block_size, gamma, min_blocks,
      max_blocks);
  const int64_t B = dims.B, H = dims.H, nb = dims.nb, nbq = dims.nbq;

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
