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
#include <ATen/ops/from_blob.h>
#include <ATen/ops/mm_cpu_dispatch.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <memory>
#include <numeric>
#include <optional>
#include <string>
#include <vector>

#include "../checks/kv_window_checks.h"
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
// Work item = (b, hk, group of hpi query heads of hk) with Mi = hpi*A observation rows
// r = g*A + a, pre-scaled by scale*log2(e) so that exp(scale * q.k - max) = 2^(L - max).
// The logits are computed ONCE, key block by key block from kv_start on:
//   1. L = Q K_blk^T by one BLAS GEMM (at::cpu::mm_out, single-threaded inside parallel_for)
//      into the item's buffer of tiles [block][Mi][kKB];
//   2. while the tile is hot in cache: per row the block max m_b over the visible keys,
//      P = 2^(L - m_b) in place, and the row's softmax (max m_r, sum l_r) updated online.
// Then the column mass s_g[j] = sum_a P[r, j] * 2^(m_b - m_r) / l_r over the review region
// [0, nw*window) (every query sees all of it: no causal mask there) is pooled per query head
// into window scores; the heads are averaged per KV head at the end.
// The buffer holds one item's logits (Mi x N floats, at most kBufBytes unless hpi = 1) per
// thread, never the whole [B, H, A, N] tensor.
// ---------------------------------------------------------------------------------------------
constexpr int64_t kKB = 512;                      // keys per block: a tile stays in L2
constexpr int64_t kBufBytes = int64_t{4} << 20;  // logits buffer per thread, hpi > 1

// row[0, kKB) holds logits of which [0, lim) are visible: returns their max m_b and turns the
// row into 2^(L - m_b) (0 for masked and padding columns); *sum = the row's sum.
TS_SIMD_CLONES
float exp_row(float* row, int64_t lim, float* sum) {
  const float ninf = -std::numeric_limits<float>::infinity();
  for (int64_t c = lim; c < kKB; ++c) row[c] = ninf;
  vf8 mx = splat8(ninf);
  for (int64_t c = 0; c < kKB; c += 8) {
    const vf8 v = load8(row + c);
    mx = v > mx ? v : mx;
  }
  float m = ninf;
  for (int i = 0; i < 8; ++i) m = mx[i] > m ? mx[i] : m;
  const vf8 mv = splat8(m);
  vf8 acc = splat8(0.f);
  for (int64_t c = 0; c < kKB; c += 8) {
    const vf8 p = exp2_neg(load8(row + c) - mv);
    store8(row + c, p);
    acc += p;
  }
  float s = 0.f;
  for (int i = 0; i < 8; ++i) s += acc[i];
  *sum = s;
  return m;
}

// col[c] += f * p[c] for c < kKB.
TS_SIMD_CLONES
void axpy_block(float f, const float* p, float* col) {
  const vf8 fv = splat8(f);
  for (int64_t c = 0; c < kKB; c += 8) store8(col + c, load8(col + c) + fv * load8(p + c));
}

// window::window_reduce over the nw windows of one head's column mass, bit for bit; but
// reduce="max" over windows of up to 64 tokens ranks by counting instead of kt selection walks
// with unpredictable branches: rank(t) = #{u : u ranks before t} (a strict total order, so the
// ranks are a permutation of 0..w-1), 8 t's per vector; the values are then placed by rank
// and the top kt summed in rank order, exactly as window_reduce sums them.
TS_SIMD_CLONES
void reduce_windows(const float* col, int64_t nw, int64_t window, bool reduce_max, float* out) {
  constexpr int64_t kMaxW = 64;
  if (!reduce_max || window > kMaxW) {
    for (int64_t m = 0; m < nw; ++m)
      out[m] = window::window_reduce(col + m * window, window, reduce_max);
    return;
  }
  const int64_t kt = window::topk_count(window);
  float v[kMaxW], top[kMaxW];
  int32_t rank[kMaxW];
  std::fill(v, v + kMaxW, 0.f);  // lanes past the window: ranked, never used
  const vi8 iota = {0, 1, 2, 3, 4, 5, 6, 7};
  for (int64_t m = 0; m < nw; ++m) {
    const float* s = col + m * window;
    for (int64_t t = 0; t < window; ++t) v[t] = ts_nan_to_neg_inf(s[t]);
    for (int64_t t0 = 0; t0 < window; t0 += 8) {
      const vf8 vt = load8(v + t0);
      const vi8 ti = iota + static_cast<int32_t>(t0);
      vi8 rk = ti - ti;
      for (int64_t u = 0; u < window; ++u) {  // u ranks before t: larger, or equal and u < t
        const vf8 vu = splat8(v[u]);
        rk -= (vu > vt) | ((vu == vt) & (static_cast<int32_t>(u) < ti));
      }
      std::memcpy(rank + t0, &rk, sizeof(rk));
    }
    for (int64_t t = 0; t < window; ++t) top[rank[t]] = s[t];
    float sum = 0.f;
    for (int64_t r = 0; r < kt; ++r) sum += top[r];
    out[m] = sum / static_cast<float>(kt);
  }
}

// dst[0, n) = src[0, n) in fp32; cloned so that the bf16/fp16 conversions vectorise.
TS_SIMD_CLONES
void to_float(const float* src, float* dst, int64_t n) {
  std::memcpy(dst, src, static_cast<size_t>(n) * sizeof(float));
}
TS_SIMD_CLONES
void to_float(const c10::BFloat16* src, float* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}
TS_SIMD_CLONES
void to_float(const c10::Half* src, float* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}

// Keys [j0, j0 + n) of one KV head (rows ksn apart) as a contiguous fp32 [n, D] matrix in buf.
// fp32 keys are copied too: BLAS packs a contiguous, L2-resident block much faster than rows
// fetched from the (large, possibly strided) cache.
template <typename T>
at::Tensor key_block(const T* k, int64_t ksn, int64_t j0, int64_t n, int64_t D, float* buf) {
  for (int64_t c = 0; c < n; ++c) to_float(k + (j0 + c) * ksn, buf + c * D, D);
  return at::from_blob(buf, {n, D}, at::kFloat);
}

// Query heads per work item: all G heads of a KV head when possible (one GEMM of G*A rows per
// key block: the best GEMM shape, each key block read and converted once); fewer when there
// are fewer KV heads than threads, or when the item's logits would exceed kBufBytes.
int64_t heads_per_item(int64_t BHk, int64_t G, int64_t A, int64_t N) {
  const int64_t threads = at::get_num_threads();
  int64_t hpi = G;
  for (int64_t d = G; d >= 1; --d) {
    if (G % d != 0) continue;
    hpi = d;
    if (BHk * (G / d) >= threads && d * A * round_up(N, kKB) * 4 <= kBufBytes) break;
  }
  return hpi;
}

struct ScoreShape {
  int64_t B, A, H, D, N, Hk, G, M, nw, window;
  bool reduce_max;
};

template <typename T>
void window_scores_impl(const at::Tensor& q_obs, const at::Tensor& k, const ScoreShape& s,
                        float scale_log2, const int32_t* kv_start, float* out) {
  const int64_t B = s.B, A = s.A, D = s.D, N = s.N, Hk = s.Hk, G = s.G, M = s.M;
  const int64_t nw = s.nw, window = s.window, R = nw * window;
  const int64_t BH = B * Hk;
  const T* qp = q_obs.const_data_ptr<T>();
  const T* kp = k.const_data_ptr<T>();
  const int64_t qsb = q_obs.stride(0), qsa = q_obs.stride(1), qsh = q_obs.stride(2);
  const int64_t ksb = k.stride(0), ksn = k.stride(1), ksh = k.stride(2);
  auto key_base = [&](int64_t bh) { return kp + (bh / Hk) * ksb + (bh % Hk) * ksh; };
  auto start_of = [&](int64_t bh) -> int64_t { return kv_start ? kv_start[bh / Hk] : 0; };

  // Pre-scaled fp32 queries [BH, M, D], rows r = g*A + a.
  std::vector<float> qs(static_cast<size_t>(BH * M * D));
  at::parallel_for(0, BH, 1, [&](int64_t begin, int64_t end) {
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / Hk, hk = bh % Hk;
      for (int64_t r = 0; r < M; ++r) {
        const int64_t g = r / A, a = r % A;
        const T* src = qp + b * qsb + a * qsa + (hk * G + g) * qsh;
        float* dst = qs.data() + (bh * M + r) * D;
        for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<float>(src[d]) * scale_log2;
      }
    }
  });

  const int64_t hpi = heads_per_item(BH, G, A, N), Mi = hpi * A, items_per_bh = G / hpi;
  const int64_t nblk_max = ceil_div(N, kKB);
  const int64_t cstride = R + kKB;  // column-mass row per head: the last block may overhang R
  const float ninf = -std::numeric_limits<float>::infinity();
  std::vector<float> sigma(static_cast<size_t>(BH * G * nw));  // [B, H, nw] per query head
  at::parallel_for(0, BH * items_per_bh, 1, [&](int64_t begin, int64_t end) {
    // Per-thread scratch: the item's logits / P tiles [block][Mi][kKB] (uninitialised: the
    // GEMM and exp_row write every column the column pass reads), one fp32 key block, and
    // the block maxima per row.
    std::unique_ptr<float[]> tiles(new float[static_cast<size_t>(Mi * nblk_max * kKB)]);
    std::vector<float> kbuf(static_cast<size_t>(kKB * D));
    std::vector<float> bmax(static_cast<size_t>(Mi * nblk_max)), m(Mi), l(Mi);
    std::vector<float> col(static_cast<size_t>(hpi * cstride));
    for (int64_t item = begin; item < end; ++item) {
      const int64_t bh = item / items_per_bh, g0 = (item % items_per_bh) * hpi;
      const int64_t ks = start_of(bh), nblk = ceil_div(N - ks, kKB);
      const at::Tensor q = at::from_blob(qs.data() + (bh * M + g0 * A) * D, {Mi, D}, at::kFloat);
      std::fill(m.begin(), m.end(), ninf);
      std::fill(l.begin(), l.end(), 0.f);
      for (int64_t t = 0; t < nblk; ++t) {
        const int64_t j0 = ks + t * kKB, n = std::min(kKB, N - j0);
        float* tile = tiles.get() + t * Mi * kKB;
        at::Tensor logits = at::from_blob(tile, {Mi, n}, {kKB, 1}, at::kFloat);
        at::cpu::mm_out(logits, q, key_block(key_base(bh), ksn, j0, n, D, kbuf.data()).t());
        for (int64_t r = 0; r < Mi; ++r) {
          const int64_t lim = std::min(n, window::query_key_end(N, A, r % A) - j0);
          float& mb = bmax[r * nblk + t];
          if (lim <= 0) {  // the row's last key precedes the block (past the review region)
            mb = ninf;
            continue;
          }
          float sum;
          mb = exp_row(tile + r * kKB, lim, &sum);
          const float mr = std::max(m[r], mb);  // m[r] = -inf on the first block: l stays 0
          l[r] = l[r] * std::exp2(m[r] - mr) + sum * std::exp2(mb - mr);
          m[r] = mr;
        }
      }
      // Column mass of the review region; keys before kv_start keep mass 0. Blocks starting
      // before R start before N - A, so every row has a visible key there (mb finite).
      std::fill(col.begin(), col.end(), 0.f);
      for (int64_t t = 0; t < nblk && ks + t * kKB < R; ++t) {
        for (int64_t r = 0; r < Mi; ++r) {
          const float f = std::exp2(bmax[r * nblk + t] - m[r]) / l[r];
          axpy_block(f, tiles.get() + (t * Mi + r) * kKB,
                     col.data() + (r / A) * cstride + ks + t * kKB);
        }
      }
      for (int64_t gl = 0; gl < hpi; ++gl) {
        reduce_windows(col.data() + gl * cstride, nw, window, s.reduce_max,
                       sigma.data() + (bh * G + g0 + gl) * nw);
      }
    }
  });
  // Mean over the G query heads of each KV head, summed in head order.
  for (int64_t bh = 0; bh < BH; ++bh) {
    for (int64_t mw = 0; mw < nw; ++mw) {
      float acc = 0.f;
      for (int64_t g = 0; g < G; ++g) acc += sigma[(bh * G + g) * nw + mw];
      out[bh * nw + mw] = acc / static_cast<float>(G);
    }
  }
}

// TORCH_CHECK with the "tasksieve.<op>: " prefix every message of the library carries.
#define TS_CHECK(cond, op, ...) TORCH_CHECK(cond, "tasksieve.", op, ": ", __VA_ARGS__)

at::Tensor window_scores_cpu(const at::Tensor& q_obs, const at::Tensor& k, int64_t window,
                             c10::string_view reduce, std::optional<double> scale,
                             const std::optional<at::Tensor>& kv_start) {
  const char* op = "window_scores";
  checks::check_window_scores_ranks(q_obs, k);
  checks::check_window_scores_dtypes(q_obs, k);
  const auto dt = q_obs.scalar_type();
  TS_CHECK(q_obs.device().is_cpu(), op, "q_obs must be a CPU tensor here, got ", q_obs.device());
  checks::check_window_scores_same_device(q_obs, k);
  const checks::WindowScoresDims dims =
      checks::check_window_scores_args(q_obs, k, window, reduce, scale);
  const int64_t B = dims.B, A = dims.A, H = dims.H, D = dims.D, N = dims.N, Hk = dims.Hk;
  const std::string red(reduce.data(), reduce.size());
  const int32_t* start = nullptr;
  at::Tensor start_c;
  if (kv_start.has_value()) {
    const at::Tensor& ks = *kv_start;
    checks::check_window_scores_kv_start(ks, q_obs, B);
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
  s.M = s.G * A, s.nw = nw, s.window = window;
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
  checks::check_gather_kv_not_empty(op, kv);
  const at::Tensor& ref = kv[0];
  for (size_t i = 0; i < kv.size(); ++i) checks::check_gather_kv_entry(op, kv, i);
  if (inplace) checks::check_gather_inplace_no_overlap(op, kv);
  TS_CHECK(ref.device().is_cpu(), op, "kv must hold CPU tensors here, got ", ref.device());
  const int64_t B = ref.size(0), Hk = ref.size(1), N = ref.size(2);
  checks::check_gather_idx(op, ref, idx, window, tail);
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
