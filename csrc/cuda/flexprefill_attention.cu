// CUDA binding of block_sparse_attention (schema in csrc/ops.cpp): argument checks, device
// guard, allocation, current stream, then BlockSparseAttention(Varlen)Launch in
// include/tasksieve/block_sparse_attention.cuh (dtype dispatch there, shared with the simulator
// runner csrc/sim/sim_flexprefill.cu).
//
//   q [B, Nq, H, D], k/v [B, Nk, Hk, D] (fp16/bf16, D 64 or 128), block_idx int32
//   [B, H, nbq, max_k], block_cnt int32 [B, H, nbq] -> out [B, Nq, H, D], lse fp32 [B, H, Nq]
//
//   packed varlen: cu_seqlens_q/_k int32 [S + 1], q [1, total_q, H, D], k/v [1, total_k, Hk, D],
//   block_idx [S, H, nbq_max, max_k], block_cnt [S, H, nbq_max]
//
//   paged KV (block_sparse_attention_paged): k_cache/v_cache [num_pages, page_size, Hk, D] any
//   strides, block_table int32 [S, max_pages], seq_lens_k [S], q [S, Nq, H, D] or packed with
//   cu_seqlens_q [S + 1]; out / lse start as 0 / -inf (values are clamped, never validated)
//
// Nothing here syncs with the host, so values inside block_idx/block_cnt and cu_seqlens are not
// validated: counts are clamped into [0, max_k], out-of-range columns are skipped and offsets
// are clamped by the kernel (never an out-of-bounds access). In varlen mode out/lse start as
// 0/-inf so rows that malformed offsets leave uncovered stay defined. The CPU op raises on all
// of these instead.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>
#include <limits>
#include <optional>
#include <tuple>

#include "../checks/flexprefill_checks.h"
#include "tasksieve/block_index.h"
#include "tasksieve/block_sparse_attention.cuh"

namespace tasksieve {
namespace {

#define TS_CHECK(cond, ...) \
  TORCH_CHECK(cond, "tasksieve.block_sparse_attention: ", __VA_ARGS__)

DType to_dtype(at::ScalarType t) {  // the checks accepted fp16 or bf16 only
  return t == at::kHalf ? DType::kFloat16 : DType::kBFloat16;
}

std::tuple<at::Tensor, at::Tensor> block_sparse_attention_cuda(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& block_idx,
    const at::Tensor& block_cnt, int64_t block_size, std::optional<double> scale_opt,
    bool causal, const std::optional<at::Tensor>& cu_seqlens_q,
    const std::optional<at::Tensor>& cu_seqlens_k) {
  checks::check_block_sparse_attention_ranks(q, k, v);
  TS_CHECK(q.is_cuda(), "q must be a CUDA tensor here, got ", q.device());
  const checks::BlockSparseAttentionDims d = checks::check_block_sparse_attention_args(
      q, k, v, block_idx, block_cnt, block_size, cu_seqlens_q, cu_seqlens_k,
      [](at::ScalarType dt) {
        TS_CHECK(dt == at::kHalf || dt == at::kBFloat16,
                 "q must be float16 or bfloat16 on CUDA, got ", dt);
      },
      [](int64_t D) {
        TS_CHECK(D == 64 || D == 128, "q head dim D must be 64 or 128 on CUDA, got ", D);
      });
  const auto dt = q.scalar_type();
  const int64_t B = d.B, Nq = d.Nq, H = d.H, D = d.D;
  const double scale = scale_opt.has_value() ? *scale_opt : 1.0 / std::sqrt(double(D));
  TS_CHECK(std::isfinite(scale), "scale must be finite, got ", scale);

  const c10::cuda::CUDAGuard guard(q.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  if (d.varlen) {
    at::Tensor out = at::zeros({B, Nq, H, D}, q.options());
    at::Tensor lse = at::full({B, H, Nq}, -std::numeric_limits<float>::infinity(),
                              q.options().dtype(at::kFloat));
    if (Nq == 0 || H == 0 || d.S == 0) return {out, lse};
    const at::Tensor idx = block_idx.contiguous();
    const at::Tensor cnt = block_cnt.contiguous();
    const at::Tensor cu_q = cu_seqlens_q->contiguous();
    const at::Tensor cu_k = cu_seqlens_k->contiguous();
    C10_CUDA_CHECK(BlockSparseAttentionVarlenLaunch(
        to_dtype(dt), q.const_data_ptr(), k.const_data_ptr(), v.const_data_ptr(),
        idx.const_data_ptr<int32_t>(), cnt.const_data_ptr<int32_t>(),
        cu_q.const_data_ptr<int32_t>(), cu_k.const_data_ptr<int32_t>(), out.data_ptr(),
        lse.data_ptr<float>(), idx.size(0), q.size(1), k.size(1), q.size(2), k.size(2),
        q.size(3), idx.size(3), idx.size(2), block_size, q.stride(1), q.stride(2), k.stride(1),
        k.stride(2), v.stride(1), v.stride(2), float(scale), causal, stream));
    return {out, lse};
  }
  at::Tensor out = at::empty({B, Nq, H, D}, q.options());
  at::Tensor lse = at::empty({B, H, Nq}, q.options().dtype(at::kFloat));
  if (B == 0 || Nq == 0 || H == 0) return {out, lse};
  const at::Tensor idx = block_idx.contiguous();
  const at::Tensor cnt = block_cnt.contiguous();
  C10_CUDA_CHECK(BlockSparseAttentionLaunch(
      to_dtype(dt), q.const_data_ptr(), k.const_data_ptr(), v.const_data_ptr(),
      idx.const_data_ptr<int32_t>(), cnt.const_data_ptr<int32_t>(), out.data_ptr(),
      lse.data_ptr<float>(), q.size(0), q.size(1), k.size(1), q.size(2), k.size(2), q.size(3),
      idx.size(3), block_size, q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1),
      k.stride(2), v.stride(0), v.stride(1), v.stride(2), float(scale), causal, stream));
  return {out, lse};
}

// block_sparse_attention_paged: K/V through the block table (BlockSparseAttentionPagedLaunch).
// Values inside block_table, seq_lens_k, cu_seqlens_q and the index are not validated (no host
// sync): the kernel clamps them (paged_index.h) and out / lse start as 0 / -inf.
std::tuple<at::Tensor, at::Tensor> block_sparse_attention_paged_cuda(
    const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
    const at::Tensor& block_table, const at::Tensor& seq_lens_k, const at::Tensor& block_idx,
    const at::Tensor& block_cnt, int64_t block_size, std::optional<double> scale_opt,
    bool causal, const std::optional<at::Tensor>& cu_seqlens_q) {
  const char* opn = "block_sparse_attention_paged";
  checks::check_paged_ranks(opn, q, k_cache, &v_cache);
  TORCH_CHECK(q.is_cuda(), "tasksieve.", opn, ": q must be a CUDA tensor here, got ", q.device());
  const checks::PagedDims d = checks::check_paged_args(
      opn, q, k_cache, &v_cache, block_table, seq_lens_k, cu_seqlens_q,
      [&](at::ScalarType dt) {
        TORCH_CHECK(dt == at::kHalf || dt == at::kBFloat16, "tasksieve.", opn,
                    ": q must be float16 or bfloat16 on CUDA, got ", dt);
      },
      [&](int64_t D) {
        TORCH_CHECK(D == 64 || D == 128, "tasksieve.", opn,
                    ": q head dim D must be 64 or 128 on CUDA, got ", D);
      });
  const auto [nbq, max_k] =
      checks::check_paged_index_args(opn, d, q, block_idx, block_cnt, block_size);
  const double scale = scale_opt.has_value() ? *scale_opt : 1.0 / std::sqrt(double(d.D));
  TORCH_CHECK(std::isfinite(scale), "tasksieve.", opn, ": scale must be finite, got ", scale);

  const c10::cuda::CUDAGuard guard(q.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  at::Tensor out = at::zeros({d.B, d.Nq, d.H, d.D}, q.options());
  at::Tensor lse = at::full({d.B, d.H, d.Nq}, -std::numeric_limits<float>::infinity(),
                            q.options().dtype(at::kFloat));
  if (d.Nq == 0 || d.H == 0 || d.S == 0 || nbq == 0) return {out, lse};
  const at::Tensor table = block_table.contiguous();
  const at::Tensor lens = seq_lens_k.contiguous();
  const at::Tensor idx = block_idx.contiguous();
  const at::Tensor cnt = block_cnt.contiguous();
  at::Tensor cu;
  if (d.packed) cu = cu_seqlens_q->contiguous();
  C10_CUDA_CHECK(BlockSparseAttentionPagedLaunch(
      to_dtype(q.scalar_type()), q.const_data_ptr(), k_cache.const_data_ptr(),
      v_cache.const_data_ptr(), table.const_data_ptr<int32_t>(), lens.const_data_ptr<int32_t>(),
      d.packed ? cu.const_data_ptr<int32_t>() : nullptr, idx.const_data_ptr<int32_t>(),
      cnt.const_data_ptr<int32_t>(), out.data_ptr(), lse.data_ptr<float>(), d.S, d.Nq, d.H,
      d.Hk, d.D, d.num_pages, d.page_size, d.max_pages, max_k, nbq, block_size, q.stride(0),
      q.stride(1), q.stride(2), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
      v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), float(scale), causal, stream));
  return {out, lse};
}

#undef TS_CHECK

}  // namespace
}  // namespace tasksieve

TORCH_LIBRARY_IMPL(tasksieve, CUDA, m) {
  m.impl("block_sparse_attention", &tasksieve::block_sparse_attention_cuda);
  m.impl("block_sparse_attention_paged", &tasksieve::block_sparse_attention_paged_cuda);
}
