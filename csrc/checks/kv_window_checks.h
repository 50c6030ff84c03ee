// Argument checks of the WindowKV torch glue (schemas in csrc/ops.cpp), shared by the CPU
// (csrc/cpu/kv_window.cpp) and CUDA (csrc/cuda/kv_window.cu) bindings so both reject the same
// inputs with the same messages. Torch-dependent, hence not under csrc/include/.
//
// Only the checks that both ops make are here. Each caller keeps its device-kind check (is_cpu /
// is_cuda) and its own extra checks (the CPU ops validate values inside kv_start and idx; the
// CUDA in-place gather checks its output length), and calls these pieces in the order it always
// checked, so the first error reported is unchanged.
#pragma once

#include <ATen/MemoryOverlap.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <c10/util/string_view.h>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <numeric>
#include <optional>
#include <string_view>
#include <utility>
#include <vector>

namespace tasksieve {
namespace checks {

// TORCH_CHECK with the "tasksieve.<op>: " prefix every message of the library carries.
#define TS_KVW_CHECK(cond, op, ...) TORCH_CHECK(cond, "tasksieve.", op, ": ", __VA_ARGS__)

// ---------------------------------------------------------------------------------------------
// window_scores: q_obs [B, A, H, D], k [B, N, Hk, D] (fp32/fp16/bf16), kv_start int32 [B].
// The CPU op checks ranks, dtypes, device kind, same device; the CUDA op ranks, device kind,
// same device, dtypes; then both check_window_scores_args and check_window_scores_kv_start.
// ---------------------------------------------------------------------------------------------

inline void check_window_scores_ranks(const at::Tensor& q_obs, const at::Tensor& k) {
  const char* op = "window_scores";
  TS_KVW_CHECK(q_obs.dim() == 4, op, "q_obs must be a 4-D tensor [B, A, H, D], got shape ",
               q_obs.sizes());
  TS_KVW_CHECK(k.dim() == 4, op, "k must be a 4-D tensor [B, N, Hk, D], got shape ", k.sizes());
}

inline void check_window_scores_dtypes(const at::Tensor& q_obs, const at::Tensor& k) {
  const char* op = "window_scores";
  const auto dt = q_obs.scalar_type();
  TS_KVW_CHECK(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16, op,
               "q_obs must be float32, float16 or bfloat16, got ", dt);
  TS_KVW_CHECK(k.scalar_type() == dt, op, "k must have the dtype of q_obs (", dt, "), got ",
               k.scalar_type());
}

inline void check_window_scores_same_device(const at::Tensor& q_obs, const at::Tensor& k) {
  TS_KVW_CHECK(k.device() == q_obs.device(), "window_scores", "k must be on the device of q_obs (",
               q_obs.device(), "), got ", k.device());
}

struct WindowScoresDims {
  int64_t B, A, H, D, N, Hk;
};

inline WindowScoresDims check_window_scores_args(const at::Tensor& q_obs, const at::Tensor& k,
                                                 int64_t window, c10::string_view reduce,
                                                 std::optional<double> scale) {
  const char* op = "window_scores";
  const int64_t B = q_obs.size(0), A = q_obs.size(1), H = q_obs.size(2), D = q_obs.size(3);
  const int64_t N = k.size(1), Hk = k.size(2);
  TS_KVW_CHECK(k.size(0) == B, op, "k must have the batch size of q_obs (", B, "), got ",
               k.size(0));
  TS_KVW_CHECK(D >= 1 && D <= 256, op, "q_obs head dim D must be in [1, 256], got ", D);
  TS_KVW_CHECK(k.size(3) == D, op, "k head dim must equal q_obs head dim (", D, "), got ",
               k.size(3));
  TS_KVW_CHECK(H >= 1, op, "q_obs heads H must be >= 1, got H=", H);
  TS_KVW_CHECK(Hk >= 1 && H % Hk == 0, op,
               "k heads Hk must be >= 1 and divide the q_obs heads H=", H, ", got Hk=", Hk);
  TS_KVW_CHECK(q_obs.stride(3) == 1 || D == 1, op,
               "q_obs must be contiguous in the last dim (stride 1), got stride ",
               q_obs.stride(3));
  TS_KVW_CHECK(k.stride(3) == 1 || D == 1, op,
               "k must be contiguous in the last dim (stride 1), got stride ", k.stride(3));
  TS_KVW_CHECK(A >= 1 && A <= N, op, "q_obs length A must be in [1, N=", N,
               "] (N = k.size(1)), got A=", A);
  TS_KVW_CHECK(window >= 1, op, "window must be >= 1, got ", window);
  TS_KVW_CHECK(reduce == "max" || reduce == "mean", op, "reduce must be 'max' or 'mean', got '",
               std::string_view(reduce.data(), reduce.size()), "'");
  TS_KVW_CHECK(!scale.has_value() || std::isfinite(*scale), op, "scale must be finite, got ",
               scale.value_or(0.0));
  return {B, A, H, D, N, Hk};
}

// dtype, shape and device of kv_start (its values are the caller's: the CPU op validates them,
// the CUDA kernel clamps them).
inline void check_window_scores_kv_start(const at::Tensor& ks, const at::Tensor& q_obs,
                                         int64_t B) {
  const char* op = "window_scores";
  TS_KVW_CHECK(ks.scalar_type() == at::kInt, op, "kv_start must be int32, got ",
               ks.scalar_type());
  TS_KVW_CHECK(ks.dim() == 1 && ks.size(0) == B, op, "kv_start must have shape [B] = [", B,
               "], got ", ks.sizes());
  TS_KVW_CHECK(ks.device() == q_obs.device(), op, "kv_start must be on the device of q_obs (",
               q_obs.device(), "), got ", ks.device());
}

// ---------------------------------------------------------------------------------------------
// gather_windows / gather_windows_: kv [B, Hk, N, D_i]..., idx int32 [B, Hk, keep]. Order:
//   check_gather_kv_not_empty; per i: check_gather_kv_entry (+ the caller's per-entry checks);
//   <device-kind check of kv[0]>; check_gather_idx (+ the caller's checks of values / lengths).
// ---------------------------------------------------------------------------------------------

inline void check_gather_kv_not_empty(const char* op, at::TensorList kv) {
  TS_KVW_CHECK(!kv.empty(), op,
               "kv must be a non-empty list of tensors [B, Hk, N, D_i], got an empty list");
}

inline void check_gather_kv_entry(const char* op, at::TensorList kv, size_t i) {
  const at::Tensor& ref = kv[0];
  const at::Tensor& t = kv[i];
  TS_KVW_CHECK(t.dim() == 4, op, "kv[", i, "] must be a 4-D tensor [B, Hk, N, D], got shape ",
               t.sizes());
  TS_KVW_CHECK(t.sizes().slice(0, 3) == ref.sizes().slice(0, 3), op, "kv[", i,
               "] must have the [B, Hk, N] of kv[0] ", ref.sizes().slice(0, 3), ", got ",
               t.sizes().slice(0, 3));
  TS_KVW_CHECK(t.scalar_type() == ref.scalar_type(), op, "kv[", i,
               "] must have the dtype of kv[0] (", ref.scalar_type(), "), got ",
               t.scalar_type());
  TS_KVW_CHECK(t.device() == ref.device(), op, "kv[", i, "] must be on the device of kv[0] (",
               ref.device(), "), got ", t.device());
  TS_KVW_CHECK(t.stride(3) == 1 || t.size(3) <= 1, op, "kv[", i,
               "] must be contiguous in the last dim (stride 1), got stride ", t.stride(3));
}

inline void check_gather_idx(const char* op, const at::Tensor& ref, const at::Tensor& idx,
                             int64_t window, int64_t tail) {
  const int64_t B = ref.size(0), Hk = ref.size(1), N = ref.size(2);
  TS_KVW_CHECK(idx.dim() == 3, op, "idx must be a 3-D tensor [B, Hk, keep], got shape ",
               idx.sizes());
  TS_KVW_CHECK(idx.scalar_type() == at::kInt, op, "idx must be int32, got ", idx.scalar_type());
  TS_KVW_CHECK(idx.size(0) == B && idx.size(1) == Hk, op,
               "idx must have shape [B, Hk, keep] with [B, Hk] = [", B, ", ", Hk, "], got ",
               idx.sizes());
  TS_KVW_CHECK(idx.device() == ref.device(), op, "idx must be on the device of kv (",
               ref.device(), "), got ", idx.device());
  TS_KVW_CHECK(window >= 1, op, "window must be >= 1, got ", window);
  TS_KVW_CHECK(tail >= 0 && tail <= N, op, "tail must be in [0, N] = [0, ", N, "], got ", tail);
}

// ---------------------------------------------------------------------------------------------
// gather_windows_: the entries of kv must not share a byte of memory. The kernels compact every
// (tensor, b, h) slice on its own; two entries with a common byte race (CUDA) or read data the
// other one already moved (CPU). Exact for any strides: an entry [B, Hk, N, D] touches the
// B*Hk*N byte segments [p + b*sb + h*sh + n*sn, + D*elem) (head dim contiguous, checked before).
//   1. extents [lowest, highest byte] disjoint -> fine (separate tensors, batch/head slices);
//   2. every stride of both a multiple of P (gcd) and both segments at most P bytes: bytes of
//      an entry lie at fixed residues mod P, so disjoint residue ranges -> fine (a fused K|V
//      cache [.., 2D] split in the last dim);
//   3. otherwise the merged segments of both are intersected exactly (rare layouts only).
// Called after the per-entry checks; an entry that overlaps itself is refused as before.
// ---------------------------------------------------------------------------------------------
namespace detail {

struct KvSpan {
  int64_t base = 0, lo = 0, hi = 0, row = 0;  // byte addresses; row = D * elem bytes
  int64_t size[3] = {0, 0, 0}, stride[3] = {0, 0, 0};  // [B, Hk, N], byte strides
};

inline KvSpan kv_span(const at::Tensor& t) {
  KvSpan s;
  const int64_t es = static_cast<int64_t>(t.element_size());
  s.base = static_cast<int64_t>(reinterpret_cast<uintptr_t>(t.const_data_ptr()));
  s.row = t.size(3) * es;
  s.lo = s.hi = s.base;
  for (int d = 0; d < 3; ++d) {
    s.size[d] = t.size(d);
    s.stride[d] = t.stride(d) * es;
    const int64_t reach = (t.size(d) - 1) * s.stride[d];
    (reach < 0 ? s.lo : s.hi) += reach;
  }
  s.hi += s.row;
  return s;
}

// Sorted, merged byte segments [begin, end) of one entry.
inline std::vector<std::pair<int64_t, int64_t>> kv_segments(const KvSpan& s) {
  std::vector<std::pair<int64_t, int64_t>> seg;
  seg.reserve(static_cast<size_t>(s.size[0] * s.size[1] * s.size[2]));
  for (int64_t b = 0; b < s.size[0]; ++b)
    for (int64_t h = 0; h < s.size[1]; ++h)
      for (int64_t n = 0; n < s.size[2]; ++n) {
        const int64_t p = s.base + b * s.stride[0] + h * s.stride[1] + n * s.stride[2];
        seg.emplace_back(p, p + s.row);
      }
  std::sort(seg.begin(), seg.end());
  size_t m = 0;
  for (size_t i = 0; i < seg.size(); ++i) {
    if (m > 0 && seg[i].first <= seg[m - 1].second) {
      seg[m - 1].second = std::max(seg[m - 1].second, seg[i].second);
    } else {
      seg[m++] = seg[i];
    }
  }
  seg.resize(m);
  return seg;
}

inline bool kv_spans_overlap(const KvSpan& a, const KvSpan& b) {
  if (a.hi <= b.lo || b.hi <= a.lo) return false;  // 1. disjoint extents
  int64_t P = 0;
  for (const KvSpan* s : {&a, &b})
    for (int d = 0; d < 3; ++d)
      if (s->size[d] > 1) P = std::gcd(P, s->stride[d] < 0 ? -s->stride[d] : s->stride[d]);
  if (P > 0 && a.row <= P && b.row <= P) {  // 2. residues mod P
    const int64_t ra = ((a.base % P) + P) % P, rb = ((b.base % P) + P) % P;
    const int64_t ab = ((rb - ra) % P + P) % P, ba = ((ra - rb) % P + P) % P;
    if (ab >= a.row && ba >= b.row) return false;
  }
  const auto sa = kv_segments(a), sb = kv_segments(b);  // 3. exact
  size_t i = 0, j = 0;
  while (i < sa.size() && j < sb.size()) {
    if (sa[i].first < sb[j].second && sb[j].first < sa[i].second) return true;
    if (sa[i].second <= sb[j].second) {
      ++i;
    } else {
      ++j;
    }
  }
  return false;
}

}  // namespace detail

inline void check_gather_inplace_no_overlap(const char* op, at::TensorList kv) {
  std::vector<detail::KvSpan> spans(kv.size());
  for (size_t i = 0; i < kv.size(); ++i) {
    if (kv[i].numel() == 0) continue;
    at::assert_no_internal_overlap(kv[i]);
    spans[i] = detail::kv_span(kv[i]);
    for (size_t j = 0; j < i; ++j) {
      if (kv[j].numel() == 0) continue;
      TS_KVW_CHECK(!detail::kv_spans_overlap(spans[j], spans[i]), op, "kv[", j, "] and kv[", i,
                   "] must not overlap in memory for the in-place gather (each tensor is "
                   "compacted on its own), got views that share bytes");
    }
  }
}

#undef TS_KVW_CHECK

}  // namespace checks
}  // namespace tasksieve
