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

template <typename T>
void flex_estimate_impl(const at::Tensor& q, const at::Tensor& k, const EstShape& s, float scale,
                        float* vert, float* slash, float* est) {
  const int64_t Nk = s.Nk, D = s.D, bs = s.bs, nb = s.nb, m = s.m;
  const T* qp = static_cast<const T*>(q.const_data_ptr());
  const T* kp = static_cast<const T*>(k.const_data_ptr());
  const int64_t qsb = q.stride(0), qsn = q.stride(1), qsh = q.stride(2);
  const int64_t ksb = k.stride(0), ksn = k.stride(1), ksh = k.stride(2);
  const float inv_m = 1.f / static_cast<float>(m);
  at::parallel_for(0, s.B * s.H, 1, [&](int64_t w0, int64_t w1) {
    std::vector<float> qbuf(m * D), logits(m * Nk), qbar(D), kbar(D), blk(nb), col(Nk),
        dia(Nk + m);
    std::vector<float> kconv(std::is_same_v<T, float> ? 0 : Nk * D);
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
          for (int64_t d = 0; d < D; ++d) kconv[j * D + d] = static_cast<float>(kh[j * ksn + d]);
        kf = kconv.data();
        kr = D;
      }
      for (int64_t d = 0; d < D; ++d) qbar[d] = 0.f;
      for (int64_t r = 0; r < m; ++r)
        for (int64_t d = 0; d < D; ++d) {
          const float x = static_cast<float>(qh[r * qsn + d]);
          qbuf[r * D + d] = scale * x;
          qbar[d] += x;
        }
      // logits = (scale * Q) K^T
      at::Tensor qt = at::from_blob(qbuf.data(), {m, D}, at::kFloat);
      at::Tensor kt = at::from_blob(const_cast<float*>(kf), {Nk, D}, {kr, 1}, at::kFloat);
      at::Tensor lt = at::from_blob(logits.data(), {m, Nk}, at::kFloat);
      at::cpu::mm_out(lt, qt, kt.t());

      // Causal softmax rows, in place: logits - row max over the visible keys [0, p_r], -inf
      // past them; one vectorised at::exp_ over the whole [m, Nk] buffer.
      float* L = logits.data();
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
      std::fill(col.begin(), col.end(), 0.f);
      std::fill(dia.begin(), dia.end(), 0.f);
      for (int64_t r = 0; r < m; ++r) {
        const float* row = L + r * Nk;
        const int64_t lim = flex::rep_query_pos(Nk, m, r) + 1;
        const float f = inv_m / sum8(row, lim);
        float* dr = dia.data() + (m - 1 - r);
        for (int64_t j = 0; j < lim; ++j) col[j] += f * row[j];
        for (int64_t j = 0; j < lim; ++j) dr[j] += f * row[j];
      }
      float* vrow = vert + w * nb;
      float* srow = slash + w * nb;
      for (int64_t c = 0; c < nb; ++c) {
        vrow[c] = sum8(col.data() + flex::block_begin(c, bs),
                       flex::block_end(c, Nk, bs) - flex::block_begin(c, bs));
        srow[c] = 0.f;
      }
      // e in [0, Nk + m - 1) holds offset delta = Nk - 1 - e (deltas < 0 get no mass).
      for (int64_t e = 0; e < Nk; ++e) srow[(Nk - 1 - e) / bs] += dia[e];
      // estimate: softmax_c(scale * qbar . kbar_c), no causal mask.
      float* erow = est + w * nb;
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

}  // namespace

TORCH_LIBRARY_IMPL(tasksieve, CPU, m) {
  m.impl("js_divergence", &js_divergence_cpu);
  m.impl("flex_estimate", &flex_estimate_cpu);
}

}  // namespace tasksieve
