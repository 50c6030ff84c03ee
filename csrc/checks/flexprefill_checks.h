// Argument checks of the FlexPrefill torch glue (schemas in csrc/ops.cpp), shared by the CPU
// (csrc/cpu/*.cpp) and CUDA (csrc/cuda/*.cu) bindings so both reject the same inputs with the
// same messages. Torch-dependent, hence not under csrc/include/ (torch-free kernel headers).
//
// Each caller keeps its own device-kind check (is_cpu / is_cuda, "must be a CPU/CUDA tensor
// here") and runs it at the point noted on each function, so the order of the checks, and so
// the first error reported, is the same as before the checks were shared.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <cstdint>
#include <optional>
#include <utility>

#include "tasksieve/block_index.h"
#include "tasksieve/flex_index.h"
#include "tasksieve/paged_index.h"

namespace tasksieve {
namespace checks {

// ---------------------------------------------------------------------------------------------
// select_blocks: vertical, slash [B, H, nb], qa_map [B, H, nbq, nb] (fp32), is_query_aware
// bool [B, H]. Call after the device-kind check of vertical.
// ---------------------------------------------------------------------------------------------

struct SelectBlocksDims {
  int64_t B, H, nb, nbq;
};

inline SelectBlocksDims check_select_blocks_args(const at::Tensor& vertical,
                                                 const at::Tensor& slash,
                                                 const at::Tensor& qa_map,
                                                 const at::Tensor& is_query_aware, int64_t q_len,
                                                 int64_t kv_len, int64_t block_size,
                                                 double gamma, int64_t min_blocks,
                                                 int64_t max_blocks) {
  TORCH_CHECK(slash.device() == vertical.device(),
              "tasksieve.select_blocks: slash must be on the device of vertical (",
              vertical.device(), "), got ", slash.device());
  TORCH_CHECK(qa_map.device() == vertical.device(),
              "tasksieve.select_blocks: qa_map must be on the device of vertical (",
              vertical.device(), "), got ", qa_map.device());
  TORCH_CHECK(is_query_aware.device() == vertical.device(),
              "tasksieve.select_blocks: is_query_aware must be on the device of vertical (",
              vertical.device(), "), got ", is_query_aware.device());
  TORCH_CHECK(vertical.scalar_type() == at::kFloat,
              "tasksieve.select_blocks: vertical must be float32, got ", vertical.scalar_type());
  TORCH_CHECK(slash.scalar_type() == at::kFloat,
              "tasksieve.select_blocks: slash must be float32, got ", slash.scalar_type());
  TORCH_CHECK(qa_map.scalar_type() == at::kFloat,
              "tasksieve.select_blocks: qa_map must be float32, got ", qa_map.scalar_type());
  TORCH_CHECK(is_query_aware.scalar_type() == at::kBool,
              "tasksieve.select_blocks: is_query_aware must be bool, got ",
              is_query_aware.scalar_type());
  TORCH_CHECK(block_size >= 1, "tasksieve.select_blocks: block_size must be >= 1, got ",
              block_size);
  TORCH_CHECK(q_len >= 0 && q_len <= kv_len,
              "tasksieve.select_blocks: q_len must be in [0, kv_len=", kv_len,
              "] (queries are the last q_len positions), got q_len=", q_len);
  TORCH_CHECK(std::isfinite(gamma) && gamma > 0.0 && gamma <= 1.0,
              "tasksieve.select_blocks: gamma must be in (0, 1], got ", gamma);
  TORCH_CHECK(min_blocks >= 0, "tasksieve.select_blocks: min_blocks must be >= 0, got ",
              min_blocks);
  TORCH_CHECK(max_blocks >= min_blocks,
              "tasksieve.select_blocks: max_blocks must be >= min_blocks=", min_blocks, ", got ",
              max_blocks);
  const int64_t nb = flex::num_blocks(kv_len, block_size);
  const int64_t nbq = flex::num_blocks(q_len, block_size);
  TORCH_CHECK(vertical.dim() == 3 && vertical.size(2) == nb,
              "tasksieve.select_blocks: vertical must have shape [B, H, nb] with nb = "
              "ceil(kv_len / block_size) = ", nb, ", got ", vertical.sizes());
  const int64_t B = vertical.size(0), H = vertical.size(1);
  TORCH_CHECK(slash.sizes() == vertical.sizes(),
              "tasksieve.select_blocks: slash must have the shape of vertical (",
              vertical.sizes(), "), got ", slash.sizes());
  TORCH_CHECK(qa_map.dim() == 4 && qa_map.size(0) == B && qa_map.size(1) == H &&
                  qa_map.size(2) == nbq && qa_map.size(3) == nb,
              "tasksieve.select_blocks: qa_map must have shape [B, H, nbq, nb] = [", B, ", ", H,
              ", ", nbq, ", ", nb, "] (nbq = ceil(q_len / block_size)), got ", qa_map.sizes());
  TORCH_CHECK(is_query_aware.dim() == 2 && is_query_aware.size(0) == B &&
                  is_query_aware.size(1) == H,
              "tasksieve.select_blocks: is_query_aware must have shape [B, H] = [", B, ", ", H,
              "], got ", is_query_aware.sizes());
  TORCH_CHECK(nbq * nb <= static_cast<int64_t>(UINT32_MAX),
              "tasksieve.select_blocks: nbq * nb must be < 2^32, got ", nbq * nb);
  return {B, H, nb, nbq};
}

// ---------------------------------------------------------------------------------------------
// js_divergence: p, q [..., n] (fp32/fp64/fp16/bf16). Call after the device-kind check of p.
// Returns n and eps as float32.
// ---------------------------------------------------------------------------------------------

struct JsDivergenceArgs {
  int64_t n;
  float eps;
};

inline JsDivergenceArgs check_js_divergence_args(const at::Tensor& p, const at::Tensor& q,
                                                 double eps) {
  TORCH_CHECK(q.device() == p.device(), "tasksieve.js_divergence: q must be on the device of p (",
              p.device(), "), got ", q.device());
  const auto dt = p.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble || dt == at::kHalf || dt == at::kBFloat16,
              "tasksieve.js_divergence: p must be a float tensor (float32, float64, float16 or "
              "bfloat16), got ", dt);
  TORCH_CHECK(q.scalar_type() == dt, "tasksieve.js_divergence: q must have the dtype of p (", dt,
              "), got ", q.scalar_type());
  TORCH_CHECK(p.dim() >= 1, "tasksieve.js_divergence: p must have at least 1 dim [..., n], got "
              "a 0-d tensor");
  TORCH_CHECK(q.sizes() == p.sizes(), "tasksieve.js_divergence: q must have the shape of p (",
              p.sizes(), "), got ", q.sizes());
  const int64_t n = p.size(-1);
  TORCH_CHECK(n >= 1, "tasksieve.js_divergence: the last dim n of p must be >= 1, got ", n);
  TORCH_CHECK(std::isfinite(eps) && eps > 0,
              "tasksieve.js_divergence: eps must be finite and > 0, got ", eps);
  const float feps = static_cast<float>(eps);
  TORCH_CHECK(feps > 0, "tasksieve.js_divergence: eps must be representable in float32 (> 0), "
              "got ", eps);
  return {n, feps};
}

// ---------------------------------------------------------------------------------------------
// flex_estimate: q [B, Nq, H, D], k [B, Nk, Hk, D] (fp32/fp16/bf16). Order of the checks:
//   check_flex_estimate_ranks(q, k);        // q, k are 4-D
//   <device-kind check of q>;
//   check_flex_estimate_args(q, k, block_size, scale, extra_block_size_check);
// extra_block_size_check(block_size) runs after "block_size >= 1" and before the scale check
// (the CUDA op restricts block_size further; the CPU op passes nothing).
// ---------------------------------------------------------------------------------------------

constexpr int64_t kFlexEstimateMaxHeadDim = 256;

inline void check_flex_estimate_ranks(const at::Tensor& q, const at::Tensor& k) {
  TORCH_CHECK(q.dim() == 4,
              "tasksieve.flex_estimate: q must be a 4-D tensor [B, Nq, H, D], got shape ",
              q.sizes());
  TORCH_CHECK(k.dim() == 4,
              "tasksieve.flex_estimate: k must be a 4-D tensor [B, Nk, Hk, D], got shape ",
              k.sizes());
}

struct FlexEstimateDims {
  int64_t B, Nq, H, D, Nk, Hk;
};

template <typename ExtraBlockSizeCheck>
FlexEstimateDims check_flex_estimate_args(const at::Tensor& q, const at::Tensor& k,
                                          int64_t block_size, std::optional<double> scale,
                                          ExtraBlockSizeCheck&& extra_block_size_check) {
  TORCH_CHECK(k.device() == q.device(), "tasksieve.flex_estimate: k must be on the device of q (",
              q.device(), "), got ", k.device());
  const auto dt = q.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16,
              "tasksieve.flex_estimate: q must be float32, float16 or bfloat16, got ", dt);
  TORCH_CHECK(k.scalar_type() == dt, "tasksieve.flex_estimate: k must have the dtype of q (", dt,
              "), got ", k.scalar_type());
  const int64_t B = q.size(0), Nq = q.size(1), H = q.size(2), D = q.size(3);
  const int64_t Nk = k.size(1), Hk = k.size(2);
  TORCH_CHECK(k.size(0) == B, "tasksieve.flex_estimate: k must have the batch size of q (", B,
              "), got ", k.size(0));
  TORCH_CHECK(D >= 1 && D <= kFlexEstimateMaxHeadDim,
              "tasksieve.flex_estimate: q head dim D must be in [1, 256], got ", D);
  TORCH_CHECK(k.size(3) == D, "tasksieve.flex_estimate: k head dim must equal q head dim (", D,
              "), got ", k.size(3));
  TORCH_CHECK(Hk >= 1 && H % Hk == 0,
              "tasksieve.flex_estimate: k heads Hk must be >= 1 and divide the q heads H=", H,
              ", got Hk=", Hk);
  TORCH_CHECK(q.stride(3) == 1 || D == 1,
              "tasksieve.flex_estimate: q must be contiguous in the last dim (stride 1), got "
              "stride ", q.stride(3));
  TORCH_CHECK(k.stride(3) == 1 || D == 1,
              "tasksieve.flex_estimate: k must be contiguous in the last dim (stride 1), got "
              "stride ", k.stride(3));
  TORCH_CHECK(Nq <= Nk, "tasksieve.flex_estimate: q length Nq must be <= the k length Nk=", Nk,
              " (queries are the last Nq positions), got Nq=", Nq);
  TORCH_CHECK(block_size >= 1, "tasksieve.flex_estimate: block_size must be >= 1, got ",
              block_size);
  extra_block_size_check(block_size);
  TORCH_CHECK(!scale.has_value() || std::isfinite(*scale),
              "tasksieve.flex_estimate: scale must be finite, got ", scale.value_or(0.0));
  return {B, Nq, H, D, Nk, Hk};
}

inline FlexEstimateDims check_flex_estimate_args(const at::Tensor& q, const at::Tensor& k,
                                                 int64_t block_size,
                                                 std::optional<double> scale) {
  return check_flex_estimate_args(q, k, block_size, scale, [](int64_t) {});
}

// ---------------------------------------------------------------------------------------------
// block_sparse_attention: q [B, Nq, H, D], k/v [B, Nk, Hk, D], block_idx int32 [B, H, nbq,
// max_k], block_cnt int32 [B, H, nbq]; packed varlen (cu_seqlens_q and cu_seqlens_k int32
// [S + 1]): B = 1, block_idx [S, H, nbq_max, max_k], block_cnt [S, H, nbq_max]. Order:
//   check_block_sparse_attention_ranks(q, k, v);   // q, k, v are 4-D
//   <device-kind check of q>;
//   check_block_sparse_attention_args(q, k, v, block_idx, block_cnt, block_size,
//                                     cu_seqlens_q, cu_seqlens_k, check_q_dtype, check_head_dim);
//   (CPU only) check_block_sparse_varlen_offsets(...)  // reads the offsets: needs host memory
// check_q_dtype(dt) and check_head_dim(D) hold the checks whose limits differ between the CPU
// and the CUDA op; they run where those ops always ran them. Values inside block_idx /
// block_cnt and the scale are not checked here.
// ---------------------------------------------------------------------------------------------

#define TS_BSA_CHECK(cond, ...) \
  TORCH_CHECK(cond, "tasksieve.block_sparse_attention: ", __VA_ARGS__)

inline void check_block_sparse_attention_ranks(const at::Tensor& q, const at::Tensor& k,
                                               const at::Tensor& v) {
  TS_BSA_CHECK(q.dim() == 4, "q must be a 4-D tensor [B, Nq, H, D], got shape ", q.sizes());
  TS_BSA_CHECK(k.dim() == 4, "k must be a 4-D tensor [B, Nk, Hk, D], got shape ", k.sizes());
  TS_BSA_CHECK(v.dim() == 4, "v must be a 4-D tensor [B, Nk, Hk, D], got shape ", v.sizes());
}

// Dense: S = B index rows, nbq = ceil(Nq / block_size). Varlen: B = 1, Nq / Nk are the packed
// totals, S sequences, nbq = nbq_max (block_idx.size(2)).
struct BlockSparseAttentionDims {
  int64_t B, Nq, Nk, H, Hk, D, nbq, max_k;
  bool varlen;
  int64_t S;
};

template <typename QDtypeCheck, typename HeadDimCheck>
BlockSparseAttentionDims check_block_sparse_attention_args(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& block_idx,
    const at::Tensor& block_cnt, int64_t block_size,
    const std::optional<at::Tensor>& cu_seqlens_q, const std::optional<at::Tensor>& cu_seqlens_k,
    QDtypeCheck&& check_q_dtype, HeadDimCheck&& check_head_dim) {
  TS_BSA_CHECK(k.device() == q.device(), "k must be on the device of q (", q.device(), "), got ",
               k.device());
  TS_BSA_CHECK(v.device() == q.device(), "v must be on the device of q (", q.device(), "), got ",
               v.device());
  TS_BSA_CHECK(block_idx.device() == q.device(), "block_idx must be on the device of q (",
               q.device(), "), got ", block_idx.device());
  TS_BSA_CHECK(block_cnt.device() == q.device(), "block_cnt must be on the device of q (",
               q.device(), "), got ", block_cnt.device());
  TS_BSA_CHECK(cu_seqlens_q.has_value() == cu_seqlens_k.has_value(),
               "cu_seqlens_q and cu_seqlens_k must be given together (packed varlen mode), got "
               "only ", cu_seqlens_q.has_value() ? "cu_seqlens_q" : "cu_seqlens_k");
  const bool varlen = cu_seqlens_q.has_value();
  int64_t S = 0;
  if (varlen) {
    const at::Tensor& cq = *cu_seqlens_q;
    const at::Tensor& ck = *cu_seqlens_k;
    TS_BSA_CHECK(cq.device() == q.device(), "cu_seqlens_q must be on the device of q (",
                 q.device(), "), got ", cq.device());
    TS_BSA_CHECK(ck.device() == q.device(), "cu_seqlens_k must be on the device of q (",
                 q.device(), "), got ", ck.device());
    TS_BSA_CHECK(cq.scalar_type() == at::kInt, "cu_seqlens_q must be int32, got ",
                 cq.scalar_type());
    TS_BSA_CHECK(ck.scalar_type() == at::kInt, "cu_seqlens_k must be int32, got ",
                 ck.scalar_type());
    TS_BSA_CHECK(cq.dim() == 1 && cq.size(0) >= 1,
                 "cu_seqlens_q must be a 1-D tensor [S + 1] (S sequences), got shape ",
                 cq.sizes());
    TS_BSA_CHECK(ck.sizes() == cq.sizes(), "cu_seqlens_k must have the shape of cu_seqlens_q ",
                 cq.sizes(), " (one entry per sequence + 1), got ", ck.sizes());
    S = cq.size(0) - 1;
  }
  const auto dt = q.scalar_type();
  check_q_dtype(dt);
  TS_BSA_CHECK(k.scalar_type() == dt, "k must have the dtype of q (", dt, "), got ",
               k.scalar_type());
  TS_BSA_CHECK(v.scalar_type() == dt, "v must have the dtype of q (", dt, "), got ",
               v.scalar_type());
  const int64_t B = q.size(0), Nq = q.size(1), H = q.size(2), D = q.size(3);
  const int64_t Nk = k.size(1), Hk = k.size(2);
  TS_BSA_CHECK(k.size(0) == B, "k must have the batch size of q (", B, "), got ", k.size(0));
  TS_BSA_CHECK(!varlen || B == 1,
               "q must have batch size 1 in varlen mode (sequences packed along dim 1), got B=",
               B);
  TS_BSA_CHECK(v.sizes() == k.sizes(), "v must have the shape of k ", k.sizes(), ", got ",
               v.sizes());
  check_head_dim(D);
  TS_BSA_CHECK(k.size(3) == D, "k head dim must equal q head dim (", D, "), got ", k.size(3));
  TS_BSA_CHECK(Hk >= 1 && H % Hk == 0, "k heads Hk must be >= 1 and divide the q heads H=", H,
               ", got Hk=", Hk);
  TS_BSA_CHECK(Nq <= Nk, "q length Nq must be <= the k length Nk=", Nk, ", got Nq=", Nq);
  TS_BSA_CHECK(q.stride(3) == 1 || D == 1, "q must have a contiguous last dim, got strides ",
               q.strides());
  TS_BSA_CHECK(k.stride(3) == 1 || D == 1, "k must have a contiguous last dim, got strides ",
               k.strides());
  TS_BSA_CHECK(v.stride(3) == 1 || D == 1, "v must have a contiguous last dim, got strides ",
               v.strides());
  TS_BSA_CHECK(block_size == 16 || block_size == 32 || block_size == 64 || block_size == 128,
               "block_size must be 16, 32, 64 or 128, got ", block_size);
  TS_BSA_CHECK(block_idx.scalar_type() == at::kInt, "block_idx must be int32, got ",
               block_idx.scalar_type());
  TS_BSA_CHECK(block_cnt.scalar_type() == at::kInt, "block_cnt must be int32, got ",
               block_cnt.scalar_type());
  if (varlen) {
    TS_BSA_CHECK(block_idx.dim() == 4 && block_idx.size(0) == S && block_idx.size(1) == H,
                 "block_idx must have shape [S, H, nbq_max, max_k] = [", S, ", ", H,
                 ", nbq_max, max_k] in varlen mode (S = len(cu_seqlens_q) - 1), got ",
                 block_idx.sizes());
    const int64_t nbq_max = block_idx.size(2);
    TS_BSA_CHECK(block_cnt.dim() == 3 && block_cnt.size(0) == S && block_cnt.size(1) == H &&
                     block_cnt.size(2) == nbq_max,
                 "block_cnt must have shape [S, H, nbq_max] = [", S, ", ", H, ", ", nbq_max,
                 "] in varlen mode, got ", block_cnt.sizes());
    return {B, Nq, Nk, H, Hk, D, nbq_max, block_idx.size(3), true, S};
  }
  const int64_t nbq = block::num_blocks(Nq, block_size);
  TS_BSA_CHECK(block_idx.dim() == 4 && block_idx.size(0) == B && block_idx.size(1) == H &&
                   block_idx.size(2) == nbq,
               "block_idx must have shape [B, H, nbq, max_k] = [", B, ", ", H, ", ", nbq,
               ", max_k] (nbq = ceil(Nq / block_size)), got ", block_idx.sizes());
  TS_BSA_CHECK(block_cnt.dim() == 3 && block_cnt.size(0) == B && block_cnt.size(1) == H &&
                   block_cnt.size(2) == nbq,
               "block_cnt must have shape [B, H, nbq] = [", B, ", ", H, ", ", nbq, "], got ",
               block_cnt.sizes());
  return {B, Nq, Nk, H, Hk, D, nbq, block_idx.size(3), false, B};
}

// Varlen offsets, read on the host (the CPU op; the CUDA op clamps them on the device instead,
// see block::seq_span). cu_q, cu_k: the S + 1 entries of cu_seqlens_q / cu_seqlens_k, shapes
// already checked. Every sequence must hold its queries as the last nq of its nk keys, and
// nbq_max must cover the longest query run.
inline void check_block_sparse_varlen_offsets(const int32_t* cu_q, const int32_t* cu_k,
                                              int64_t S, int64_t total_q, int64_t total_k,
                                              int64_t block_size, int64_t nbq_max) {
  auto check_offsets = [S](const char* name, const char* packed, const int32_t* cu,
                           int64_t total) {
    TS_BSA_CHECK(cu[0] == 0, name, "[0] must be 0, got ", cu[0]);
    for (int64_t s = 0; s < S; ++s)
      TS_BSA_CHECK(cu[s + 1] >= cu[s], name, " must be non-decreasing, got ", name, "[", s + 1,
                   "]=", cu[s + 1], " < ", name, "[", s, "]=", cu[s]);
    TS_BSA_CHECK(cu[S] == total, name, "[-1] must equal the packed length (dim 1 of ", packed,
                 " = ", total, "), got ", cu[S]);
  };
  check_offsets("cu_seqlens_q", "q", cu_q, total_q);
  check_offsets("cu_seqlens_k", "k", cu_k, total_k);
  for (int64_t s = 0; s < S; ++s) {
    const int64_t nq = int64_t{cu_q[s + 1]} - cu_q[s], nk = int64_t{cu_k[s + 1]} - cu_k[s];
    TS_BSA_CHECK(nq <= nk, "sequence ", s, " has nq=", nq, " queries > nk=", nk,
                 " keys (cu_seqlens_q / cu_seqlens_k); its queries must be the last nq of its "
                 "nk positions");
    TS_BSA_CHECK(block::num_blocks(nq, block_size) <= nbq_max,
                 "block_idx dim 2 (nbq_max=", nbq_max, ") must be >= ceil(nq / block_size)=",
                 block::num_blocks(nq, block_size), " of sequence ", s, " (nq=", nq, ")");
  }
}

#undef TS_BSA_CHECK

// ---------------------------------------------------------------------------------------------
// Paged-KV forms: block_sparse_attention_paged and flex_estimate_paged (`op` names the op in the
// messages). q [S, Nq, H, D] dense or [1, total_q, H, D] packed (cu_seqlens_q [S + 1]),
// k_cache / v_cache [num_pages, page_size, Hk, D], block_table int32 [S, max_pages],
// seq_lens_k int32 [S]. Order:
//   check_paged_ranks(op, q, k_cache, v_cache);     // v_cache may be nullptr (estimate)
//   <device-kind check of q>;
//   check_paged_args(op, q, k_cache, v_cache, block_table, seq_lens_k, cu_seqlens_q,
//                    check_q_dtype, check_head_dim);
//   then the op's own block_size / index checks, and (CPU only, host memory)
//   check_paged_values(op, ...), which reads seq_lens_k, the used block_table entries and
//   cu_seqlens_q.
// ---------------------------------------------------------------------------------------------

#define TS_PG_CHECK(cond, ...) TORCH_CHECK(cond, "tasksieve.", op, ": ", __VA_ARGS__)

inline void check_paged_ranks(const char* op, const at::Tensor& q, const at::Tensor& k_cache,
                              const at::Tensor* v_cache) {
  TS_PG_CHECK(q.dim() == 4, "q must be a 4-D tensor [S, Nq, H, D] (or [1, total_q, H, D] with "
              "cu_seqlens_q), got shape ", q.sizes());
  TS_PG_CHECK(k_cache.dim() == 4,
              "k_cache must be a 4-D tensor [num_pages, page_size, Hk, D], got shape ",
              k_cache.sizes());
  if (v_cache != nullptr)
    TS_PG_CHECK(v_cache->dim() == 4,
                "v_cache must be a 4-D tensor [num_pages, page_size, Hk, D], got shape ",
                v_cache->sizes());
}

struct PagedDims {
  int64_t S, B, Nq, H, D, Hk, num_pages, page_size, max_pages, kv_cap;
  bool packed;
};

template <typename QDtypeCheck, typename HeadDimCheck>
PagedDims check_paged_args(const char* op, const at::Tensor& q, const at::Tensor& k_cache,
                           const at::Tensor* v_cache, const at::Tensor& block_table,
                           const at::Tensor& seq_lens_k,
                           const std::optional<at::Tensor>& cu_seqlens_q,
                           QDtypeCheck&& check_q_dtype, HeadDimCheck&& check_head_dim,
                           bool any_cache_strides = false) {
  TS_PG_CHECK(k_cache.device() == q.device(), "k_cache must be on the device of q (", q.device(),
              "), got ", k_cache.device());
  if (v_cache != nullptr)
    TS_PG_CHECK(v_cache->device() == q.device(), "v_cache must be on the device of q (",
                q.device(), "), got ", v_cache->device());
  TS_PG_CHECK(block_table.device() == q.device(), "block_table must be on the device of q (",
              q.device(), "), got ", block_table.device());
  TS_PG_CHECK(seq_lens_k.device() == q.device(), "seq_lens_k must be on the device of q (",
              q.device(), "), got ", seq_lens_k.device());
  if (cu_seqlens_q.has_value())
    TS_PG_CHECK(cu_seqlens_q->device() == q.device(), "cu_seqlens_q must be on the device of q (",
                q.device(), "), got ", cu_seqlens_q->device());
  const auto dt = q.scalar_type();
  check_q_dtype(dt);
  TS_PG_CHECK(k_cache.scalar_type() == dt, "k_cache must have the dtype of q (", dt, "), got ",
              k_cache.scalar_type());
  if (v_cache != nullptr)
    TS_PG_CHECK(v_cache->scalar_type() == dt, "v_cache must have the dtype of q (", dt, "), got ",
                v_cache->scalar_type());
  TS_PG_CHECK(block_table.scalar_type() == at::kInt, "block_table must be int32, got ",
              block_table.scalar_type());
  TS_PG_CHECK(block_table.dim() == 2,
              "block_table must be a 2-D tensor [S, max_pages] (S sequences), got shape ",
              block_table.sizes());
  const int64_t S = block_table.size(0), max_pages = block_table.size(1);
  TS_PG_CHECK(seq_lens_k.scalar_type() == at::kInt, "seq_lens_k must be int32, got ",
              seq_lens_k.scalar_type());
  TS_PG_CHECK(seq_lens_k.dim() == 1 && seq_lens_k.size(0) == S,
              "seq_lens_k must have shape [S] = [", S, "] (block_table dim 0), got ",
              seq_lens_k.sizes());
  const bool packed = cu_seqlens_q.has_value();
  const int64_t B = q.size(0), Nq = q.size(1), H = q.size(2), D = q.size(3);
  if (packed) {
    const at::Tensor& cq = *cu_seqlens_q;
    TS_PG_CHECK(cq.scalar_type() == at::kInt, "cu_seqlens_q must be int32, got ",
                cq.scalar_type());
    TS_PG_CHECK(cq.dim() == 1 && cq.size(0) == S + 1, "cu_seqlens_q must have shape [S + 1] = [",
                S + 1, "] (block_table dim 0 = S sequences), got ", cq.sizes());
    TS_PG_CHECK(B == 1, "q must have batch size 1 with cu_seqlens_q (sequences packed along "
                "dim 1), got B=", B);
  } else {
    TS_PG_CHECK(B == S, "q must have one batch row per sequence (block_table dim 0 = S = ", S,
                "), got B=", B);
  }
  check_head_dim(D);
  const int64_t num_pages = k_cache.size(0), page_size = k_cache.size(1), Hk = k_cache.size(2);
  TS_PG_CHECK(k_cache.size(3) == D, "k_cache head dim must equal q head dim (", D, "), got ",
              k_cache.size(3));
  TS_PG_CHECK(Hk >= 1 && H % Hk == 0, "k_cache heads Hk must be >= 1 and divide the q heads H=",
              H, ", got Hk=", Hk);
  if (v_cache != nullptr)
    TS_PG_CHECK(v_cache->sizes() == k_cache.sizes(), "v_cache must have the shape of k_cache ",
                k_cache.sizes(), ", got ", v_cache->sizes());
  TS_PG_CHECK(page_size >= 1, "k_cache page size (dim 1) must be >= 1, got ", page_size);
  TS_PG_CHECK(q.stride(3) == 1 || D == 1, "q must have a contiguous last dim, got strides ",
              q.strides());
  // CPU reads cache rows element by element (any strides: vLLM's CPU backend stores each page's
  // K transposed); CUDA loads 16-byte vectors along D.
  TS_PG_CHECK(any_cache_strides || k_cache.stride(3) == 1 || D == 1,
              "k_cache must have a contiguous last dim on CUDA, got strides ", k_cache.strides());
  if (v_cache != nullptr)
    TS_PG_CHECK(any_cache_strides || v_cache->stride(3) == 1 || D == 1,
                "v_cache must have a contiguous last dim on CUDA, got strides ",
                v_cache->strides());
  return {S, B, Nq, H, D, Hk, num_pages, page_size, max_pages,
          paged::kv_capacity(max_pages, page_size, num_pages), packed};
}

// block_sparse_attention_paged's index tensors (after check_paged_args): block_idx int32
// [S, H, nbq, max_k] with nbq = ceil(Nq / bs) dense or any nbq_max packed, block_cnt [S, H, nbq].
// Returns {nbq, max_k}.
inline std::pair<int64_t, int64_t> check_paged_index_args(const char* op, const PagedDims& d,
                                                          const at::Tensor& q,
                                                          const at::Tensor& block_idx,
                                                          const at::Tensor& block_cnt,
                                                          int64_t block_size) {
  TS_PG_CHECK(block_idx.device() == q.device(), "block_idx must be on the device of q (",
              q.device(), "), got ", block_idx.device());
  TS_PG_CHECK(block_cnt.device() == q.device(), "block_cnt must be on the device of q (",
              q.device(), "), got ", block_cnt.device());
  TS_PG_CHECK(block_size == 16 || block_size == 32 || block_size == 64 || block_size == 128,
              "block_size must be 16, 32, 64 or 128, got ", block_size);
  TS_PG_CHECK(block_idx.scalar_type() == at::kInt, "block_idx must be int32, got ",
              block_idx.scalar_type());
  TS_PG_CHECK(block_cnt.scalar_type() == at::kInt, "block_cnt must be int32, got ",
              block_cnt.scalar_type());
  if (d.packed) {
    TS_PG_CHECK(block_idx.dim() == 4 && block_idx.size(0) == d.S && block_idx.size(1) == d.H,
                "block_idx must have shape [S, H, nbq_max, max_k] = [", d.S, ", ", d.H,
                ", nbq_max, max_k] with cu_seqlens_q, got ", block_idx.sizes());
  } else {
    const int64_t nbq = block::num_blocks(d.Nq, block_size);
    TS_PG_CHECK(block_idx.dim() == 4 && block_idx.size(0) == d.S && block_idx.size(1) == d.H &&
                    block_idx.size(2) == nbq,
                "block_idx must have shape [S, H, nbq, max_k] = [", d.S, ", ", d.H, ", ", nbq,
                ", max_k] (nbq = ceil(Nq / block_size)), got ", block_idx.sizes());
  }
  const int64_t nbq = block_idx.size(2);
  TS_PG_CHECK(block_cnt.dim() == 3 && block_cnt.size(0) == d.S && block_cnt.size(1) == d.H &&
                  block_cnt.size(2) == nbq,
              "block_cnt must have shape [S, H, nbq] = [", d.S, ", ", d.H, ", ", nbq, "], got ",
              block_cnt.sizes());
  return {nbq, block_idx.size(3)};
}

// The values, read on the host (the CPU ops; the CUDA ops clamp instead, paged::seq_span and
// paged::key_offset). table: block_table [S, max_pages] contiguous; cu_q: S + 1 entries or
// nullptr (dense). nbq: block_idx dim 2 for the attention op (each sequence's query blocks must
// fit), or -1 for the estimate.
inline void check_paged_values(const char* op, const PagedDims& d, const int32_t* table,
                               const int32_t* seq_lens, const int32_t* cu_q, int64_t block_size,
                               int64_t nbq) {
  if (cu_q != nullptr) {
    TS_PG_CHECK(cu_q[0] == 0, "cu_seqlens_q[0] must be 0, got ", cu_q[0]);
    for (int64_t s = 0; s < d.S; ++s)
      TS_PG_CHECK(cu_q[s + 1] >= cu_q[s], "cu_seqlens_q must be non-decreasing, got "
                  "cu_seqlens_q[", s + 1, "]=", cu_q[s + 1], " < cu_seqlens_q[", s, "]=",
                  cu_q[s]);
    TS_PG_CHECK(cu_q[d.S] == d.Nq, "cu_seqlens_q[-1] must equal the packed length (dim 1 of q = ",
                d.Nq, "), got ", cu_q[d.S]);
  }
  const int64_t cap = d.max_pages * d.page_size;
  for (int64_t s = 0; s < d.S; ++s) {
    const int64_t nk = seq_lens[s];
    TS_PG_CHECK(nk >= 0 && nk <= cap, "seq_lens_k[", s, "]=", nk,
                " must be in [0, max_pages * page_size = ", cap, "] (block_table dim 1 = ",
                d.max_pages, ", k_cache dim 1 = ", d.page_size, ")");
    const int64_t used = paged::pages_used(nk, d.page_size);
    for (int64_t p = 0; p < used; ++p) {
      const int64_t id = table[s * d.max_pages + p];
      TS_PG_CHECK(paged::page_id_valid(id, d.num_pages), "block_table[", s, ", ", p, "]=", id,
                  " must be a page of k_cache in [0, num_pages=", d.num_pages, ") (sequence ", s,
                  " reads its first ", used, " pages)");
    }
    if (cu_q == nullptr) {
      TS_PG_CHECK(d.Nq <= nk, "q length Nq=", d.Nq, " must be <= seq_lens_k[", s, "]=", nk,
                  " (every sequence's queries are its last Nq positions)");
    } else {
      const int64_t nq = int64_t{cu_q[s + 1]} - cu_q[s];
      TS_PG_CHECK(nq <= nk, "sequence ", s, " has nq=", nq, " queries > seq_lens_k[", s, "]=",
                  nk, " keys; its queries must be the last nq of its positions");
      if (nbq >= 0)
        TS_PG_CHECK(block::num_blocks(nq, block_size) <= nbq, "block_idx dim 2 (nbq_max=", nbq,
                    ") must be >= ceil(nq / block_size)=", block::num_blocks(nq, block_size),
                    " of sequence ", s, " (nq=", nq, ")");
    }
  }
}

// The paged ops' host-side tables, made contiguous and validated once (CPU ops): block_table,
// seq_lens_k and, packed, cu_seqlens_q, with raw pointers into them (cu_q nullptr when dense).
struct PagedTables {
  at::Tensor block_table, seq_lens, cu_seqlens_q;
  const int32_t* table = nullptr;
  const int32_t* lens = nullptr;
  const int32_t* cu_q = nullptr;
};

inline PagedTables read_paged_tables(const char* op, const PagedDims& d,
                                     const at::Tensor& block_table_in,
                                     const at::Tensor& seq_lens_in,
                                     const std::optional<at::Tensor>& cu_seqlens_q_in,
                                     int64_t block_size, int64_t nbq) {
  PagedTables t;
  t.block_table = block_table_in.contiguous();
  t.seq_lens = seq_lens_in.contiguous();
  if (d.packed) {
    t.cu_seqlens_q = cu_seqlens_q_in->contiguous();
    t.cu_q = t.cu_seqlens_q.const_data_ptr<int32_t>();
  }
  t.table = t.block_table.const_data_ptr<int32_t>();
  t.lens = t.seq_lens.const_data_ptr<int32_t>();
  check_paged_values(op, d, t.table, t.lens, t.cu_q, block_size, nbq);
  return t;
}

#undef TS_PG_CHECK

}  // namespace checks
}  // namespace tasksieve
