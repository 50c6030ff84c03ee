// CPU implementation of block_sparse_attention (schema in csrc/ops.cpp, reference
// reference_block_sparse_attention in python/tasksieve/reference.py):
//
//   q [B, Nq, H, D], k/v [B, Nk, Hk, D] (fp32/fp16/bf16), block_idx int32 [B, H, nbq, max_k],
//   block_cnt int32 [B, H, nbq]  ->  out [B, Nq, H, D] (q's dtype), lse fp32 [B, H, Nq]
//   packed varlen (cu_seqlens_q/_k int32 [S + 1]): B = 1, index rows [S, H, nbq_max, ...];
//   sequence s is the dense problem on its rows (block::seq_span), validated fully here.
//
// Work item = (b or sequence s, h, query block r), spread over at::parallel_for. Per item the
// pre-scaled fp32 query tile Q [m, D] (scale * log2 e folded in, so softmax uses exp2) visits
// the listed key blocks in order; per block:
//   1. S = Q K_c^T by one BLAS GEMM (MKL sgemm called directly and held single-threaded inside
//      parallel_for where torch has MKL; at::cpu::mm_out otherwise);
//   2. causal mask only if the block straddles the diagonal (block::tile_visibility); blocks
//      above it are skipped; online softmax per row (running max m, sum l), P = 2^(S - m);
//   3. O = O * 2^(m_old - m_new) + P V_c (rows rescaled, then a GEMM accumulating into O).
// fp16/bf16 inputs are converted to fp32 once up front (math in fp32). K/V rows are read in
// place through their strides (fp32), never repeated per query head (GQA: h -> h / G).
#include <ATen/Config.h>
#include <ATen/Parallel.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/mm_cpu_dispatch.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <optional>
#include <type_traits>
#include <vector>

#include "../checks/flexprefill_checks.h"
#include "tasksieve/block_index.h"
#include "tasksieve/paged_index.h"

// With MKL (x86 torch wheels) the per-block GEMMs call its BLAS directly: at::cpu::mm_out costs
// a dispatch, checks and a thread decision per 128x128 tile. MKL is told to stay single-threaded
// inside our parallel_for. Elsewhere the ATen op is used.
#if AT_MKL_ENABLED() && defined(__linux__)
#define TS_BSA_DIRECT_BLAS 1
extern "C" {
void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
            const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
            const float* beta, float* c, const int* ldc);
int MKL_Set_Num_Threads_Local(int nt);  // the C entry (lower case is Fortran)
}
#else
#define TS_BSA_DIRECT_BLAS 0
#endif

namespace tasksieve {
namespace {

// Row-major C[m, n] = alpha * A[m, k] B^T (tb) or A B (!tb) + beta * C; A rows lda apart, B rows
// ldb apart ([n, k] when tb, [k, n] otherwise), C rows ldc apart. All unit stride in the row.
void gemm_rm(bool tb, int64_t m, int64_t n, int64_t k, const float* a, int64_t lda,
             const float* b, int64_t ldb, float beta, float* c, int64_t ldc) {
#if TS_BSA_DIRECT_BLAS
  // Column-major view: C^T [n, m] = op(X) Y with X = B read column-major (B^T, so op 'T' when
  // tb, 'N' otherwise) and Y = A read column-major (A^T, op 'N').
  const char ta = tb ? 'T' : 'N', tn = 'N';
  const int mi = static_cast<int>(n), ni = static_cast<int>(m), ki = static_cast<int>(k);
  const int lb = static_cast<int>(ldb), la = static_cast<int>(lda), lc = static_cast<int>(ldc);
  const float one = 1.f;
  sgemm_(&ta, &tn, &mi, &ni, &ki, &one, b, &lb, a, &la, &beta, c, &lc);
#else
  at::Tensor cm = at::from_blob(c, {m, n}, {ldc, 1}, at::kFloat);
  const at::Tensor am = at::from_blob(const_cast<float*>(a), {m, k}, {lda, 1}, at::kFloat);
  const at::Tensor bm = tb ? at::from_blob(const_cast<float*>(b), {n, k}, {ldb, 1}, at::kFloat).t()
                           : at::from_blob(const_cast<float*>(b), {k, n}, {ldb, 1}, at::kFloat);
  if (beta == 0.f) {
    at::cpu::mm_out(cm, am, bm);
  } else {
    at::Tensor tmp = at::mm(am, bm);
    cm.add_(tmp);
  }
#endif
}

// ---------------------------------------------------------------------------------------------
// SIMD exp2 (same scheme as csrc/cpu/kv_window.cpp): GCC vector extensions, target_clones picks
// AVX-512/AVX2 once per process.
// ---------------------------------------------------------------------------------------------
typedef float vf8 __attribute__((vector_size(32)));
typedef int32_t vi8 __attribute__((vector_size(32)));

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#if __GNUC__ >= 12
#define TS_BSA_CLONES \
  __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define TS_BSA_CLONES __attribute__((target_clones("avx2", "default")))
#endif
#else
#define TS_BSA_CLONES
#endif

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wpsabi"
#endif
#define TS_BSA_INLINE inline __attribute__((always_inline))
#define bsa_splat8(x) (static_cast<float>(x) - vf8{})

TS_BSA_INLINE vf8 bsa_load8(const float* p) {
  vf8 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

TS_BSA_INLINE void bsa_store8(float* p, vf8 v) { std::memcpy(p, &v, sizeof(v)); }

// 2^x for x <= 0, ~2 ulp; x <= -127 (and -inf) gives 0.
TS_BSA_INLINE vf8 bsa_exp2_neg(vf8 x) {
  const vf8 lo = bsa_splat8(-127.f);
  x = x < lo ? lo : x;
  const vf8 magic = bsa_splat8(12582912.f);
  const vf8 n = (x + magic) - magic;
  const vf8 f = x - n;
  vf8 p = bsa_splat8(1.5252733804059840e-05f);
  p = p * f + bsa_splat8(1.5403530393381606e-04f);
  p = p * f + bsa_splat8(1.3333558146428443e-03f);
  p = p * f + bsa_splat8(9.6181291076284772e-03f);
  p = p * f + bsa_splat8(5.5504108664821580e-02f);
  p = p * f + bsa_splat8(2.4022650695910071e-01f);
  p = p * f + bsa_splat8(6.9314718055994531e-01f);
  p = p * f + bsa_splat8(1.0f);
  const vi8 e = (__builtin_convertvector(n, vi8) + 127) << 23;
  return p * (vf8)e;
}

// Row of S with `ld` floats (ld % 8 == 0), the first `lim` visible (the rest up to ld set to
// -inf first). Returns the row max mb; rewrites the row as 2^(S - m_new) with
// m_new = max(m_old, mb) and returns its sum in *sum (0 when m_new is -inf).
TS_BSA_CLONES
float softmax_row(float* row, int64_t lim, int64_t ld, float m_old, float* m_new, float* sum) {
  const float ninf = -std::numeric_limits<float>::infinity();
  for (int64_t c = lim; c < ld; ++c) row[c] = ninf;
  vf8 mx = bsa_splat8(ninf);
  for (int64_t c = 0; c < ld; c += 8) {
    const vf8 v = bsa_load8(row + c);
    mx = v > mx ? v : mx;
  }
  float mb = ninf;
  for (int i = 0; i < 8; ++i) mb = mx[i] > mb ? mx[i] : mb;
  const float mn = std::max(m_old, mb);
  *m_new = mn;
  if (mn == ninf) {  // nothing visible so far: P = 0
    std::memset(row, 0, sizeof(float) * ld);
    *sum = 0.f;
    return mb;
  }
  const vf8 mv = bsa_splat8(mn);
  vf8 acc = bsa_splat8(0.f);
  for (int64_t c = 0; c < ld; c += 8) {
    const vf8 p = bsa_exp2_neg(bsa_load8(row + c) - mv);
    bsa_store8(row + c, p);
    acc += p;
  }
  float s = 0.f;
  for (int i = 0; i < 8; ++i) s += acc[i];
  *sum = s;
  return mb;
}

// o[d] *= alpha, d < D.
TS_BSA_CLONES
void scale_row(float* o, float alpha, int64_t D) {
  if (alpha == 1.f) return;
  int64_t d = 0;
  const vf8 av = bsa_splat8(alpha);
  for (; d + 8 <= D; d += 8) bsa_store8(o + d, bsa_load8(o + d) * av);
  for (; d < D; ++d) o[d] *= alpha;
}

#define TS_CHECK(cond, ...) \
  TORCH_CHECK(cond, "tasksieve.block_sparse_attention: ", __VA_ARGS__)

constexpr int64_t kMaxHeadDimCpu = 256;

// Dense: S = B index rows; varlen: S sequences, B = 1, nbq = nbq_max.
struct Args {
  int64_t B, Nq, Nk, H, Hk, D, G, bs, nbq, nbk, max_k, S;
  bool varlen;
};

Args check_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                const at::Tensor& block_idx, const at::Tensor& block_cnt, int64_t block_size,
                const std::optional<at::Tensor>& cu_seqlens_q,
                const std::optional<at::Tensor>& cu_seqlens_k) {
  checks::check_block_sparse_attention_ranks(q, k, v);
  TS_CHECK(q.device().is_cpu(), "q must be a CPU tensor here, got ", q.device());
  const checks::BlockSparseAttentionDims d = checks::check_block_sparse_attention_args(
      q, k, v, block_idx, block_cnt, block_size, cu_seqlens_q, cu_seqlens_k,
      [](at::ScalarType dt) {
        TS_CHECK(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16,
                 "q must be float32, float16 or bfloat16, got ", dt);
      },
      [](int64_t D) {
        TS_CHECK(D >= 1 && D <= kMaxHeadDimCpu, "q head dim D must be in [1, 256], got ", D);
      });
  Args a{};
  a.B = d.B;
  a.Nq = d.Nq;
  a.H = d.H;
  a.D = d.D;
  a.Nk = d.Nk;
  a.Hk = d.Hk;
  a.G = a.H / a.Hk;
  a.bs = block_size;
  a.nbq = d.nbq;
  a.nbk = block::num_blocks(a.Nk, a.bs);
  a.max_k = d.max_k;
  a.S = d.S;
  a.varlen = d.varlen;
  return a;
}

template <typename T>
void store_row(T* dst, const float* src, float inv, int64_t D) {
  for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<T>(src[d] * inv);
}

// Packed varlen: sequence s's offsets in the packed rows; dense: batch row s, whole length.
block::SeqSpan span_of(const Args& a, const int32_t* cu_q, const int32_t* cu_k, int64_t s) {
  return a.varlen ? block::seq_span(cu_q, cu_k, s, a.Nq, a.Nk)
                  : block::SeqSpan{0, a.Nq, 0, a.Nk};
}

// Rows of query blocks past a sequence's length are ignored, so only the rows in use are
// checked. span(s) -> block::SeqSpan of index row s (only nq and nk are used); `per_seq` picks
// the per-sequence message form (varlen and paged), else dense messages keep their flat-index
// form.
template <typename Span>
void check_index_values(const char* op, int64_t S, int64_t H, int64_t nbq, int64_t max_k,
                        int64_t bs, bool per_seq, const int32_t* idx, const int32_t* cnt,
                        Span&& span) {
  for (int64_t s = 0; s < S; ++s) {
    const block::SeqSpan sp = span(s);
    const int64_t nbq_s = block::num_blocks(sp.nq, bs), nbk_s = block::num_blocks(sp.nk, bs);
    for (int64_t h = 0; h < H; ++h) {
      for (int64_t r = 0; r < nbq_s; ++r) {
        const int64_t t = (s * H + h) * nbq + r;
        const int64_t n = cnt[t];
        if (per_seq) {
          TORCH_CHECK(n >= 0 && n <= max_k, "tasksieve.", op, ": block_cnt values must be in "
                      "[0, max_k=", max_k, "], got ", n, " at sequence ", s, " head ", h,
                      " query block ", r);
        } else {
          TORCH_CHECK(n >= 0 && n <= max_k, "tasksieve.", op, ": block_cnt values must be in "
                      "[0, max_k=", max_k, "], got ", n, " at flat index ", t);
        }
        for (int64_t e = 0; e < n; ++e) {
          const int64_t c = idx[t * max_k + e];
          if (block::block_column_valid(c, nbk_s)) continue;
          if (per_seq) {
            TORCH_CHECK(false, "tasksieve.", op, ": block_idx values must be in [0, nbk=", nbk_s,
                        ") of sequence ", s, " (nbk = ceil(nk / block_size), nk=", sp.nk,
                        "), got ", c, " at sequence ", s, " head ", h, " query block ", r,
                        " entry ", e);
          }
          TORCH_CHECK(false, "tasksieve.", op, ": block_idx values must be in [0, nbk=", nbk_s,
                      ") (nbk = ceil(Nk / block_size)), got ", c, " at row ", t, " entry ", e);
        }
      }
    }
  }
}

// Per-thread scratch of the work items (one query block of one head).
struct Scratch {
  std::vector<float> qt, st, o, m, l, alpha, kbuf, vbuf;
  Scratch(int64_t bs, int64_t D, int64_t ld, bool gather)
      : qt(bs * D), st(bs * ld), o(bs * D), m(bs), l(bs), alpha(bs),
        kbuf(gather ? bs * D : 0), vbuf(gather ? bs * D : 0) {}
};

// K or V rows of one (sequence, KV head) as fp32 row ranges: rows(k0, n, buf, &ld) returns n
// consecutive key rows starting at key k0, ld floats apart. The contiguous form points into the
// (fp32) tensor; the paged form gathers the rows from their pages into `buf` (converting to
// fp32), or points into the page when T is float and the range lies in one page.
struct ContigRows {
  const float* base;
  int64_t stride;
  const float* rows(int64_t k0, int64_t, float*, int64_t* ld) const {
    *ld = stride;
    return base + k0 * stride;
  }
};

template <typename T>
struct PagedRows {
  const T* base;  // cache + hk * head stride
  const int32_t* table;
  int64_t page_size, num_pages, page_stride, row_stride, D;
  int64_t elem_stride;  // along D: 1, or page_size for vLLM CPU's transposed K pages
  const float* rows(int64_t k0, int64_t n, float* buf, int64_t* ld) const {
    if constexpr (std::is_same_v<T, float>) {
      if (elem_stride == 1 &&
          paged::page_of(k0, page_size) == paged::page_of(k0 + n - 1, page_size)) {
        *ld = row_stride;
        return base + paged::key_offset(table, k0, page_size, num_pages, page_stride,
                                         row_stride);
      }
    }
    for (int64_t r = 0; r < n; ++r) {
      const T* src =
          base + paged::key_offset(table, k0 + r, page_size, num_pages, page_stride, row_stride);
      float* dst = buf + r * D;
      for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<float>(src[d * elem_stride]);
    }
    *ld = D;
    return buf;
  }
};

// One work item: query block r (rows [q0, q1) of a problem with nq queries, the last of its Nk
// keys) of one head. q_row(i) = fp32 q row of query i of the problem; the listed columns
// cols[0..n) are walked in order (S = Q K_c^T, online softmax, O = O * alpha + P V_c); the rows
// are written to lse_row[i] and the output at out + out_off + i * osn (q's dtype).
template <class QRow, class KR, class VR>
void attend_item(QRow&& q_row, int64_t nq, int64_t Nk, int64_t r, const int32_t* cols, int64_t n,
                 const KR& kr, const VR& vr, int64_t bs, int64_t D, bool causal, float qscale,
                 Scratch& sc, float* lse_row, void* op, at::ScalarType out_dt, int64_t out_off,
                 int64_t osn) {
  const float ninf = -std::numeric_limits<float>::infinity();
  const int64_t ld = round_up(bs, int64_t{8});
  const int64_t q0 = block::block_begin(r, bs), q1 = block::block_end(r, bs, nq);
  if (q0 >= q1) return;  // query block past a sequence's end
  const int64_t mq = q1 - q0;
  float* qt = sc.qt.data();
  float* st = sc.st.data();
  float* o = sc.o.data();
  float* m = sc.m.data();
  float* l = sc.l.data();
  float* alpha = sc.alpha.data();
  for (int64_t i = 0; i < mq; ++i) {
    const float* src = q_row(q0 + i);
    for (int64_t d = 0; d < D; ++d) qt[i * D + d] = src[d] * qscale;
  }
  std::fill(o, o + mq * D, 0.f);
  std::fill(m, m + bs, ninf);
  std::fill(l, l + bs, 0.f);
  for (int64_t e = 0; e < n; ++e) {
    const int64_t c = cols[e];
    const int64_t k0 = block::block_begin(c, bs), k1 = block::block_end(c, bs, Nk);
    const int64_t nk = k1 - k0;
    const auto vis = block::tile_visibility(q0, q1, k0, k1, nq, Nk, causal);
    if (vis == block::kSkip) continue;
    int64_t kld = 0, vld = 0;
    const float* kp = kr.rows(k0, nk, sc.kbuf.data(), &kld);
    gemm_rm(true, mq, nk, D, qt, D, kp, kld, 0.f, st, ld);
    for (int64_t i = 0; i < mq; ++i) {
      int64_t lim = nk;
      if (vis == block::kPartial)
        lim = std::clamp(block::query_key_end(q0 + i, nq, Nk, true) - k0, int64_t{0}, nk);
      float mn, sum;
      softmax_row(st + i * ld, lim, ld, m[i], &mn, &sum);
      const float alpha_i = m[i] == ninf ? 0.f : std::exp2(m[i] - mn);
      l[i] = l[i] * alpha_i + sum;
      m[i] = mn;
      alpha[i] = alpha_i;
    }
    for (int64_t i = 0; i < mq; ++i) scale_row(o + i * D, alpha[i], D);
    const float* vp = vr.rows(k0, nk, sc.vbuf.data(), &vld);
    gemm_rm(false, mq, D, nk, st, ld, vp, vld, 1.f, o, D);
  }
  for (int64_t i = 0; i < mq; ++i) {
    const int64_t qi = q0 + i;
    const bool any = l[i] > 0.f;
    lse_row[qi] = any ? static_cast<float>((m[i] + std::log2(l[i])) * M_LN2) : ninf;
    const float inv = any ? 1.f / l[i] : 0.f;
    const int64_t off = out_off + qi * osn;
    if (out_dt == at::kFloat) {
      store_row(static_cast<float*>(op) + off, o + i * D, inv, D);
    } else if (out_dt == at::kHalf) {
      store_row(static_cast<at::Half*>(op) + off, o + i * D, inv, D);
    } else {
      store_row(static_cast<at::BFloat16*>(op) + off, o + i * D, inv, D);
    }
  }
}

std::tuple<at::Tensor, at::Tensor> block_sparse_attention_cpu(
    const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
    const at::Tensor& block_idx_in, const at::Tensor& block_cnt_in, int64_t block_size,
    std::optional<double> scale_opt, bool causal,
    const std::optional<at::Tensor>& cu_seqlens_q_in,
    const std::optional<at::Tensor>& cu_seqlens_k_in) {
  const Args a = check_args(q_in, k_in, v_in, block_idx_in, block_cnt_in, block_size,
                            cu_seqlens_q_in, cu_seqlens_k_in);
  const at::Tensor block_idx = block_idx_in.contiguous();
  const at::Tensor block_cnt = block_cnt_in.contiguous();
  const int32_t* idx = block_idx.const_data_ptr<int32_t>();
  const int32_t* cnt = block_cnt.const_data_ptr<int32_t>();
  at::Tensor cu_seqlens_q, cu_seqlens_k;
  const int32_t* cu_q = nullptr;
  const int32_t* cu_k = nullptr;
  if (a.varlen) {
    cu_seqlens_q = cu_seqlens_q_in->contiguous();
    cu_seqlens_k = cu_seqlens_k_in->contiguous();
    cu_q = cu_seqlens_q.const_data_ptr<int32_t>();
    cu_k = cu_seqlens_k.const_data_ptr<int32_t>();
    checks::check_block_sparse_varlen_offsets(cu_q, cu_k, a.S, a.Nq, a.Nk, a.bs, a.nbq);
  }
  check_index_values("block_sparse_attention", a.S, a.H, a.nbq, a.max_k, a.bs, a.varlen, idx,
                     cnt, [&](int64_t s) { return span_of(a, cu_q, cu_k, s); });
  const int64_t rows = a.S * a.H * a.nbq;
  const double scale = scale_opt.has_value() ? *scale_opt : 1.0 / std::sqrt(double(a.D));
  TS_CHECK(std::isfinite(scale), "scale must be finite, got ", scale);

  at::Tensor out = at::empty({a.B, a.Nq, a.H, a.D}, q_in.options());
  at::Tensor lse = at::empty({a.B, a.H, a.Nq}, q_in.options().dtype(at::kFloat));
  if (out.numel() == 0 && lse.numel() == 0) return {out, lse};
  if (a.Nq == 0 || a.B == 0 || a.H == 0) return {out, lse};

  // fp32 views (a conversion once for fp16/bf16; a no-op for fp32).
  const at::Tensor q = q_in.to(at::kFloat), k = k_in.to(at::kFloat), v = v_in.to(at::kFloat);
  const float* qp = q.const_data_ptr<float>();
  const float* kp = k.const_data_ptr<float>();
  const float* vp = v.const_data_ptr<float>();
  const int64_t qsb = q.stride(0), qsn = q.stride(1), qsh = q.stride(2);
  const int64_t ksb = k.stride(0), ksn = k.stride(1), ksh = k.stride(2);
  const int64_t vsb = v.stride(0), vsn = v.stride(1), vsh = v.stride(2);
  const int64_t H = a.H, D = a.D, Nq = a.Nq, bs = a.bs, nbq = a.nbq;
  const int64_t G = a.G, max_k = a.max_k;
  const bool varlen = a.varlen;
  const float qscale = static_cast<float>(scale * M_LOG2E);
  const auto out_dt = out.scalar_type();
  float* lp = lse.data_ptr<float>();
  void* op = out.data_ptr();
  const int64_t osb = out.stride(0), osn = out.stride(1), osh = out.stride(2);
  const int64_t ld = round_up(bs, int64_t{8});

  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;  // workers: no autograd around at::mm
#if TS_BSA_DIRECT_BLAS
    const int prev_threads = MKL_Set_Num_Threads_Local(1);
#endif
    Scratch sc(bs, D, ld, false);
    for (int64_t t = begin; t < end; ++t) {
      // Heads outermost: parallel_for hands each thread one contiguous range, and sequences
      // of a packed batch differ a lot in work (quadratic in length), so a range of heads over
      // every sequence balances where a range of sequences would not.
      const int64_t h = t / (rows / H), sr = t % (rows / H), s = sr / nbq, r = sr % nbq;
      const int64_t item = (s * H + h) * nbq + r, hk = h / G;
      // Sequence s's own problem: nq queries (the last of its nk keys) starting at packed row
      // sq0, keys at sk0; b = the batch row of the data (always 0 when packed).
      const block::SeqSpan sp = span_of(a, cu_q, cu_k, s);
      const int64_t b = varlen ? 0 : s, sq0 = sp.q_begin, sk0 = sp.k_begin;
      const float* qh = qp + b * qsb + sq0 * qsn + h * qsh;
      const ContigRows kr{kp + b * ksb + sk0 * ksn + hk * ksh, ksn};
      const ContigRows vr{vp + b * vsb + sk0 * vsn + hk * vsh, vsn};
      attend_item([&](int64_t i) { return qh + i * qsn; }, sp.nq, sp.nk, r, idx + item * max_k,
                  cnt[item], kr, vr, bs, D, causal, qscale, sc, lp + (b * H + h) * Nq + sq0, op,
                  out_dt, b * osb + sq0 * osn + h * osh, osn);
    }
#if TS_BSA_DIRECT_BLAS
    MKL_Set_Num_Threads_Local(prev_threads);
#endif
  });
  return {out, lse};
}

// ---------------------------------------------------------------------------------------------
// block_sparse_attention_paged: the same work items, K/V rows read through the block table
// (PagedRows). q is converted to fp32 once (it is this chunk's queries); the caches are read in
// their dtype, one key block at a time, so no copy of the cache is ever made.
// ---------------------------------------------------------------------------------------------
std::tuple<at::Tensor, at::Tensor> block_sparse_attention_paged_cpu(
    const at::Tensor& q_in, const at::Tensor& k_cache, const at::Tensor& v_cache,
    const at::Tensor& block_table_in, const at::Tensor& seq_lens_in,
    const at::Tensor& block_idx_in, const at::Tensor& block_cnt_in, int64_t block_size,
    std::optional<double> scale_opt, bool causal,
    const std::optional<at::Tensor>& cu_seqlens_q_in) {
  const char* opn = "block_sparse_attention_paged";
  checks::check_paged_ranks(opn, q_in, k_cache, &v_cache);
  TORCH_CHECK(q_in.device().is_cpu(), "tasksieve.", opn, ": q must be a CPU tensor here, got ",
              q_in.device());
  const checks::PagedDims d = checks::check_paged_args(
      opn, q_in, k_cache, &v_cache, block_table_in, seq_lens_in, cu_seqlens_q_in,
      [&](at::ScalarType dt) {
        TORCH_CHECK(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16, "tasksieve.",
                    opn, ": q must be float32, float16 or bfloat16, got ", dt);
      },
      [&](int64_t D) {
        TORCH_CHECK(D >= 1 && D <= kMaxHeadDimCpu, "tasksieve.", opn,
                    ": q head dim D must be in [1, 256], got ", D);
      },
      /*any_cache_strides=*/true);
  const auto [nbq, max_k] =
      checks::check_paged_index_args(opn, d, q_in, block_idx_in, block_cnt_in, block_size);
  const double scale = scale_opt.has_value() ? *scale_opt : 1.0 / std::sqrt(double(d.D));
  TORCH_CHECK(std::isfinite(scale), "tasksieve.", opn, ": scale must be finite, got ", scale);
  const checks::PagedTables tables =
      checks::read_paged_tables(opn, d, block_table_in, seq_lens_in, cu_seqlens_q_in, block_size, nbq);
  const int32_t *table = tables.table, *lens = tables.lens, *cu_q = tables.cu_q;
  const at::Tensor block_idx = block_idx_in.contiguous();
  const at::Tensor block_cnt = block_cnt_in.contiguous();
  const int32_t* idx = block_idx.const_data_ptr<int32_t>();
  const int32_t* cnt = block_cnt.const_data_ptr<int32_t>();
  auto span = [&](int64_t s) {
    const paged::SeqSpan p = paged::seq_span(cu_q, lens, s, d.Nq, d.kv_cap);
    return block::SeqSpan{p.q_begin, p.nq, 0, p.nk};
  };
  check_index_values(opn, d.S, d.H, nbq, max_k, block_size, true, idx, cnt, span);

  at::Tensor out = at::empty({d.B, d.Nq, d.H, d.D}, q_in.options());
  at::Tensor lse = at::empty({d.B, d.H, d.Nq}, q_in.options().dtype(at::kFloat));
  if (d.Nq == 0 || d.S == 0 || d.H == 0) return {out, lse};

  const at::Tensor q = q_in.to(at::kFloat);
  const float* qp = q.const_data_ptr<float>();
  const int64_t qsb = q.stride(0), qsn = q.stride(1), qsh = q.stride(2);
  const int64_t H = d.H, D = d.D, Nq = d.Nq, bs = block_size, G = d.H / d.Hk;
  const int64_t rows = d.S * H * nbq;
  const float qscale = static_cast<float>(scale * M_LOG2E);
  const auto out_dt = out.scalar_type();
  float* lp = lse.data_ptr<float>();
  void* op = out.data_ptr();
  const int64_t osb = out.stride(0), osn = out.stride(1), osh = out.stride(2);
  const int64_t ld = round_up(bs, int64_t{8});
  const bool packed = d.packed;

  auto run = [&](auto tag) {
    using T = typename decltype(tag)::type;
    const T* kc = static_cast<const T*>(k_cache.const_data_ptr());
    const T* vc = static_cast<const T*>(v_cache.const_data_ptr());
    const int64_t ksp = k_cache.stride(0), ksn = k_cache.stride(1), ksh = k_cache.stride(2);
    const int64_t vsp = v_cache.stride(0), vsn = v_cache.stride(1), vsh = v_cache.stride(2);
    const int64_t ksd = D == 1 ? 1 : k_cache.stride(3), vsd = D == 1 ? 1 : v_cache.stride(3);
    at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
      at::AutoDispatchBelowADInplaceOrView below_autograd;  // workers: no autograd around at::mm
#if TS_BSA_DIRECT_BLAS
      const int prev_threads = MKL_Set_Num_Threads_Local(1);
#endif
      Scratch sc(bs, D, ld, true);
      for (int64_t t = begin; t < end; ++t) {
        // heads outermost, as the contiguous op (balances sequences of different lengths)
        const int64_t h = t / (rows / H), sr = t % (rows / H), s = sr / nbq, r = sr % nbq;
        const int64_t item = (s * H + h) * nbq + r, hk = h / G;
        const paged::SeqSpan sp = paged::seq_span(cu_q, lens, s, Nq, d.kv_cap);
        const int64_t b = packed ? 0 : s, sq0 = sp.q_begin;
        const float* qh = qp + b * qsb + sq0 * qsn + h * qsh;
        const int32_t* trow = table + s * d.max_pages;
        const PagedRows<T> kr{kc + hk * ksh, trow, d.page_size, d.num_pages, ksp, ksn, D, ksd};
        const PagedRows<T> vr{vc + hk * vsh, trow, d.page_size, d.num_pages, vsp, vsn, D, vsd};
        attend_item([&](int64_t i) { return qh + i * qsn; }, sp.nq, sp.nk, r,
                    idx + item * max_k, cnt[item], kr, vr, bs, D, causal, qscale, sc,
                    lp + (b * H + h) * Nq + sq0, op, out_dt, b * osb + sq0 * osn + h * osh, osn);
      }
#if TS_BSA_DIRECT_BLAS
      MKL_Set_Num_Threads_Local(prev_threads);
#endif
    });
  };
  struct F32 { using type = float; };
  struct F16 { using type = at::Half; };
  struct BF16 { using type = at::BFloat16; };
  if (k_cache.scalar_type() == at::kFloat) {
    run(F32{});
  } else if (k_cache.scalar_type() == at::kHalf) {
    run(F16{});
  } else {
    run(BF16{});
  }
  return {out, lse};
}

#undef TS_CHECK

}  // namespace
}  // namespace tasksieve

TORCH_LIBRARY_IMPL(tasksieve, CPU, m) {
  m.impl("block_sparse_attention", &tasksieve::block_sparse_attention_cpu);
  m.impl("block_sparse_attention_paged", &tasksieve::block_sparse_attention_paged_cpu);
}
