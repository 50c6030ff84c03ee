// CUDA bindings of the PreMoe expert GEMM ops (schemas in csrc/ops.cpp): argument checks,
// device guard, current stream, dtype dispatch to include/tasksieve/expert_gemm.cuh.
//
//   expert_gemm  x [T, K] / [T*top_k, K], w [E_c, N, K] (fp16/bf16, K % 8 == 0), moe_align's
//                sorted_ids / tile_expert / num_padded (block_m 16, 32 or 64) -> y [T*top_k, N_out]
//   moe_forward  moe_align (through the dispatcher) -> expert_gemm(gather, silu_mul) into
//                h [T*k, I] -> expert_gemm(h, w2, router weight) into y [T*k, H] -> sum over k
//
// Nothing here syncs with the host: num_padded is read by the kernels on the device, so the
// values inside the index tensors are not validated here; tiles past num_padded or with an
// expert outside [0, E_c) are skipped and slot ids outside [0, T*top_k) are padding (never an
// out-of-bounds access). The CPU ops raise on such values instead. float32 is CPU-only: the
// CUDA kernels are tensor-core (WMMA fp16/bf16) kernels, and fp32 inputs get a clear error.
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <optional>
#include <tuple>

#include "../checks/moe_gemm_checks.h"
#include "tasksieve/common.h"
#include "tasksieve/expert_gemm.cuh"
#include "tasksieve/expert_gemm_index.h"

namespace tasksieve {
namespace {

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

// OutT = T writes y in the input dtype; float keeps moe_forward's slot rows unrounded.
template <typename T, typename OutT = T>
void launch_expert_gemm(const at::Tensor& x, const at::Tensor& w, const at::Tensor& ids,
                        const at::Tensor& tiles, const at::Tensor& np, const float* weights,
                        at::Tensor& y, int64_t S, int64_t block_m, int64_t top_k, bool gather,
                        bool silu_mul, cudaStream_t stream) {
  const cudaError_t err = ExpertGemm<T, OutT>(
      static_cast<const T*>(x.const_data_ptr()), static_cast<const T*>(w.const_data_ptr()),
      ids.const_data_ptr<int32_t>(), tiles.const_data_ptr<int32_t>(),
      np.const_data_ptr<int32_t>(), weights, static_cast<OutT*>(y.data_ptr()), S, x.size(1),
      w.size(1), w.size(0), ids.size(0), block_m, top_k, gather, silu_mul, stream);
  C10_CUDA_CHECK(err);
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
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  if (x.scalar_type() == at::kHalf) {
    launch_expert_gemm<__half>(xc, wc, ids, tiles, np, wp, y, d.S, block_m, top_k, gather,
                               d.silu_mul, stream);
  } else {
    launch_expert_gemm<__nv_bfloat16>(xc, wc, ids, tiles, np, wp, y, d.S, block_m, top_k,
                                      gather, d.silu_mul, stream);
  }
  return y;
}

// moe_align is another family's op: called through the dispatcher, not its C++ symbols.
std::tuple<at::Tensor, at::Tensor, at::Tensor> moe_align_op(
    const at::Tensor& topk_ids, int64_t num_experts, int64_t block_m,
    const std::optional<at::Tensor>& expert_map) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("tasksieve::moe_align", "")
          .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
              const at::Tensor&, int64_t, int64_t, const std::optional<at::Tensor>&)>();
  return op.call(topk_ids, num_experts, block_m, expert_map);
}

template <typename T>
void launch_combine(const at::Tensor& y, at::Tensor& out, int64_t T_, int64_t k, int64_t H,
                    cudaStream_t stream) {
  C10_CUDA_CHECK(MoeCombine<T>(y.const_data_ptr<float>(),
                               static_cast<T*>(out.data_ptr()), T_, k, H, stream));
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

  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor out = at::empty({T, H}, x.options());
  if (T == 0 || H == 0) return out;
  const int64_t block_m = moe::choose_block_m(S, d.E_c);
  const auto [sorted_ids, tile_expert, num_padded] =
      moe_align_op(topk_ids, d.num_experts, block_m, expert_map);
  const int64_t P = moe::padded_size(S, d.num_experts, block_m);
  TORCH_CHECK(sorted_ids.scalar_type() == at::kInt && sorted_ids.dim() == 1 &&
                  sorted_ids.size(0) == P && tile_expert.scalar_type() == at::kInt &&
                  tile_expert.dim() == 1 && tile_expert.size(0) == P / block_m &&
                  num_padded.scalar_type() == at::kInt && num_padded.numel() == 1,
              "tasksieve.moe_forward: moe_align returned an unexpected layout (sorted_ids ",
              sorted_ids.sizes(), ", tile_expert ", tile_expert.sizes(), ", expected [", P,
              "] and [", P / block_m, "])");
  TORCH_CHECK(P / block_m <= 2147483647LL, "tasksieve.moe_forward: too many tiles (", P / block_m,
              ")");

  const at::Tensor xc = aligned_contiguous(x), w13c = aligned_contiguous(w13),
                   w2c = aligned_contiguous(w2);
  const at::Tensor ids = sorted_ids.contiguous(), tiles = tile_expert.contiguous(),
                   np = num_padded.contiguous();
  const at::Tensor wts = topk_weights.to(at::kFloat).contiguous();
  // h rows of dropped slots are never read (the down GEMM walks the same tiles); y rows of
  // dropped slots must read as 0 in the combine. y is fp32 so each output is rounded once,
  // after the sum over the k slots, as on the CPU (k rounded terms could cancel badly).
  at::Tensor h = at::empty({S, I}, x.options());
  at::Tensor y = at::zeros({S, H}, x.options().dtype(at::kFloat));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  if (x.scalar_type() == at::kHalf) {
    launch_expert_gemm<__half>(xc, w13c, ids, tiles, np, nullptr, h, S, block_m, k, true, true,
                               stream);
    launch_expert_gemm<__half, float>(h, w2c, ids, tiles, np, wts.const_data_ptr<float>(), y, S,
                                      block_m, k, false, false, stream);
    launch_combine<__half>(y, out, T, k, H, stream);
  } else {
    launch_expert_gemm<__nv_bfloat16>(xc, w13c, ids, tiles, np, nullptr, h, S, block_m, k, true,
                                      true, stream);
    launch_expert_gemm<__nv_bfloat16, float>(h, w2c, ids, tiles, np, wts.const_data_ptr<float>(),
                                             y, S, block_m, k, false, false, stream);
    launch_combine<__nv_bfloat16>(y, out, T, k, H, stream);
  }
  return out;
}

}  // namespace
}  // namespace tasksieve

TORCH_LIBRARY_IMPL(tasksieve, CUDA, m) {
  m.impl("expert_gemm", &tasksieve::expert_gemm_cuda);
  m.impl("moe_forward", &tasksieve::moe_forward_cuda);
}
