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

#include "tasksieve/gather_windows.cuh"
#include "tasksieve/select_windows.cuh"
#include "tasksieve/window_index.h"
#include "tasksieve/window_scores.cuh"

namespace tasksieve {
namespace {

constexpr int64_t kMaxHeadDim = 256;

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
  TORCH_CHECK(q_obs.dim() == 4,
              "tasksieve.window_scores: q_obs must be a 4-D tensor [B, A, H, D], got shape ",
              q_obs.sizes());
  TORCH_CHECK(k.dim() == 4,
              "tasksieve.window_scores: k must be a 4-D tensor [B, N, Hk, D], got shape ",
              k.sizes());
  TORCH_CHECK(q_obs.is_cuda(), "tasksieve.window_scores: q_obs must be a CUDA tensor here, got ",
              q_obs.device());
  TORCH_CHECK(k.device() == q_obs.device(),
              "tasksieve.window_scores: k must be on the device of q_obs (", q_obs.device(),
              "), got ", k.device());
  const auto dt = q_obs.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16,
              "tasksieve.window_scores: q_obs must be float32, float16 or bfloat16, got ", dt);
  TORCH_CHECK(k.scalar_type() == dt, "tasksieve.window_scores: k must have the dtype of q_obs (",
              dt, "), got ", k.scalar_type());
  const int64_t B = q_obs.size(0), A = q_obs.size(1), H = q_obs.size(2), D = q_obs.size(3);
  const int64_t N = k.size(1), Hk = k.size(2);
  TORCH_CHECK(k.size(0) == B, "tasksieve.window_scores: k must have the batch size of q_obs (",
              B, "), got ", k.size(0));
  TORCH_CHECK(D >= 1 && D <= kMaxHeadDim,
              "tasksieve.window_scores: q_obs head dim D must be in [1, 256], got ", D);
  TORCH_CHECK(k.size(3) == D, "tasksieve.window_scores: k head dim must equal q_obs head dim (",
              D, "), got ", k.size(3));
  TORCH_CHECK(Hk >= 1 && H % Hk == 0,
              "tasksieve.window_scores: k heads Hk must be >= 1 and divide the q_obs heads H=", H,
              ", got Hk=", Hk);
  TORCH_CHECK(q_obs.stride(3) == 1 || D == 1,
              "tasksieve.window_scores: q_obs must be contiguous in the last dim (stride 1), got "
              "stride ", q_obs.stride(3));
  TORCH_CHECK(k.stride(3) == 1 || D == 1,
              "tasksieve.window_scores: k must be contiguous in the last dim (stride 1), got "
              "stride ", k.stride(3));
  TORCH_CHECK(A >= 1 && A <= N, "tasksieve.window_scores: q_obs length A must be in [1, N=", N,
              "] (N = k.size(1)), got A=", A);
  TORCH_CHECK(window >= 1, "tasksieve.window_scores: window must be >= 1, got ", window);
  TORCH_CHECK(reduce == "max" || reduce == "mean",
              "tasksieve.window_scores: reduce must be 'max' or 'mean', got '",
              std::string_view(reduce.data(), reduce.size()), "'");
  TORCH_CHECK(!scale.has_value() || std::isfinite(*scale),
              "tasksieve.window_scores: scale must be finite, got ", scale.value_or(0.0));
  at::Tensor start;
  if (kv_start.has_value()) {
    const at::Tensor& ks = *kv_start;
    TORCH_CHECK(ks.scalar_type() == at::kInt,
                "tasksieve.window_scores: kv_start must be int32, got ", ks.scalar_type());
    TORCH_CHECK(ks.dim() == 1 && ks.size(0) == B,
                "tasksieve.window_scores: kv_start must have shape [B] = [", B, "], got ",
                ks.sizes());
    TORCH_CHECK(ks.device() == q_obs.device(),
                "tasksieve.window_scores: kv_start must be on the device of q_obs (",
                q_obs.device(), "), got ", ks.device());
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
  TORCH_CHECK(!kv.empty(), "tasksieve.", op,
              ": kv must be a non-empty list of tensors [B, Hk, N, D_i], got an empty list");
  const at::Tensor& ref = kv[0];
  for (size_t i = 0; i < kv.size(); ++i) {
    const at::Tensor& t = kv[i];
    TORCH_CHECK(t.dim() == 4, "tasksieve.", op, ": kv[", i,
                "] must be a 4-D tensor [B, Hk, N, D], got shape ", t.sizes());
    TORCH_CHECK(t.size(0) == ref.size(0) && t.size(1) == ref.size(1) && t.size(2) == ref.size(2),
                "tasksieve.", op, ": kv[", i, "] must have the [B, Hk, N] of kv[0] ",
                ref.sizes().slice(0, 3), ", got ", t.sizes().slice(0, 3));
    TORCH_CHECK(t.scalar_type() == ref.scalar_type(), "tasksieve.", op, ": kv[", i,
                "] must have the dtype of kv[0] (", ref.scalar_type(), "), got ", t.scalar_type());
    TORCH_CHECK(t.device() == ref.device(), "tasksieve.", op, ": kv[", i,
                "] must be on the device of kv[0] (", ref.device(), "), got ", t.device());
    TORCH_CHECK(t.stride(3) == 1 || t.size(3) <= 1, "tasksieve.", op, ": kv[", i,
                "] must be contiguous in the last dim (stride 1), got stride ", t.stride(3));
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
  const int64_t B = ref.size(0), Hk = ref.size(1), N = ref.size(2);
  TORCH_CHECK(idx.dim() == 3, "tasksieve.", op,
              ": idx must be a 3-D tensor [B, Hk, keep], got shape ", idx.sizes());
  TORCH_CHECK(idx.scalar_type() == at::kInt, "tasksieve.", op, ": idx must be int32, got ",
              idx.scalar_type());
  TORCH_CHECK(idx.size(0) == B && idx.size(1) == Hk, "tasksieve.", op,
              ": idx must have shape [B, Hk, keep] with [B, Hk] = [", B, ", ", Hk, "], got ",
              idx.sizes());
  TORCH_CHECK(idx.device() == ref.device(), "tasksieve.", op, ": idx must be on the device of kv (",
              ref.device(), "), got ", idx.device());
  TORCH_CHECK(window >= 1, "tasksieve.", op, ": window must be >= 1, got ", window);
  TORCH_CHECK(tail >= 0 && tail <= N, "tasksieve.", op, ": tail must be in [0, N] = [0, ", N,
              "], got ", tail);
  if (inplace) {
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
