// CUDA bindings of the WindowKV ops (schemas in csrc/ops.cpp): argument checks, device guard,
// current stream, dtype dispatch to the torch-free kernels in include/tasksieve/, error check.
//
//   window_scores   q_obs [B, A, H, D], k [B, N, Hk, D] (fp32/fp16/bf16) -> fp32 [B, Hk, nw]
//   select_windows  scores fp32 [B, Hk, nw] -> int32 [B, Hk, min(keep, nw)], ascending
//   gather_windows  kv [B, Hk, N, D_i]..., idx int32 [B, Hk, keep] -> [B, Hk, keep*w + tail, D_i]
//   gather_windows_ the same, in place into the first keep*w + tail positions
//
// Nothing here syncs with the host. Hence, unlike the CPU ops, values inside device tensors are
// not validated: kv_start is clamped into [0, N - A], and an invalid window index in idx is
// gathered as zeros (never an out-of-bounds access). Empty problems return valid empty outputs
// without launching.
#include <ATen/MemoryOverlap.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <optional>
#include <string_view>
#include <vector>

#include "../checks/kv_window_checks.h"
#include "tasksieve/gather_windows.cuh"
#include "tasksieve/select_windows.cuh"
#include "tasksieve/window_index.h"
#include "tasksieve/window_scores.cuh"

namespace tasksieve {
namespace {

DType to_dtype(at::ScalarType t) {  // the checks accepted fp32, fp16 or bf16 only
  return t == at::kFloat ? DType::kFloat32 : t == at::kHalf ? DType::kFloat16 : DType::kBFloat16;
}

at::Tensor window_scores_cuda(const at::Tensor& q_obs, const at::Tensor& k, int64_t window,
                              c10::string_view reduce, std::optional<double> scale,
                              const std::optional<at::Tensor>& kv_start) {
  checks::check_window_scores_ranks(q_obs, k);
  TORCH_CHECK(q_obs.is_cuda(), "tasksieve.window_scores: q_obs must be a CUDA tensor here, got ",
              q_obs.device());
  checks::check_window_scores_same_device(q_obs, k);
  checks::check_window_scores_dtypes(q_obs, k);
  const auto dt = q_obs.scalar_type();
  const checks::WindowScoresDims dims =
      checks::check_window_scores_args(q_obs, k, window, reduce, scale);
  const int64_t B = dims.B, A = dims.A, H = dims.H, D = dims.D, N = dims.N, Hk = dims.Hk;
  at::Tensor start;
  if (kv_start.has_value()) {
    const at::Tensor& ks = *kv_start;
    checks::check_window_scores_kv_start(ks, q_obs, B);
    start = ks.contiguous();
  }

  c10::cuda::CUDAGuard guard(q_obs.device());
  const int64_t nw = window::num_windows(N, A, window);
  at::Tensor out = at::empty({B, Hk, nw}, q_obs.options().dtype(at::kFloat));
  if (out.numel() == 0) return out;
  const size_t ws_bytes = WindowScoresWorkspaceBytes(B, A, H, Hk, N, window);
  at::Tensor ws = at::empty({static_cast<int64_t>(ws_bytes)}, q_obs.options().dtype(at::kByte));
  const float sc =
      scale.has_value() ? static_cast<float>(*scale) : WindowScoresDefaultScale(D);
  const int32_t* ks_ptr = start.defined() ? start.const_data_ptr<int32_t>() : nullptr;
  C10_CUDA_CHECK(WindowScoresLaunch(
      to_dtype(dt), q_obs.const_data_ptr(), k.const_data_ptr(), ks_ptr, out.data_ptr<float>(),
      ws.data_ptr(), ws_bytes, B, A, H, Hk, N, D, window, q_obs.stride(0), q_obs.stride(1),
      q_obs.stride(2), k.stride(0), k.stride(1), k.stride(2), sc, reduce == "max",
      c10::cuda::getCurrentCUDAStream()));
  return out;
}

at::Tensor select_windows_cuda(const at::Tensor& scores, int64_t keep, bool share) {
  TORCH_CHECK(scores.dim() == 3,
              "tasksieve.select_windows: scores must be a 3-D tensor [B, Hk, nw], got shape ",
              scores.sizes());
  TORCH_CHECK(scores.scalar_type() == at::kFloat,
              "tasksieve.select_windows: scores must be float32, got ", scores.scalar_type());
  TORCH_CHECK(scores.is_cuda(), "tasksieve.select_windows: scores must be a CUDA tensor here, got ",
              scores.device());
  TORCH_CHECK(keep >= 0, "tasksieve.select_windows: keep must be >= 0, got ", keep);
  const int64_t B = scores.size(0), Hk = scores.size(1), nw = scores.size(2);
  TORCH_CHECK(nw <= INT32_MAX, "tasksieve.select_windows: scores must have at most 2^31 - 1 "
              "windows (int32 indices), got nw=", nw);
  const int64_t kk = std::min(keep, nw);
  c10::cuda::CUDAGuard guard(scores.device());
  at::Tensor out = at::empty({B, Hk, kk}, scores.options().dtype(at::kInt));
  if (out.numel() == 0) return out;
  const at::Tensor sc = scores.contiguous();
  C10_CUDA_CHECK(SelectWindows(sc.const_data_ptr<float>(), out.data_ptr<int32_t>(), B, Hk, nw, kk,
                               share, c10::cuda::getCurrentCUDAStream()));
  return out;
}

// Shared checks of gather_windows / gather_windows_ (no idx values: they live on the device).
void check_gather(const char* op, at::TensorList kv, const at::Tensor& idx, int64_t window,
                  int64_t tail, bool inplace) {
  checks::check_gather_kv_not_empty(op, kv);
  const at::Tensor& ref = kv[0];
  for (size_t i = 0; i < kv.size(); ++i) checks::check_gather_kv_entry(op, kv, i);
  if (inplace) checks::check_gather_inplace_no_overlap(op, kv);
  TORCH_CHECK(ref.is_cuda(), "tasksieve.", op, ": kv must hold CUDA tensors here, got ",
              ref.device());
  checks::check_gather_idx(op, ref, idx, window, tail);
  if (inplace) {
    const int64_t N = ref.size(2);
    const int64_t keep = idx.size(2);
    TORCH_CHECK(keep <= (N - tail) / window, "tasksieve.", op,
                ": keep*window + tail must be <= N for the in-place gather (keep=", keep,
                ", window=", window, ", tail=", tail, ", N=", N, ")");
  }
}

// In place (dst == nullptr) each descriptor's dst is its src (ignored by the kernel).
std::vector<GatherDesc> make_descs(at::TensorList src, const std::vector<at::Tensor>* dst) {
  std::vector<GatherDesc> descs(src.size());
  for (size_t i = 0; i < src.size(); ++i) {
    const at::Tensor& s = src[i];
    const at::Tensor& d = dst ? (*dst)[i] : s;
    // data_ptr() of s in place: the kernel writes into s
    descs[i] = MakeGatherDesc(dst ? s.const_data_ptr() : s.data_ptr(), s.stride(0), s.stride(1),
                              s.stride(2), d.data_ptr(), d.stride(0), d.stride(1), d.stride(2),
                              s.size(3), static_cast<int64_t>(s.element_size()));
  }
  return descs;
}

std::vector<at::Tensor> gather_windows_cuda(at::TensorList kv, const at::Tensor& idx,
                                            int64_t window, int64_t tail) {
  check_gather("gather_windows", kv, idx, window, tail, /*inplace=*/false);
  c10::cuda::CUDAGuard guard(kv[0].device());
  const int64_t B = kv[0].size(0), Hk = kv[0].size(1), N = kv[0].size(2), keep = idx.size(2);
  const int64_t L = window::gathered_len(keep, window, tail);
  std::vector<at::Tensor> out;
  out.reserve(kv.size());
  for (const at::Tensor& t : kv)
    out.push_back(at::empty({t.size(0), t.size(1), L, t.size(3)}, t.options()));
  if (B == 0 || Hk == 0 || L == 0) return out;
  const at::Tensor ic = idx.contiguous();
  const std::vector<GatherDesc> descs = make_descs(kv, &out);
  C10_CUDA_CHECK(GatherWindows(descs.data(), static_cast<int64_t>(descs.size()),
                               ic.const_data_ptr<int32_t>(), B, Hk, N, keep, window, tail,
                               c10::cuda::getCurrentCUDAStream()));
  return out;
}

void gather_windows__cuda(at::TensorList kv, const at::Tensor& idx, int64_t window,
                          int64_t tail) {
  check_gather("gather_windows_", kv, idx, window, tail, /*inplace=*/true);
  c10::cuda::CUDAGuard guard(kv[0].device());
  const int64_t B = kv[0].size(0), Hk = kv[0].size(1), N = kv[0].size(2), keep = idx.size(2);
  if (B == 0 || Hk == 0 || window::gathered_len(keep, window, tail) == 0) return;
  const at::Tensor ic = idx.contiguous();
  const std::vector<GatherDesc> descs = make_descs(kv, nullptr);
  C10_CUDA_CHECK(GatherWindowsInplace(descs.data(), static_cast<int64_t>(descs.size()),
                                      ic.const_data_ptr<int32_t>(), B, Hk, N, keep, window, tail,
                                      c10::cuda::getCurrentCUDAStream()));
}

}  // namespace
}  // namespace tasksieve

TORCH_LIBRARY_IMPL(tasksieve, CUDA, m) {
  m.impl("window_scores", &tasksieve::window_scores_cuda);
  m.impl("select_windows", &tasksieve::select_windows_cuda);
  m.impl("gather_windows", &tasksieve::gather_windows_cuda);
  m.impl("gather_windows_", &tasksieve::gather_windows__cuda);
}
