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

template <typename T>
cudaError_t launch_window_scores(const at::Tensor& q, const at::Tensor& k, const int32_t* kv_start,
                                 float* out, void* ws, size_t ws_bytes, int64_t window, float scale,
                                 bool reduce_max, cudaStream_t stream) {
  return WindowScores<T>(static_cast<const T*>(q.const_data_ptr()),
                         static_cast<const T*>(k.const_data_ptr()), kv_start, out, ws, ws_bytes,
                         q.size(0), q.size(1), q.size(2), k.size(2), k.size(1), q.size(3), window,
                         q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1),
                         k.stride(2), scale, reduce_max, stream);
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
  const float sc = static_cast<float>(
      scale.has_value() ? *scale : 1.0 / std::sqrt(static_cast<double>(D)));
  const bool reduce_max = reduce == "max";
  const int32_t* ks_ptr = start.defined() ? start.const_data_ptr<int32_t>() : nullptr;
  float* o = out.data_ptr<float>();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  cudaError_t err;
  switch (dt) {
    case at::kFloat:
      err = launch_window_scores<float>(q_obs, k, ks_ptr, o, ws.data_ptr(), ws_bytes, window, sc,
                                        reduce_max, stream);
      break;
    case at::kHalf:
      err = launch_window_scores<__half>(q_obs, k, ks_ptr, o, ws.data_ptr(), ws_bytes, window, sc,
                                         reduce_max, stream);
      break;
    default:
      err = launch_window_scores<__nv_bfloat16>(q_obs, k, ks_ptr, o, ws.data_ptr(), ws_bytes,
                                                window, sc, reduce_max, stream);
      break;
  }
  C10_CUDA_CHECK(err);
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
  for (size_t i = 0; i < kv.size(); ++i) {
    const at::Tensor& t = kv[i];
    checks::check_gather_kv_entry(op, kv, i);
    if (inplace) {
      at::assert_no_internal_overlap(t);
      for (size_t j = 0; j < i; ++j)  // the kernel compacts each tensor independently
        TORCH_CHECK(t.numel() == 0 || kv[j].numel() == 0 ||
                        t.const_data_ptr() != kv[j].const_data_ptr(),
                    "tasksieve.", op, ": kv[", j, "] and kv[", i,
                    "] must not share memory for the in-place gather");
    }
  }
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

std::vector<GatherDesc> make_descs(at::TensorList src, const std::vector<at::Tensor>* dst) {
  std::vector<GatherDesc> descs(src.size());
  for (size_t i = 0; i < src.size(); ++i) {
    const at::Tensor& s = src[i];
    const int64_t es = static_cast<int64_t>(s.element_size());
    GatherDesc& g = descs[i];
    g.src = dst ? s.const_data_ptr() : s.data_ptr();  // data_ptr(): in place writes into s
    g.src_stride_b = s.stride(0) * es;
    g.src_stride_h = s.stride(1) * es;
    g.src_stride_n = s.stride(2) * es;
    g.row_bytes = s.size(3) * es;
    const at::Tensor& d = dst ? (*dst)[i] : s;
    g.dst = d.data_ptr();  // in place: the kernel uses src, dst fields are ignored
    g.dst_stride_b = d.stride(0) * es;
    g.dst_stride_h = d.stride(1) * es;
    g.dst_stride_n = d.stride(2) * es;
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
