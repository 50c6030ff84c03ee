// CPU implementations of the WindowKV ops (schemas in csrc/ops.cpp, references in
// python/tasksieve/reference.py):
//
//   window_scores   q_obs [B, A, H, D], k [B, N, Hk, D] (fp32/fp16/bf16) -> fp32 [B, Hk, nw]
//   select_windows  scores fp32 [B, Hk, nw] -> int32 [B, Hk, min(keep, nw)], ascending
//   gather_windows  kv [B, Hk, N, D_i]..., idx int32 [B, Hk, keep]
//                   -> [B, Hk, keep*w + tail, D_i]...
//   gather_windows_ the same, in place into the first keep*w + tail positions
//
// The index math (window count, causal key range, window reduce, gather source, ranking) comes
// from include/tasksieve/window_index.h, which the CUDA kernels share.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <numeric>
#include <optional>
#include <string>
#include <vector>

#include "tasksieve/window_index.h"

namespace tasksieve {
namespace {

using window::gathered_len;
using window::num_windows;
using window::rank_before;
using window::window_index_valid;

// ---------------------------------------------------------------------------------------------
// SIMD building blocks. GCC vector extensions: 8 floats per vector, lowered to SSE pairs by
// default and to single AVX2/AVX-512VL instructions inside the target_clones variants, which the
// loader picks once per process from the CPU's features (ifunc). No -march flag needed.
// ---------------------------------------------------------------------------------------------
typedef float vf8 __attribute__((vector_size(32)));
typedef int32_t vi8 __attribute__((vector_size(32)));

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#if __GNUC__ >= 12  // x86-64-v3 = AVX2 + FMA, v4 adds AVX-512 (32 vector registers)
#define TS_SIMD_CLONES \
  __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define TS_SIMD_CLONES __attribute__((target_clones("avx2", "default")))
#endif
#else
#define TS_SIMD_CLONES
#endif

// The helpers below take and return vectors; they are always inlined into their (cloned)
// callers, so no call ever crosses the default/AVX calling conventions GCC warns about.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wpsabi"
#endif
#define TS_VEC_INLINE inline __attribute__((always_inline))

TS_VEC_INLINE vf8 load8(const float* p) {
  vf8 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

TS_VEC_INLINE void store8(float* p, vf8 v) { std::memcpy(p, &v, sizeof(v)); }

// Broadcast: x - 0 == x exactly, so this folds to one vbroadcastss. A macro, not a function:
// an inline helper compiled for the default target lowers it to a chain of inserts.
#define splat8(x) (static_cast<float>(x) - vf8{})

// 2^x for x <= 0 (x = logit - row max in the log2 domain), ~2 ulp; x <= -127 gives 0 (the
// probabilities below 2^-127 ~ 6e-39 are dropped); NaN propagates.
//   n = round(x), f = x - n in [-1/2, 1/2], 2^f by its degree-7 Taylor series
//   (truncation < 6e-9 relative), 2^n built in the exponent bits.
TS_VEC_INLINE vf8 exp2_neg(vf8 x) {
  const vf8 lo = splat8(-127.f);
  x = x < lo ? lo : x;
  const vf8 magic = splat8(12582912.f);  // 1.5 * 2^23: adding it rounds to an integer
  const vf8 n = (x + magic) - magic;
  const vf8 f = x - n;
  vf8 p = splat8(1.5252733804059840e-05f);  // ln2^7 / 7!
  p = p * f + splat8(1.5403530393381606e-04f);
  p = p * f + splat8(1.3333558146428443e-03f);
  p = p * f + splat8(9.6181291076284772e-03f);
  p = p * f + splat8(5.5504108664821580e-02f);
  p = p * f + splat8(2.4022650695910071e-01f);
  p = p * f + splat8(6.9314718055994531e-01f);
  p = p * f + splat8(1.0f);
  const vi8 e = (__builtin_convertvector(n, vi8) + 127) << 23;  // 0 for n = -127: 2^n -> 0
  return p * (vf8)e;  // same-size vector cast: reinterprets the bits
}

// ---------------------------------------------------------------------------------------------
// window_scores
//
// Per (b, hk) the M = G*A observation rows r = g*A + a (query a of head hk*G + g), pre-scaled
// by scale*log2(e) so that exp(scale * q.k - max) = 2^(row logit - row max):
//   pass 1  row max m_r and row sum l_r = sum_j 2^(L_rj - m_r) over the visible keys
//           [kv_start, N - A + a], online over key blocks, parallel over (b, hk, key chunk);
//   pass 2  column mass s_g[j] = sum_a 2^(L_rj - m_r) / l_r for j in the review region
//           [0, nw*window) (every query sees it entirely, no causal mask), pooled into window
//           scores and averaged over g; parallel over (b, hk, chunk of whole windows).
// Logits are recomputed in pass 2 rather than stored: a thread only ever holds one
// [kRT, kKB] tile and one [D, kKB] key block.
// ---------------------------------------------------------------------------------------------
constexpr int64_t kKB = 64;       // keys per block (columns of a logit tile)
constexpr int64_t kRT = 6;        // rows per register tile
constexpr int64_t kChunk1 = 512;  // keys per pass-1 work item
constexpr int64_t kChunk2 = 512;  // target keys per pass-2 work item (whole windows)

// out[r][c] = sum_d q[r][d] * kt[d][c] for r < kRT, c < kKB. q rows have stride D, kt is the
// key block transposed ([D][kKB]), so the inner loop is 8-wide FMAs over keys: a 6 x 16 tile
// keeps 12 accumulators + 2 key vectors + 1 broadcast in the 16 AVX2 registers, enough
// independent FMAs to hide their latency.
TS_SIMD_CLONES
void logit_tile(const float* q, int64_t D, const float* kt, float* out) {
  for (int64_t c0 = 0; c0 < kKB; c0 += 16) {
    vf8 acc[kRT][2];
#pragma GCC unroll 8
    for (int r = 0; r < kRT; ++r) acc[r][0] = acc[r][1] = splat8(0.f);
    for (int64_t d = 0; d < D; ++d) {
      const vf8 k0 = load8(kt + d * kKB + c0);
      const vf8 k1 = load8(kt + d * kKB + c0 + 8);
#pragma GCC unroll 8
      for (int r = 0; r < kRT; ++r) {
        const vf8 b = splat8(q[r * D + d]);
        acc[r][0] += b * k0;
        acc[r][1] += b * k1;
      }
    }
#pragma GCC unroll 8
    for (int r = 0; r < kRT; ++r) {
      store8(out + r * kKB + c0, acc[r][0]);
      store8(out + r * kKB + c0 + 8, acc[r][1]);
    }
  }
}

// Online softmax statistics of one row over one key block: `row` holds kKB logits of which
// [0, lim) are visible (the rest are overwritten with -inf here). Updates (m, l).
TS_SIMD_CLONES
void row_stats_update(float* row, int64_t lim, float* m, float* l) {
  const float ninf = -std::numeric_limits<float>::infinity();
  for (int64_t c = lim; c < kKB; ++c) row[c] = ninf;
  float bm = ninf;
  for (int64_t c = 0; c < lim; ++c) bm = row[c] > bm ? row[c] : bm;
  const float m_new = bm > *m ? bm : *m;
  vf8 acc = splat8(0.f);
  const vf8 mv = splat8(m_new);
  for (int64_t c = 0; c < kKB; c += 8) acc += exp2_neg(load8(row + c) - mv);
  float sum = 0.f;
  for (int i = 0; i < 8; ++i) sum += acc[i];
  *l = *l * std::exp2(*m - m_new) + sum;  // *m = -inf on the first block: 0 * ... + sum
  *m = m_new;
}

// col[c] += 2^(row[c] - m) * inv_l for c in [lo, hi); other columns of `row` are clobbered.
TS_SIMD_CLONES
void col_mass_add(float* row, int64_t lo, int64_t hi, float m, float inv_l, float* col) {
  const float ninf = -std::numeric_limits<float>::infinity();
  for (int64_t c = 0; c < lo; ++c) row[c] = ninf;
  for (int64_t c = hi; c < kKB; ++c) row[c] = ninf;
  const vf8 mv = splat8(m), iv = splat8(inv_l);
  for (int64_t c = 0; c < kKB; c += 8)
    store8(col + c, load8(col + c) + exp2_neg(load8(row + c) - mv) * iv);
}

// Copies keys [j0, j0 + n) of one KV head into kt ([D][kKB], fp32), zero-padding the block.
template <typename T>
void load_key_block(const T* k, int64_t stride_n, int64_t j0, int64_t n, int64_t D, float* kt) {
  if (n < kKB) std::fill(kt, kt + D * kKB, 0.f);
  for (int64_t c = 0; c < n; ++c) {
    const T* src = k + (j0 + c) * stride_n;
    for (int64_t d = 0; d < D; ++d) kt[d * kKB + c] = static_cast<float>(src[d]);
  }
}

struct ScoreShape {
  int64_t B, A, H, D, N, Hk, G, M, Mpad, nw, window;
  bool reduce_max;
};

template <typename T>
void window_scores_impl(const at::Tensor& q_obs, const at::Tensor& k, const ScoreShape& s,
                        float scale_log2, const int32_t* kv_start, float* out) {
  const int64_t B = s.B, A = s.A, D = s.D, N = s.N, Hk = s.Hk, G = s.G, M = s.M;
  const int64_t Mpad = s.Mpad, nw = s.nw, window = s.window;
  const int64_t BH = B * Hk;
  const T* qp = q_obs.const_data_ptr<T>();
  const T* kp = k.const_data_ptr<T>();
  const int64_t qsb = q_obs.stride(0), qsa = q_obs.stride(1), qsh = q_obs.stride(2);
  const int64_t ksb = k.stride(0), ksn = k.stride(1), ksh = k.stride(2);
  auto key_base = [&](int64_t bh) { return kp + (bh / Hk) * ksb + (bh % Hk) * ksh; };
  auto start_of = [&](int64_t bh) -> int64_t { return kv_start ? kv_start[bh / Hk] : 0; };

  // Pre-scaled fp32 queries, rows r = g*A + a, zero rows up to Mpad.
  std::vector<float> qs(static_cast<size_t>(BH * Mpad * D), 0.f);
  at::parallel_for(0, BH, 1, [&](int64_t begin, int64_t end) {
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / Hk, hk = bh % Hk;
      for (int64_t r = 0; r < M; ++r) {
        const int64_t g = r / A, a = r % A;
        const T* src = qp + b * qsb + a * qsa + (hk * G + g) * qsh;
        float* dst = qs.data() + (bh * Mpad + r) * D;
        for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<float>(src[d]) * scale_log2;
      }
    }
  });

  // Pass 1: partial (max, sum) per (bh, chunk, row), then merged per row.
  const int64_t nch1 = std::max<int64_t>(1, ceil_div(N, kChunk1));
  const float ninf = -std::numeric_limits<float>::infinity();
  std::vector<float> pm(static_cast<size_t>(BH * nch1 * M), ninf);
  std::vector<float> pl(static_cast<size_t>(BH * nch1 * M), 0.f);
  at::parallel_for(0, BH * nch1, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> kt(static_cast<size_t>(D * kKB));
    float tile[kRT * kKB];
    for (int64_t item = begin; item < end; ++item) {
      const int64_t bh = item / nch1, ch = item % nch1;
      const int64_t ks = start_of(bh);
      const int64_t j_lo = ks + ch * kChunk1;
      const int64_t j_hi = std::min(N, j_lo + kChunk1);
      float* m = pm.data() + item * M;
      float* l = pl.data() + item * M;
      const float* q = qs.data() + bh * Mpad * D;
      for (int64_t j0 = j_lo; j0 < j_hi; j0 += kKB) {
        const int64_t n = std::min(kKB, j_hi - j0);
        load_key_block(key_base(bh), ksn, j0, n, D, kt.data());
        for (int64_t r0 = 0; r0 < M; r0 += kRT) {
          // Rows whose last visible key (N - A + a) precedes the block contribute nothing.
          bool any = false;
          for (int64_t r = r0; r < std::min(M, r0 + kRT); ++r)
            any |= window::query_key_end(N, A, r % A) > j0;
          if (!any) continue;
          logit_tile(q + r0 * D, D, kt.data(), tile);
          for (int64_t r = r0; r < std::min(M, r0 + kRT); ++r) {
            const int64_t lim = std::min(n, window::query_key_end(N, A, r % A) - j0);
            if (lim > 0) row_stats_update(tile + (r - r0) * kKB, lim, m + r, l + r);
          }
        }
      }
    }
  });
  std::vector<float> row_m(static_cast<size_t>(BH * M)), row_inv_l(static_cast<size_t>(BH * M));
  at::parallel_for(0, BH, 1, [&](int64_t begin, int64_t end) {
    for (int64_t bh = begin; bh < end; ++bh) {
      for (int64_t r = 0; r < M; ++r) {
        float mx = ninf;
        for (int64_t ch = 0; ch < nch1; ++ch) mx = std::max(mx, pm[(bh * nch1 + ch) * M + r]);
        float sum = 0.f;
        for (int64_t ch = 0; ch < nch1; ++ch) {
          const float mc = pm[(bh * nch1 + ch) * M + r];
          if (mc != ninf) sum += pl[(bh * nch1 + ch) * M + r] * std::exp2(mc - mx);
        }
        row_m[bh * M + r] = mx;
        row_inv_l[bh * M + r] = 1.f / sum;
      }
    }
  });

  // Pass 2: column mass of whole windows, reduced straight into window scores.
  const int64_t wpc = std::max<int64_t>(1, kChunk2 / window);  // windows per work item
  const int64_t nch2 = ceil_div(nw, wpc);
  const int64_t cpad = round_up(wpc * window, kKB);  // column-mass row length per head
  at::parallel_for(0, BH * nch2, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> kt(static_cast<size_t>(D * kKB));
    std::vector<float> col(static_cast<size_t>(G * cpad));
    float tile[kRT * kKB];
    for (int64_t item = begin; item < end; ++item) {
      const int64_t bh = item / nch2, ch = item % nch2;
      const int64_t ks = start_of(bh);
      const int64_t m0 = ch * wpc, m1 = std::min(nw, m0 + wpc);
      const int64_t c_lo = m0 * window, c_hi = m1 * window;  // token range of this item
      const float* q = qs.data() + bh * Mpad * D;
      const float* rm = row_m.data() + bh * M;
      const float* ril = row_inv_l.data() + bh * M;
      std::fill(col.begin(), col.end(), 0.f);
      for (int64_t j0 = c_lo; j0 < c_hi; j0 += kKB) {
        const int64_t n = std::min(kKB, c_hi - j0);
        if (j0 + n <= ks) continue;  // all masked (left padding): mass 0
        const int64_t lo = std::max<int64_t>(0, ks - j0);
        load_key_block(key_base(bh), ksn, j0, n, D, kt.data());
        for (int64_t r0 = 0; r0 < M; r0 += kRT) {
          logit_tile(q + r0 * D, D, kt.data(), tile);
          for (int64_t r = r0; r < std::min(M, r0 + kRT); ++r) {
            float* dst = col.data() + (r / A) * cpad + (j0 - c_lo);
            col_mass_add(tile + (r - r0) * kKB, lo, n, rm[r], ril[r], dst);
          }
        }
      }
      float* o = out + bh * nw;
      for (int64_t mw = m0; mw < m1; ++mw) {
        float acc = 0.f;
        for (int64_t g = 0; g < G; ++g)
          acc += window::window_reduce(col.data() + g * cpad + (mw - m0) * window, window,
                                       s.reduce_max);
        o[mw] = acc / static_cast<float>(G);
      }
    }
  });
}

// TORCH_CHECK with the "tasksieve.<op>: " prefix every message of the library carries.
#define TS_CHECK(cond, op, ...) TORCH_CHECK(cond, "tasksieve.", op, ": ", __VA_ARGS__)

at::Tensor window_scores_cpu(const at::Tensor& q_obs, const at::Tensor& k, int64_t window,
                             c10::string_view reduce, std::optional<double> scale,
                             const std::optional<at::Tensor>& kv_start) {
  const char* op = "window_scores";
  TS_CHECK(q_obs.dim() == 4, op, "q_obs must be a 4-D tensor [B, A, H, D], got shape ",
           q_obs.sizes());
  TS_CHECK(k.dim() == 4, op, "k must be a 4-D tensor [B, N, Hk, D], got shape ", k.sizes());
  const auto dt = q_obs.scalar_type();
  TS_CHECK(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16, op,
           "q_obs must be float32, float16 or bfloat16, got ", dt);
  TS_CHECK(k.scalar_type() == dt, op, "k must have the dtype of q_obs (", dt, "), got ",
           k.scalar_type());
  TS_CHECK(q_obs.device().is_cpu(), op, "q_obs must be a CPU tensor here, got ", q_obs.device());
  TS_CHECK(k.device() == q_obs.device(), op, "k must be on the device of q_obs (", q_obs.device(),
           "), got ", k.device());
  const int64_t B = q_obs.size(0), A = q_obs.size(1), H = q_obs.size(2), D = q_obs.size(3);
  const int64_t N = k.size(1), Hk = k.size(2);
  TS_CHECK(k.size(0) == B, op, "k must have the batch size of q_obs (", B, "), got ", k.size(0));
  TS_CHECK(D >= 1 && D <= 256, op, "q_obs head dim D must be in [1, 256], got ", D);
  TS_CHECK(k.size(3) == D, op, "k head dim must equal q_obs head dim (", D, "), got ", k.size(3));
  TS_CHECK(Hk >= 1 && H % Hk == 0, op, "k heads Hk must be >= 1 and divide the q_obs heads H=", H,
           ", got Hk=", Hk);
  TS_CHECK(q_obs.stride(3) == 1 || D == 1, op,
           "q_obs must be contiguous in the last dim (stride 1), got stride ", q_obs.stride(3));
  TS_CHECK(k.stride(3) == 1 || D == 1, op,
           "k must be contiguous in the last dim (stride 1), got stride ", k.stride(3));
  TS_CHECK(A >= 1 && A <= N, op, "q_obs length A must be in [1, N=", N,
           "] (N = k.size(1)), got A=", A);
  TS_CHECK(window >= 1, op, "window must be >= 1, got ", window);
  const std::string red(reduce.data(), reduce.size());
  TS_CHECK(red == "max" || red == "mean", op, "reduce must be 'max' or 'mean', got '", red, "'");
  TS_CHECK(!scale.has_value() || std::isfinite(*scale), op, "scale must be finite, got ",
           scale.value_or(0.0));
  const int32_t* start = nullptr;
  at::Tensor start_c;
  if (kv_start.has_value()) {
    const at::Tensor& ks = *kv_start;
    TS_CHECK(ks.scalar_type() == at::kInt, op, "kv_start must be int32, got ", ks.scalar_type());
    TS_CHECK(ks.dim() == 1 && ks.size(0) == B, op, "kv_start must have shape [B] = [", B,
             "], got ", ks.sizes());
    TS_CHECK(ks.device() == q_obs.device(), op, "kv_start must be on the device of q_obs (",
             q_obs.device(), "), got ", ks.device());
    start_c = ks.contiguous();
    start = start_c.const_data_ptr<int32_t>();
    if (B > 0) {
      const auto [lo, hi] = std::minmax_element(start, start + B);
      TS_CHECK(*lo >= 0 && *hi <= N - A, op, "kv_start values must be in [0, N - A] = [0, ",
               N - A, "], got [", *lo, ", ", *hi, "]");
    }
  }

  const int64_t nw = num_windows(N, A, window);
  at::Tensor out = at::empty({B, Hk, nw}, q_obs.options().dtype(at::kFloat));
  if (out.numel() == 0) return out;

  ScoreShape s;
  s.B = B, s.A = A, s.H = H, s.D = D, s.N = N, s.Hk = Hk, s.G = H / Hk;
  s.M = s.G * A, s.Mpad = round_up<int64_t>(s.M, kRT), s.nw = nw, s.window = window;
  s.reduce_max = red == "max";
  const double sc = scale.has_value() ? *scale : 1.0 / std::sqrt(static_cast<double>(D));
  const float scale_log2 = static_cast<float>(sc * 1.4426950408889634);  // * log2(e)
  float* o = out.data_ptr<float>();
  switch (dt) {
    case at::kFloat: window_scores_impl<float>(q_obs, k, s, scale_log2, start, o); break;
    case at::kHalf: window_scores_impl<c10::Half>(q_obs, k, s, scale_log2, start, o); break;
    default: window_scores_impl<c10::BFloat16>(q_obs, k, s, scale_log2, start, o); break;
  }
  return out;
}

// ---------------------------------------------------------------------------------------------
// select_windows: per row, the kk best windows by rank_before (nth_element, O(nw)), then
// sorted by position. share: one row per sequence from shared_score, copied to every head.
// ---------------------------------------------------------------------------------------------
at::Tensor select_windows_cpu(const at::Tensor& scores, int64_t keep, bool share) {
  const char* op = "select_windows";
  TS_CHECK(scores.dim() == 3, op, "scores must be a 3-D tensor [B, Hk, nw], got shape ",
           scores.sizes());
  TS_CHECK(scores.scalar_type() == at::kFloat, op, "scores must be float32, got ",
           scores.scalar_type());
  TS_CHECK(scores.device().is_cpu(), op, "scores must be a CPU tensor here, got ",
           scores.device());
  TS_CHECK(keep >= 0, op, "keep must be >= 0, got ", keep);
  const int64_t B = scores.size(0), Hk = scores.size(1), nw = scores.size(2);
  const int64_t kk = std::min(keep, nw);
  at::Tensor out = at::empty({B, Hk, kk}, scores.options().dtype(at::kInt));
  if (out.numel() == 0) return out;
  const float* sp = scores.const_data_ptr<float>();
  const int64_t s0 = scores.stride(0), s1 = scores.stride(1), s2 = scores.stride(2);
  int32_t* op_out = out.data_ptr<int32_t>();
  const int64_t rows = share ? B : B * Hk;
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> sc(static_cast<size_t>(nw));
    std::vector<int64_t> order(static_cast<size_t>(nw));
    for (int64_t row = begin; row < end; ++row) {
      const int64_t b = share ? row : row / Hk, h = share ? 0 : row % Hk;
      for (int64_t m = 0; m < nw; ++m) {
        sc[m] = share ? window::shared_score(sp + b * s0 + m * s2, s1, Hk)
                      : sp[b * s0 + h * s1 + m * s2];
      }
      std::iota(order.begin(), order.end(), 0);
      auto better = [&](int64_t x, int64_t y) { return rank_before(sc[x], x, sc[y], y); };
      if (kk < nw) std::nth_element(order.begin(), order.begin() + kk, order.end(), better);
      std::sort(order.begin(), order.begin() + kk);
      for (int64_t hh = h; hh < (share ? Hk : h + 1); ++hh) {
        int32_t* dst = op_out + (b * Hk + hh) * kk;
        for (int64_t p = 0; p < kk; ++p) dst[p] = static_cast<int32_t>(order[p]);
      }
    }
  });
  return out;
}

// ---------------------------------------------------------------------------------------------
// gather_windows / gather_windows_: checks (values of idx included, before any write), then
// one task per (tensor, b, h) copying whole windows (one memcpy per window when the rows of the
// source are contiguous, else one per row). The in-place variant walks windows in order with
// memmove: destination <= source for every window because idx is strictly ascending.
// ---------------------------------------------------------------------------------------------
void check_gather(const char* op, at::TensorList kv, const at::Tensor& idx, int64_t window,
                  int64_t tail, bool inplace) {
  TS_CHECK(!kv.empty(), op,
           "kv must be a non-empty list of tensors [B, Hk, N, D_i], got an empty list");
  const at::Tensor& ref = kv[0];
  for (size_t i = 0; i < kv.size(); ++i) {
    const at::Tensor& t = kv[i];
    TS_CHECK(t.dim() == 4, op, "kv[", i, "] must be a 4-D tensor [B, Hk, N, D], got shape ",
             t.sizes());
    TS_CHECK(t.sizes().slice(0, 3) == ref.sizes().slice(0, 3), op, "kv[", i,
             "] must have the [B, Hk, N] of kv[0] ", ref.sizes().slice(0, 3), ", got ",
             t.sizes().slice(0, 3));
    TS_CHECK(t.scalar_type() == ref.scalar_type(), op, "kv[", i, "] must have the dtype of kv[0] (",
             ref.scalar_type(), "), got ", t.scalar_type());
    TS_CHECK(t.device() == ref.device(), op, "kv[", i, "] must be on the device of kv[0] (",
             ref.device(), "), got ", t.device());
    TS_CHECK(t.stride(3) == 1 || t.size(3) <= 1, op, "kv[", i,
             "] must be contiguous in the last dim (stride 1), got stride ", t.stride(3));
  }
  TS_CHECK(ref.device().is_cpu(), op, "kv must hold CPU tensors here, got ", ref.device());
  const int64_t B = ref.size(0), Hk = ref.size(1), N = ref.size(2);
  TS_CHECK(idx.dim() == 3, op, "idx must be a 3-D tensor [B, Hk, keep], got shape ", idx.sizes());
  TS_CHECK(idx.scalar_type() == at::kInt, op, "idx must be int32, got ", idx.scalar_type());
  TS_CHECK(idx.size(0) == B && idx.size(1) == Hk, op,
           "idx must have shape [B, Hk, keep] with [B, Hk] = [", B, ", ", Hk, "], got ",
           idx.sizes());
  TS_CHECK(idx.device() == ref.device(), op, "idx must be on the device of kv (", ref.device(),
           "), got ", idx.device());
  TS_CHECK(window >= 1, op, "window must be >= 1, got ", window);
  TS_CHECK(tail >= 0 && tail <= N, op, "tail must be in [0, N] = [0, ", N, "], got ", tail);
  const int64_t keep = idx.size(2);
  const int32_t* ip = idx.const_data_ptr<int32_t>();
  const int64_t i0 = idx.stride(0), i1 = idx.stride(1), i2 = idx.stride(2);
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t h = 0; h < Hk; ++h) {
      for (int64_t p = 0; p < keep; ++p) {
        const int64_t v = ip[b * i0 + h * i1 + p * i2];
        TS_CHECK(window_index_valid(v, window, N, tail), op,
                 "idx values must satisfy 0 <= v and v*window + window <= N - tail (N=", N,
                 ", window=", window, ", tail=", tail, "), got idx[", b, ", ", h, ", ", p,
                 "] = ", v);
        if (!inplace || p == 0) continue;
        const int64_t prev = ip[b * i0 + h * i1 + (p - 1) * i2];
        TS_CHECK(prev < v, op,
                 "idx must be strictly ascending in every row for the in-place gather, got idx[",
                 b, ", ", h, ", ", p - 1, "] = ", prev, " then ", v);
      }
    }
  }
}

// Copies n rows of row_bytes each; rows are src_stride / dst_stride bytes apart.
inline void copy_rows(const char* src, int64_t src_stride, char* dst, int64_t dst_stride,
                      int64_t n, int64_t row_bytes, bool overlap) {
  if (n <= 0 || row_bytes == 0) return;
  if (src_stride == row_bytes && dst_stride == row_bytes) {  // one block
    if (overlap) {
      std::memmove(dst, src, n * row_bytes);
    } else {
      std::memcpy(dst, src, n * row_bytes);
    }
    return;
  }
  for (int64_t t = 0; t < n; ++t) {
    if (overlap) {
      std::memmove(dst + t * dst_stride, src + t * src_stride, row_bytes);
    } else {
      std::memcpy(dst + t * dst_stride, src + t * src_stride, row_bytes);
    }
  }
}

// Gathers every tensor of `src` into `dst` (same list length; dst aliases src when in place).
void gather_into(at::TensorList src, const std::vector<at::Tensor>& dst, const at::Tensor& idx,
                 int64_t window, int64_t tail, bool inplace) {
  const int64_t B = src[0].size(0), Hk = src[0].size(1), N = src[0].size(2);
  const int64_t keep = idx.size(2);
  const int32_t* ip = idx.const_data_ptr<int32_t>();
  const int64_t i0 = idx.stride(0), i1 = idx.stride(1), i2 = idx.stride(2);
  const int64_t T = static_cast<int64_t>(src.size());
  const int64_t per_task = std::max<int64_t>(1, gathered_len(keep, window, tail) * src[0].size(3));
  const int64_t grain = std::max<int64_t>(1, 32768 / per_task);  // ~32K elements per chunk
  at::parallel_for(0, T * B * Hk, grain, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t i = task / (B * Hk), b = (task / Hk) % B, h = task % Hk;
      const at::Tensor& s = src[i];
      const at::Tensor& d = dst[i];
      const int64_t es = s.element_size();
      const int64_t row_bytes = s.size(3) * es;
      const char* sp = static_cast<const char*>(s.const_data_ptr()) +
                       (b * s.stride(0) + h * s.stride(1)) * es;
      char* dp = static_cast<char*>(d.data_ptr()) + (b * d.stride(0) + h * d.stride(1)) * es;
      const int64_t ss = s.stride(2) * es, ds = d.stride(2) * es;
      for (int64_t p = 0; p < keep; ++p) {
        const int64_t v = ip[b * i0 + h * i1 + p * i2];
        copy_rows(sp + v * window * ss, ss, dp + p * window * ds, ds, window, row_bytes, inplace);
      }
      copy_rows(sp + (N - tail) * ss, ss, dp + keep * window * ds, ds, tail, row_bytes, inplace);
    }
  });
}

std::vector<at::Tensor> gather_windows_cpu(at::TensorList kv, const at::Tensor& idx,
                                           int64_t window, int64_t tail) {
  check_gather("gather_windows", kv, idx, window, tail, /*inplace=*/false);
  const int64_t L = gathered_len(idx.size(2), window, tail);
  std::vector<at::Tensor> out;
  out.reserve(kv.size());
  for (const at::Tensor& t : kv) {
    out.push_back(at::empty({t.size(0), t.size(1), L, t.size(3)}, t.options()));
  }
  if (kv[0].size(0) * kv[0].size(1) > 0) gather_into(kv, out, idx, window, tail, false);
  return out;
}

void gather_windows__cpu(at::TensorList kv, const at::Tensor& idx, int64_t window, int64_t tail) {
  check_gather("gather_windows_", kv, idx, window, tail, /*inplace=*/true);
  const std::vector<at::Tensor> dst(kv.begin(), kv.end());
  if (kv[0].size(0) * kv[0].size(1) > 0) gather_into(kv, dst, idx, window, tail, true);
}

#undef TS_CHECK

}  // namespace
}  // namespace tasksieve

TORCH_LIBRARY_IMPL(tasksieve, CPU, m) {
  m.impl("window_scores", &tasksieve::window_scores_cpu);
  m.impl("select_windows", &tasksieve::select_windows_cpu);
  m.impl("gather_windows", &tasksieve::gather_windows_cpu);
  m.impl("gather_windows_", &tasksieve::gather_windows__cpu);
}
