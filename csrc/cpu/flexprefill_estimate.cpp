// CPU implementations of the FlexPrefill estimation ops (schemas in csrc/ops.cpp, references in
// python/tasksieve/reference.py):
//
//   js_divergence  p, q [..., n] (fp32/fp64/fp16/bf16) -> fp32 [...]: sqrt(JSD) per row
//   flex_estimate  q [B, Nq, H, D], k [B, Nk, Hk, D] (fp32/fp16/bf16), block_size
//                  -> (vertical, slash, estimate) fp32 [B, H, nb], nb = ceil(Nk / block_size)
//
// The index math (block counts, representative queries, offset blocks) and the JSD formulas
// come from include/tasksieve/flex_index.h, which the CUDA kernels share.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/mm_cpu_dispatch.h>
#include <ATen/ops/zeros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>

#include "../checks/flexprefill_checks.h"
#include "tasksieve/flex_index.h"
#include "tasksieve/paged_index.h"

namespace tasksieve {
namespace {

// ---------------------------------------------------------------------------------------------
// js_divergence
// ---------------------------------------------------------------------------------------------

template <typename T>
void js_rows(const T* p, const T* q, float* out, int64_t rows, int64_t n, float eps) {
  at::parallel_for(0, rows, 64, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const T* pr = p + r * n;
      const T* qr = q + r * n;
      double sp = 0, sq = 0;
      for (int64_t i = 0; i < n; ++i) {
        sp += static_cast<float>(pr[i]);
        sq += static_cast<float>(qr[i]);
      }
      const float fsp = static_cast<float>(sp), fsq = static_cast<float>(sq);
      double cp = 0, cq = 0;
      for (int64_t i = 0; i < n; ++i) {
        cp += flex::js_clamp(flex::js_normalize(static_cast<float>(pr[i]), fsp, n), eps);
        cq += flex::js_clamp(flex::js_normalize(static_cast<float>(qr[i]), fsq, n), eps);
      }
      const float fcp = static_cast<float>(cp), fcq = static_cast<float>(cq);
      double acc = 0;
      for (int64_t i = 0; i < n; ++i) {
        const float pi = flex::js_normalize(static_cast<float>(pr[i]), fsp, n);
        const float qi = flex::js_normalize(static_cast<float>(qr[i]), fsq, n);
        acc += flex::js_term(flex::js_clamp(pi, eps) / fcp, flex::js_clamp(qi, eps) / fcq);
      }
      out[r] = flex::js_finish(static_cast<float>(acc));
    }
  });
}

at::Tensor js_divergence_cpu(const at::Tensor& p, const at::Tensor& q, double eps) {
  TORCH_CHECK(p.device().is_cpu(), "tasksieve.js_divergence: p must be a CPU tensor here, got ",
              p.device());
  const checks::JsDivergenceArgs a = checks::check_js_divergence_args(p, q, eps);
  const int64_t n = a.n;
  const float feps = a.eps;
  auto out_sizes = p.sizes().vec();
  out_sizes.pop_back();
  at::Tensor out = at::empty(out_sizes, p.options().dtype(at::kFloat));
  const int64_t rows = out.numel();
  if (rows == 0) return out;
  at::Tensor pc = p, qc = q;
  if (p.scalar_type() == at::kDouble) pc = p.to(at::kFloat), qc = q.to(at::kFloat);
  pc = pc.contiguous();
  qc = qc.contiguous();
  float* o = out.data_ptr<float>();
  switch (pc.scalar_type()) {
    case at::kFloat:
      js_rows(pc.const_data_ptr<float>(), qc.const_data_ptr<float>(), o, rows, n, feps);
      break;
    case at::kHalf:
      js_rows(pc.const_data_ptr<c10::Half>(), qc.const_data_ptr<c10::Half>(), o, rows, n, feps);
      break;
    default:
      js_rows(pc.const_data_ptr<c10::BFloat16>(), qc.const_data_ptr<c10::BFloat16>(), o, rows, n,
              feps);
      break;
  }
  return out;
}

// ---------------------------------------------------------------------------------------------
// flex_estimate
//
// Work item = (b, h). The m representative queries, pre-multiplied by scale, times the keys of
// KV head h / G: one BLAS GEMM (at::cpu::mm_out, single-threaded inside parallel_for) into the
// thread's logits buffer [m, Nk]; then per row the causal softmax in place (keys j <= p_r),
// scaled by 1/m, and its mass summed into the key blocks (vertical) and the diagonal offset
// blocks (slash) by contiguous range sums. The buffer holds one head's [m, Nk] logits
// (m <= block_size), never the whole [B, H, m, Nk] tensor.
// ---------------------------------------------------------------------------------------------

// Sum of x[0, n) with 8 independent accumulators (no reassociation flags needed for ILP).
float sum8(const float* x, int64_t n) {
  float a[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int u = 0; u < 8; ++u) a[u] += x[i + u];
  float s = 0.f;
  for (; i < n; ++i) s += x[i];
  for (int u = 0; u < 8; ++u) s += a[u];
  return s;
}

struct EstShape {
  int64_t B, Nq, H, Hk, Nk, D, bs, nb, m, G;
};

// Per-thread buffers of estimate_head, sized for problems of up to Nk keys and m rep queries.
struct EstScratch {
  std::vector<float> qbuf, logits, qbar, kbar, blk, col, dia, kconv;
  EstScratch(int64_t m, int64_t Nk, int64_t D, int64_t nb, bool conv)
      : qbuf(m * D), logits(m * Nk), qbar(D), kbar(D), blk(nb), col(Nk), dia(Nk + m),
        kconv(conv ? Nk * D : 0) {}
};

// One (problem, query head): the m rep queries qh[r * qsn] (r < m, the last m queries) against
// the fp32 keys kf [Nk, D] (rows kr apart), nb = ceil(Nk / bs). Writes vrow, srow, erow [0, nb).
template <typename T>
void estimate_head(const T* qh, int64_t qsn, int64_t m, const float* kf, int64_t kr, int64_t Nk,
                   int64_t D, int64_t bs, float scale, EstScratch& sc, float* vrow, float* srow,
                   float* erow) {
  const int64_t nb = flex::num_blocks(Nk, bs);
  const float inv_m = 1.f / static_cast<float>(m);
  float* qbuf = sc.qbuf.data();
  float* qbar = sc.qbar.data();
  float* kbar = sc.kbar.data();
  float* blk = sc.blk.data();
  float* col = sc.col.data();
  float* dia = sc.dia.data();
  for (int64_t d = 0; d < D; ++d) qbar[d] = 0.f;
  for (int64_t r = 0; r < m; ++r)
    for (int64_t d = 0; d < D; ++d) {
      const float x = static_cast<float>(qh[r * qsn + d]);
      qbuf[r * D + d] = scale * x;
      qbar[d] += x;
    }
  // logits = (scale * Q) K^T
  at::Tensor qt = at::from_blob(qbuf, {m, D}, at::kFloat);
  at::Tensor kt = at::from_blob(const_cast<float*>(kf), {Nk, D}, {kr, 1}, at::kFloat);
  at::Tensor lt = at::from_blob(sc.logits.data(), {m, Nk}, at::kFloat);
  at::cpu::mm_out(lt, qt, kt.t());

  // Causal softmax rows, in place: logits - row max over the visible keys [0, p_r], -inf
  // past them; one vectorised at::exp_ over the whole [m, Nk] buffer.
  float* L = sc.logits.data();
  const float ninf = -std::numeric_limits<float>::infinity();
  for (int64_t r = 0; r < m; ++r) {
    float* row = L + r * Nk;
    const int64_t lim = flex::rep_query_pos(Nk, m, r) + 1;  // visible keys [0, lim)
    float mx = ninf;
    for (int64_t j = 0; j < lim; ++j) mx = row[j] > mx ? row[j] : mx;
    for (int64_t j = 0; j < lim; ++j) row[j] -= mx;
    for (int64_t j = lim; j < Nk; ++j) row[j] = ninf;
  }
  lt.exp_();
  // Column mass col[j] = sum_r A[r, j] and diagonal mass by e = j + (m - 1 - r), i.e.
  // offset delta = p_r - j = Nk - 1 - e: both forward axpys (vectorisable).
  std::fill(col, col + Nk, 0.f);
  std::fill(dia, dia + Nk + m, 0.f);
  for (int64_t r = 0; r < m; ++r) {
    const float* row = L + r * Nk;
    const int64_t lim = flex::rep_query_pos(Nk, m, r) + 1;
    const float f = inv_m / sum8(row, lim);
    float* dr = dia + (m - 1 - r);
    for (int64_t j = 0; j < lim; ++j) col[j] += f * row[j];
    for (int64_t j = 0; j < lim; ++j) dr[j] += f * row[j];
  }
  for (int64_t c = 0; c < nb; ++c) {
    vrow[c] = sum8(col + flex::block_begin(c, bs),
                   flex::block_end(c, Nk, bs) - flex::block_begin(c, bs));
    srow[c] = 0.f;
  }
  // e in [0, Nk + m - 1) holds offset delta = Nk - 1 - e (deltas < 0 get no mass).
  for (int64_t e = 0; e < Nk; ++e) srow[(Nk - 1 - e) / bs] += dia[e];
  // estimate: softmax_c(scale * qbar . kbar_c), no causal mask.
  for (int64_t d = 0; d < D; ++d) qbar[d] *= inv_m;
  float mx = -std::numeric_limits<float>::infinity();
  for (int64_t c = 0; c < nb; ++c) {
    const int64_t j0 = flex::block_begin(c, bs), j1 = flex::block_end(c, Nk, bs);
    for (int64_t d = 0; d < D; ++d) kbar[d] = 0.f;
    for (int64_t j = j0; j < j1; ++j)
      for (int64_t d = 0; d < D; ++d) kbar[d] += kf[j * kr + d];
    const float inv_n = 1.f / static_cast<float>(j1 - j0);
    float dot = 0.f;
    for (int64_t d = 0; d < D; ++d) dot += qbar[d] * kbar[d] * inv_n;
    blk[c] = scale * dot;
    mx = blk[c] > mx ? blk[c] : mx;
  }
  float sum = 0.f;
  for (int64_t c = 0; c < nb; ++c) sum += (blk[c] = std::exp(blk[c] - mx));
  for (int64_t c = 0; c < nb; ++c) erow[c] = blk[c] / sum;
}

// Work item = (b, h). The m representative queries, pre-multiplied by scale, times the keys of
// KV head h / G (fp32 tensors are read in place, fp16/bf16 converted once per head).
template <typename T>
void flex_estimate_impl(const at::Tensor& q, const at::Tensor& k, const EstShape& s, float scale,
                        float* vert, float* slash, float* est) {
  const int64_t Nk = s.Nk, D = s.D, bs = s.bs, nb = s.nb, m = s.m;
  const T* qp = static_cast<const T*>(q.const_data_ptr());
  const T* kp = static_cast<const T*>(k.const_data_ptr());
  const int64_t qsb = q.stride(0), qsn = q.stride(1), qsh = q.stride(2);
  const int64_t ksb = k.stride(0), ksn = k.stride(1), ksh = k.stride(2);
  at::parallel_for(0, s.B * s.H, 1, [&](int64_t w0, int64_t w1) {
    EstScratch sc(m, Nk, D, nb, !std::is_same_v<T, float>);
    for (int64_t w = w0; w < w1; ++w) {
      const int64_t b = w / s.H, h = w % s.H, hk = h / s.G;
      const T* qh = qp + b * qsb + h * qsh + flex::rep_query_index(s.Nq, m, 0) * qsn;
      const T* kh = kp + b * ksb + hk * ksh;
      // Keys of this KV head as an fp32 [Nk, D] matrix with row stride kr.
      const float* kf;
      int64_t kr;
      if constexpr (std::is_same_v<T, float>) {
        kf = kh;
        kr = ksn;
      } else {
        for (int64_t j = 0; j < Nk; ++j)
          for (int64_t d = 0; d < D; ++d)
            sc.kconv[j * D + d] = static_cast<float>(kh[j * ksn + d]);
        kf = sc.kconv.data();
        kr = D;
      }
      estimate_head(qh, qsn, m, kf, kr, Nk, D, bs, scale, sc, vert + w * nb, slash + w * nb,
                    est + w * nb);
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> flex_estimate_cpu(const at::Tensor& q,
                                                                 const at::Tensor& k,
                                                                 int64_t block_size,
                                                                 std::optional<double> scale) {
  checks::check_flex_estimate_ranks(q, k);
  TORCH_CHECK(q.device().is_cpu(), "tasksieve.flex_estimate: q must be a CPU tensor here, got ",
              q.device());
  const checks::FlexEstimateDims dims = checks::check_flex_estimate_args(q, k, block_size, scale);
  const auto dt = q.scalar_type();
  const int64_t B = dims.B, Nq = dims.Nq, H = dims.H, D = dims.D, Nk = dims.Nk, Hk = dims.Hk;
  EstShape s{B, Nq, H, Hk, Nk, D, block_size, flex::num_blocks(Nk, block_size),
             flex::num_rep_queries(Nq, block_size), Hk > 0 ? H / Hk : 0};
  auto opts = q.options().dtype(at::kFloat);
  at::Tensor vert = at::zeros({B, H, s.nb}, opts);
  at::Tensor slash = at::zeros({B, H, s.nb}, opts);
  at::Tensor est = at::zeros({B, H, s.nb}, opts);
  if (vert.numel() == 0 || s.m == 0) return {vert, slash, est};
  const float sc =
      static_cast<float>(scale.has_value() ? *scale : 1.0 / std::sqrt(static_cast<double>(D)));
  float* v = vert.data_ptr<float>();
  float* sl = slash.data_ptr<float>();
  float* e = est.data_ptr<float>();
  switch (dt) {
    case at::kFloat:
      flex_estimate_impl<float>(q, k, s, sc, v, sl, e);
      break;
    case at::kHalf:
      flex_estimate_impl<c10::Half>(q, k, s, sc, v, sl, e);
      break;
    default:
      flex_estimate_impl<c10::BFloat16>(q, k, s, sc, v, sl, e);
      break;
  }
  return {vert, slash, est};
}


// ---------------------------------------------------------------------------------------------
// flex_estimate_paged: work item = (sequence s, h); the nk_s keys of KV head h / G are gathered
// from their pages (converted to fp32) into the thread's buffer, then estimate_head as above.
// Entries past a sequence's nb_s stay 0 (outputs start as zeros).
// ---------------------------------------------------------------------------------------------
std::tuple<at::Tensor, at::Tensor, at::Tensor> flex_estimate_paged_cpu(
    const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& block_table_in,
    const at::Tensor& seq_lens_in, int64_t block_size, std::optional<double> scale,
    const std::optional<at::Tensor>& cu_seqlens_q_in) {
  const char* opn = "flex_estimate_paged";
  checks::check_paged_ranks(opn, q, k_cache, nullptr);
  TORCH_CHECK(q.device().is_cpu(), "tasksieve.", opn, ": q must be a CPU tensor here, got ",
              q.device());
  const checks::PagedDims d = checks::check_paged_args(
      opn, q, k_cache, nullptr, block_table_in, seq_lens_in, cu_seqlens_q_in,
      [&](at::ScalarType dt) {
        TORCH_CHECK(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16, "tasksieve.",
                    opn, ": q must be float32, float16 or bfloat16, got ", dt);
      },
      [&](int64_t D) {
        TORCH_CHECK(D >= 1 && D <= checks::kFlexEstimateMaxHeadDim, "tasksieve.", opn,
                    ": q head dim D must be in [1, 256], got ", D);
      },
      /*any_cache_strides=*/true);
  TORCH_CHECK(block_size >= 1, "tasksieve.", opn, ": block_size must be >= 1, got ", block_size);
  TORCH_CHECK(!scale.has_value() || std::isfinite(*scale), "tasksieve.", opn,
              ": scale must be finite, got ", scale.value_or(0.0));
  const checks::PagedTables tables =
      checks::read_paged_tables(opn, d, block_table_in, seq_lens_in, cu_seqlens_q_in, block_size, -1);
  const int32_t *table = tables.table, *lens = tables.lens, *cu_q = tables.cu_q;

  const int64_t nb_max = flex::num_blocks(d.max_pages * d.page_size, block_size);
  auto opts = q.options().dtype(at::kFloat);
  at::Tensor vert = at::zeros({d.S, d.H, nb_max}, opts);
  at::Tensor slash = at::zeros({d.S, d.H, nb_max}, opts);
  at::Tensor est = at::zeros({d.S, d.H, nb_max}, opts);
  if (vert.numel() == 0) return {vert, slash, est};
  const float sc =
      static_cast<float>(scale.has_value() ? *scale : 1.0 / std::sqrt(static_cast<double>(d.D)));
  int64_t nk_max = 0;
  for (int64_t s = 0; s < d.S; ++s) nk_max = std::max<int64_t>(nk_max, lens[s]);
  const int64_t D = d.D, H = d.H, G = d.H / d.Hk, bs = block_size;
  float* vp = vert.data_ptr<float>();
  float* sp = slash.data_ptr<float>();
  float* ep = est.data_ptr<float>();
  auto run = [&](auto tag) {
    using T = typename decltype(tag)::type;
    const T* qp = static_cast<const T*>(q.const_data_ptr());
    const T* kc = static_cast<const T*>(k_cache.const_data_ptr());
    const int64_t qsb = q.stride(0), qsn = q.stride(1), qsh = q.stride(2);
    const int64_t ksp = k_cache.stride(0), ksn = k_cache.stride(1), ksh = k_cache.stride(2);
    const int64_t ksd = D == 1 ? 1 : k_cache.stride(3);  // any: vLLM CPU pages hold K transposed
    at::parallel_for(0, d.S * H, 1, [&](int64_t w0, int64_t w1) {
      EstScratch scr(std::min<int64_t>(bs, std::max<int64_t>(d.Nq, 0)), nk_max, D,
                     flex::num_blocks(nk_max, bs), true);
      for (int64_t w = w0; w < w1; ++w) {
        const int64_t s = w / H, h = w % H, hk = h / G;
        const paged::SeqSpan span = paged::seq_span(cu_q, lens, s, d.Nq, d.kv_cap);
        const int64_t m = flex::num_rep_queries(span.nq, bs), nk = span.nk;
        if (m == 0 || nk == 0) continue;  // no queries or no keys: zeros
        const int64_t b = d.packed ? 0 : s;
        const T* qh = qp + b * qsb + h * qsh +
                      (span.q_begin + flex::rep_query_index(span.nq, m, 0)) * qsn;
        const int32_t* trow = table + s * d.max_pages;
        const T* kh = kc + hk * ksh;
        float* kf = scr.kconv.data();
        for (int64_t j = 0; j < nk; ++j) {
          const T* src = kh + paged::key_offset(trow, j, d.page_size, d.num_pages, ksp, ksn);
          for (int64_t dd = 0; dd < D; ++dd) kf[j * D + dd] = static_cast<float>(src[dd * ksd]);
        }
        estimate_head(qh, qsn, m, kf, D, nk, D, bs, sc, scr, vp + w * nb_max, sp + w * nb_max,
                      ep + w * nb_max);
      }
    });
  };
  struct F32 { using type = float; };
  struct F16 { using type = c10::Half; };
  struct BF16 { using type = c10::BFloat16; };
  if (q.scalar_type() == at::kFloat) {
    run(F32{});
  } else if (q.scalar_type() == at::kHalf) {
    run(F16{});
  } else {
    run(BF16{});
  }
  return {vert, slash, est};
}
}  // namespace

TORCH_LIBRARY_IMPL(tasksieve, CPU, m) {
  m.impl("js_divergence", &js_divergence_cpu);
  m.impl("flex_estimate", &flex_estimate_cpu);
  m.impl("flex_estimate_paged", &flex_estimate_paged_cpu);
}

}  // namespace tasksieve
