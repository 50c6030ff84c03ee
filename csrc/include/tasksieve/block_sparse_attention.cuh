// Block-sparse flash attention (torch-free): FlexPrefill's sparse prefill kernel.
//
//   BlockSparseAttention<T>(q, k, v, block_idx, block_cnt, out, lse, B, Nq, Nk, H, Hk, D,
//                           max_k, block_size, strides..., scale, causal, stream) -> cudaError_t
//
// T = __half or __nv_bfloat16; D in {64, 128}; block_size in {16, 32, 64, 128}.
// q [B, Nq, H, D], k/v [B, Nk, Hk, D] with element strides (last dim contiguous); out
// [B, Nq, H, D] contiguous; lse fp32 [B, H, Nq] contiguous; block_idx int32 [B, H, nbq, max_k]
// and block_cnt int32 [B, H, nbq] contiguous.
//
// Math (block::* helpers in block_index.h): query block r attends to the keys of the key blocks
// block_idx[b, h, r, e], e < block_cnt[b, h, r] (count clamped to [0, max_k]); with causal,
// key j is visible to query i iff j < block::query_key_end(i). out = softmax(scale q k^T) v in
// fp32, lse = natural-log log-sum-exp of the visited logits; no visible key: out 0, lse -inf.
// An out-of-range column (c < 0 or c >= nbk) is skipped: never an out-of-bounds access (the
// device cannot raise without a host sync; the CPU op raises instead).
//
//   BlockSparseAttentionVarlen<T>(q, k, v, block_idx, block_cnt, cu_seqlens_q, cu_seqlens_k,
//                                 out, lse, S, total_q, total_k, H, Hk, D, max_k, nbq_max,
//                                 block_size, strides..., scale, causal, stream) -> cudaError_t
//
// Packed varlen (flash-attn cu_seqlens, int32 [S + 1] each): q [total_q, H, D], k/v
// [total_k, Hk, D] (token and head strides), out [total_q, H, D] and lse [H, total_q]
// contiguous, block_idx [S, H, nbq_max, max_k], block_cnt [S, H, nbq_max]. Sequence s is the
// dense problem on its rows (block::seq_span). The offsets are not validated (no host sync):
// they are clamped into range, so malformed values never cause an out-of-bounds access, but
// the rows of such sequences (and query blocks past nbq_max) are then not, or not uniquely,
// written: the caller pre-fills out with 0 and lse with -inf to keep uncovered rows defined.
//
//   BlockSparseAttentionPaged<T>(q, k_cache, v_cache, block_table, seq_lens_k, cu_seqlens_q,
//                                block_idx, block_cnt, out, lse, S, Nq, H, Hk, D, num_pages,
//                                page_size, max_pages, max_k, nbq, block_size, strides...,
//                                scale, causal, stream) -> cudaError_t
//
// Paged KV (block_sparse_attention_paged): k_cache / v_cache [num_pages, page_size, Hk, D] with
// page / row / head element strides; key j of sequence s is row j % page_size of page
// block_table[s, j / page_size] (paged_index.h; rows read through PagedRows, kv_rows.cuh).
// Queries dense q [S, Nq, H, D] (cu_seqlens_q == nullptr) or packed [total_q, H, D] (Nq =
// total_q). Sequence s has paged::seq_span's nq_s queries and nk_s keys: seq_lens_k clamped into
// [0, max_pages * page_size] (0 without pages), page ids into the cache, offsets like varlen,
// nq_s <= nk_s; the caller pre-fills out with 0 and lse with -inf (rows no sequence writes).
//
// Kernel: one CTA of 4 warps per (b or sequence s, h, query block r, 64-row chunk of the
// block); in varlen and paged mode a CTA whose query block lies past its sequence's end exits
// at once. K/V rows come from a row source (ContigRows, or PagedRows in paged mode), so the
// three modes share one kernel body (Mode is a template argument: the dense instantiation is
// the same code as before the other modes existed).
// The Q chunk [64, D] sits in shared memory; the listed key blocks are walked in 64-key
// sub-tiles:
//   K sub-tile -> smem; S = Q K^T with WMMA m16n16k16 (fp32 accumulate), each warp 16 rows;
//   online softmax in fp32 (exp2, scale * log2 e folded in), per-element causal mask only when
//   the (chunk, sub-tile) pair straddles the diagonal (block::tile_visibility), tiles above the
//   diagonal skipped; P -> T in smem; O (fp32, smem) rescaled by 2^(m_old - m_new);
//   V sub-tile -> smem (reusing K's buffer); O += P V with WMMA.
// GQA: query head h reads KV head h / (H / Hk); K/V are never repeated. Shared memory:
// ~62 KB (D 64) / ~94 KB (D 128), opted in with cudaFuncAttributeMaxDynamicSharedMemorySize.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>

#include <cstdint>

#include "tasksieve/block_index.h"
#include "tasksieve/common.h"
#include "tasksieve/cuda_convert.cuh"
#include "tasksieve/dtype.cuh"
#include "tasksieve/kv_rows.cuh"
#include "tasksieve/paged_index.h"

namespace tasksieve {

namespace bsa_detail {

constexpr int kBM = 64;       // query rows per CTA
constexpr int kBN = 64;       // keys per sub-tile
constexpr int kWarps = 4;     // 16 query rows each
constexpr int kThreads = kWarps * 32;
constexpr int kPadH = 8;      // smem row padding in elements of T (keeps WMMA 32-byte alignment)
constexpr int kPadF = 4;      // smem row padding in floats
constexpr int kLdS = kBN + kPadF;
constexpr int kLdP = kBN + kPadH;

template <int D>
struct Smem {
  static constexpr int kLdQ = D + kPadH;
  static constexpr int kLdO = D + kPadF;
  static constexpr size_t kQ = size_t(kBM) * kLdQ * 2;   // T = 2 bytes
  static constexpr size_t kKV = size_t(kBN) * kLdQ * 2;
  static constexpr size_t kS = size_t(kBM) * kLdS * 4;
  static constexpr size_t kP = size_t(kBM) * kLdP * 2;
  static constexpr size_t kO = size_t(kBM) * kLdO * 4;
  static constexpr size_t kStats = size_t(3) * kBM * 4;
  static constexpr size_t kBytes = kQ + kKV + kS + kP + kO + kStats;
};

using cuda_convert::from_float;
using cuda_convert::to_float;

// rows [0, nrows) of a [kRows, D] tile from global rows rows(j0 + r) (D contiguous T each),
// zero-filled past nrows. 16-byte loads when `vec` (every row pointer 8-element aligned).
template <typename T, int D, int kRows, class Rows>
__device__ __forceinline__ void LoadTile(T* __restrict__ dst, int ld, const Rows& rows,
                                         int64_t j0, int nrows, bool vec) {
  static_assert(sizeof(T) == 2, "16-bit types only");
  if (vec) {
    constexpr int kChunks = D / 8;  // uint4 = 8 elements
    for (int e = threadIdx.x; e < kRows * kChunks; e += kThreads) {
      const int r = e / kChunks, c = e % kChunks;
      uint4 val = make_uint4(0u, 0u, 0u, 0u);
      if (r < nrows) val = *reinterpret_cast<const uint4*>(rows(j0 + r) + c * 8);
      *reinterpret_cast<uint4*>(dst + r * ld + c * 8) = val;
    }
  } else {
    for (int e = threadIdx.x; e < kRows * D; e += kThreads) {
      const int r = e / D, c = e % D;
      T val = from_float<T>(0.f);
      if (r < nrows) val = rows(j0 + r)[c];
      dst[r * ld + c] = val;
    }
  }
}

enum Mode : int { kDense = 0, kVarlen = 1, kPaged = 2 };

// Nq, Nk: the token dims of the tensors (packed totals in varlen mode; Nq = q dim 1 and Nk
// unused in paged mode); nbq: query blocks per index row (ceil(Nq / bs) dense, nbq_max varlen /
// packed). M (Mode) is a template argument so the dense instantiation compiles to the same code
// as before the other modes existed (cu_q, cu_k and pg unused there). Paged: k, v point at the
// caches, ks*/vs* are their row and head strides, pg carries the table, lengths and page strides;
// cu_q is nullptr for dense queries.
template <typename T, int D, int M>
__global__ void __launch_bounds__(kThreads)
    BlockSparseAttentionKernel(const T* __restrict__ q, const T* __restrict__ k,
                               const T* __restrict__ v, const int32_t* __restrict__ block_idx,
                               const int32_t* __restrict__ block_cnt,
                               const int32_t* __restrict__ cu_q, const int32_t* __restrict__ cu_k,
                               T* __restrict__ out, float* __restrict__ lse, int64_t Nq,
                               int64_t Nk, int64_t H, int64_t Hk, int64_t max_k, int64_t nbq,
                               int64_t bs, int64_t chunks, int64_t qsb, int64_t qsn, int64_t qsh,
                               int64_t ksb, int64_t ksn, int64_t ksh, int64_t vsb, int64_t vsn,
                               int64_t vsh, float scale_log2, bool causal, bool vec_q,
                               bool vec_kv, PagedKV pg) {
  using namespace nvcuda;
  using S = Smem<D>;
  extern __shared__ __align__(128) unsigned char smem_raw[];
  T* sQ = reinterpret_cast<T*>(smem_raw);
  T* sKV = reinterpret_cast<T*>(smem_raw + S::kQ);
  float* sS = reinterpret_cast<float*>(smem_raw + S::kQ + S::kKV);
  T* sP = reinterpret_cast<T*>(smem_raw + S::kQ + S::kKV + S::kS);
  float* sO = reinterpret_cast<float*>(smem_raw + S::kQ + S::kKV + S::kS + S::kP);
  float* sM = reinterpret_cast<float*>(smem_raw + S::kQ + S::kKV + S::kS + S::kP + S::kO);
  float* sL = sM + kBM;
  float* sA = sL + kBM;

  int64_t bid = blockIdx.x;
  const int64_t chunk = bid % chunks;
  bid /= chunks;
  const int64_t r = bid % nbq;
  bid /= nbq;
  const int64_t h = bid % H, s = bid / H;  // s: index row (batch row, or packed sequence)
  const int64_t hk = h / (H / Hk);
  // The problem of this CTA: Nq_s queries (the last of Nk_s keys) from token row sq0 of batch
  // row b, keys from row sk0. Dense: the whole batch row s.
  int64_t b = s, sq0 = 0, sk0 = 0, Nq_s = Nq, Nk_s = Nk;
  if constexpr (M == kVarlen) {
    const block::SeqSpan sp = block::seq_span(cu_q, cu_k, s, Nq, Nk);
    b = 0;
    sq0 = sp.q_begin;
    sk0 = sp.k_begin;
    Nq_s = sp.nq;
    Nk_s = sp.nk;
  } else if constexpr (M == kPaged) {
    const paged::SeqSpan sp = paged::seq_span(cu_q, pg.seq_lens, s, Nq, pg.kv_cap());
    b = cu_q != nullptr ? 0 : s;
    sq0 = sp.q_begin;
    Nq_s = sp.nq;
    Nk_s = sp.nk;
  }
  const int64_t nbk = block::num_blocks(Nk_s, bs);
  const int64_t qb0 = block::block_begin(r, bs), qb1 = block::block_end(r, bs, Nq_s);
  const int64_t q0 = qb0 + chunk * kBM;
  if (q0 >= qb1) return;  // uniform over the CTA (bs < 64 never has chunk > 0; varlen tails)
  const int64_t q1 = ts_min(q0 + kBM, qb1);
  const int mq = static_cast<int>(q1 - q0);

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const ContigRows<T> qrows{q + b * qsb + h * qsh + sq0 * qsn, qsn};
  LoadTile<T, D, kBM>(sQ, S::kLdQ, qrows, q0, mq, vec_q);
  for (int e = threadIdx.x; e < kBM * D; e += kThreads) sO[(e / D) * S::kLdO + e % D] = 0.f;
  for (int e = threadIdx.x; e < kBM; e += kThreads) {
    sM[e] = ts_neg_inf();
    sL[e] = 0.f;
  }
  __syncthreads();

  const int64_t row = (s * H + h) * nbq + r;
  const int64_t n = block::clamp_block_count(static_cast<int64_t>(block_cnt[row]), max_k);
  const int32_t* cols = block_idx + row * max_k;
  // K/V row sources of this (sequence, KV head): rows of the tensors, or of the pages.
  auto row_source = [&](const T* base, int64_t sb, int64_t sn, int64_t sh, int64_t sp) {
    if constexpr (M == kPaged) {
      return PagedRows<T>{base + hk * sh, pg.block_table + s * pg.max_pages, pg.page_size,
                          pg.num_pages, sp, sn};
    } else {
      (void)sp;
      return ContigRows<T>{base + b * sb + hk * sh + sk0 * sn, sn};
    }
  };
  const auto krows = row_source(k, ksb, ksn, ksh, pg.k_page_stride);
  const auto vrows = row_source(v, vsb, vsn, vsh, pg.v_page_stride);

  for (int64_t e = 0; e < n; ++e) {
    const int64_t c = cols[e];
    if (!block::block_column_valid(c, nbk)) continue;  // uniform: skip invalid columns
    const int64_t kb0 = block::block_begin(c, bs), kb1 = block::block_end(c, bs, Nk_s);
    for (int64_t k0 = kb0; k0 < kb1; k0 += kBN) {
      const int64_t k1 = ts_min(k0 + kBN, kb1);
      const auto vis = block::tile_visibility(q0, q1, k0, k1, Nq_s, Nk_s, causal);
      if (vis == block::kSkip) continue;
      const int nk = static_cast<int>(k1 - k0);
      LoadTile<T, D, kBN>(sKV, S::kLdQ, krows, k0, nk, vec_kv);
      __syncthreads();

      // S = Q K^T: warp w -> rows [16w, 16w + 16), all kBN columns.
      {
        wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[kBN / 16];
#pragma unroll
        for (int j = 0; j < kBN / 16; ++j) wmma::fill_fragment(acc[j], 0.f);
#pragma unroll
        for (int kk = 0; kk < D; kk += 16) {
          wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> fa;
          wmma::load_matrix_sync(fa, sQ + warp * 16 * S::kLdQ + kk, S::kLdQ);
#pragma unroll
          for (int j = 0; j < kBN / 16; ++j) {
            wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> fb;
            wmma::load_matrix_sync(fb, sKV + j * 16 * S::kLdQ + kk, S::kLdQ);
            wmma::mma_sync(acc[j], fa, fb, acc[j]);
          }
        }
#pragma unroll
        for (int j = 0; j < kBN / 16; ++j)
          wmma::store_matrix_sync(sS + warp * 16 * kLdS + j * 16, acc[j], kLdS,
                                  wmma::mem_row_major);
      }
      __syncwarp();

      // Online softmax on the warp's 16 rows; lane covers columns lane and lane + 32.
      for (int rr = 0; rr < 16; ++rr) {
        const int i = warp * 16 + rr;
        int lim = 0;  // visible columns of this row
        if (i < mq) {
          lim = nk;
          if (vis == block::kPartial) {
            const int64_t ke = block::query_key_end(q0 + i, Nq_s, Nk_s, true) - k0;
            lim = static_cast<int>(ts_clamp(ke, int64_t{0}, static_cast<int64_t>(nk)));
          }
        }
        float s0 = lane < lim ? sS[i * kLdS + lane] * scale_log2 : ts_neg_inf();
        float s1 = lane + 32 < lim ? sS[i * kLdS + lane + 32] * scale_log2 : ts_neg_inf();
        float mx = fmaxf(s0, s1);
#pragma unroll
        for (int o = 16; o > 0; o /= 2) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
        const float m_old = sM[i];
        const float m_new = fmaxf(m_old, mx);
        float p0 = 0.f, p1 = 0.f, alpha = 1.f;
        if (m_new != ts_neg_inf()) {
          p0 = exp2f(s0 - m_new);  // exp2f(-inf) = 0
          p1 = exp2f(s1 - m_new);
          alpha = exp2f(m_old - m_new);
        }
        float sum = p0 + p1;
#pragma unroll
        for (int o = 16; o > 0; o /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, o);
        sP[i * kLdP + lane] = from_float<T>(p0);
        sP[i * kLdP + lane + 32] = from_float<T>(p1);
        __syncwarp();
        if (lane == 0) {
          sM[i] = m_new;
          sL[i] = sL[i] * alpha + sum;
          sA[i] = alpha;
        }
        for (int d = lane; d < D; d += 32) sO[i * S::kLdO + d] *= alpha;
        __syncwarp();
      }
      __syncthreads();  // every warp is done with K before V overwrites it

      LoadTile<T, D, kBN>(sKV, S::kLdQ, vrows, k0, nk, vec_kv);
      __syncthreads();

      // O[16 rows of the warp, D] += P [16, kBN] V [kBN, D].
#pragma unroll
      for (int j = 0; j < D / 16; ++j) {
        wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
        float* o_tile = sO + warp * 16 * S::kLdO + j * 16;
        wmma::load_matrix_sync(acc, o_tile, S::kLdO, wmma::mem_row_major);
#pragma unroll
        for (int kk = 0; kk < kBN; kk += 16) {
          wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> fa;
          wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> fb;
          wmma::load_matrix_sync(fa, sP + warp * 16 * kLdP + kk, kLdP);
          wmma::load_matrix_sync(fb, sKV + kk * S::kLdQ + j * 16, S::kLdQ);
          wmma::mma_sync(acc, fa, fb, acc);
        }
        wmma::store_matrix_sync(o_tile, acc, S::kLdO, wmma::mem_row_major);
      }
      __syncthreads();  // V and P consumed before the next sub-tile reloads them
    }
  }

  // Epilogue: out = O / l (0 when nothing was visible), lse = ln 2 * (m + log2 l).
  for (int e = threadIdx.x; e < mq * D; e += kThreads) {
    const int i = e / D, d = e % D;
    const float l = sL[i];
    const float val = l > 0.f ? sO[i * S::kLdO + d] / l : 0.f;
    out[((b * Nq + sq0 + q0 + i) * H + h) * D + d] = from_float<T>(val);
  }
  for (int i = threadIdx.x; i < mq; i += kThreads) {
    const float l = sL[i];
    lse[(b * H + h) * Nq + sq0 + q0 + i] =
        l > 0.f ? (sM[i] + log2f(l)) * 0.6931471805599453f : ts_neg_inf();
  }
}

// Shared launch: rows = index rows (B dense, S varlen), nbq query blocks per row.
template <typename T>
cudaError_t Launch(const T* q, const T* k, const T* v, const int32_t* block_idx,
                   const int32_t* block_cnt, const int32_t* cu_q, const int32_t* cu_k, T* out,
                   float* lse, int64_t rows, int64_t Nq, int64_t Nk, int64_t H, int64_t Hk,
                   int64_t D, int64_t max_k, int64_t nbq, int64_t block_size, int64_t qsb,
                   int64_t qsn, int64_t qsh, int64_t ksb, int64_t ksn, int64_t ksh, int64_t vsb,
                   int64_t vsn, int64_t vsh, float scale, bool causal, cudaStream_t stream,
                   const PagedKV& pg = PagedKV{}) {
  if (block_size != 16 && block_size != 32 && block_size != 64 && block_size != 128)
    return cudaErrorInvalidValue;
  const int64_t chunks = ceil_div(block_size, static_cast<int64_t>(kBM));
  const int64_t grid = rows * H * nbq * chunks;
  if (grid == 0) return cudaSuccess;
  if (grid > 2147483647LL) return cudaErrorInvalidConfiguration;
  const bool vec_q = is_aligned(q, 16) && qsb % 8 == 0 && qsn % 8 == 0 && qsh % 8 == 0;
  const bool paged = pg.block_table != nullptr;
  const bool vec_kv = is_aligned(k, 16) && is_aligned(v, 16) && ksb % 8 == 0 && ksn % 8 == 0 &&
                      ksh % 8 == 0 && vsb % 8 == 0 && vsn % 8 == 0 && vsh % 8 == 0 &&
                      (!paged || (pg.k_page_stride % 8 == 0 && pg.v_page_stride % 8 == 0));
  const float scale_log2 = scale * 1.4426950408889634f;
  auto launch = [&](auto kernel, size_t smem) -> cudaError_t {
    cudaError_t err =
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                             static_cast<int>(smem));
    if (err != cudaSuccess) return err;
    kernel<<<static_cast<unsigned>(grid), kThreads, smem, stream>>>(
        q, k, v, block_idx, block_cnt, cu_q, cu_k, out, lse, Nq, Nk, H, Hk, max_k, nbq,
        block_size, chunks, qsb, qsn, qsh, ksb, ksn, ksh, vsb, vsn, vsh, scale_log2, causal,
        vec_q, vec_kv, pg);
    return cudaGetLastError();
  };
  if (paged) {
    if (D == 64) return launch(BlockSparseAttentionKernel<T, 64, kPaged>, Smem<64>::kBytes);
    if (D == 128) return launch(BlockSparseAttentionKernel<T, 128, kPaged>, Smem<128>::kBytes);
  } else if (cu_q != nullptr) {
    if (D == 64) return launch(BlockSparseAttentionKernel<T, 64, kVarlen>, Smem<64>::kBytes);
    if (D == 128) return launch(BlockSparseAttentionKernel<T, 128, kVarlen>, Smem<128>::kBytes);
  } else {
    if (D == 64) return launch(BlockSparseAttentionKernel<T, 64, kDense>, Smem<64>::kBytes);
    if (D == 128) return launch(BlockSparseAttentionKernel<T, 128, kDense>, Smem<128>::kBytes);
  }
  return cudaErrorInvalidValue;
}

}  // namespace bsa_detail

template <typename T>
cudaError_t BlockSparseAttention(const T* q, const T* k, const T* v, const int32_t* block_idx,
                                 const int32_t* block_cnt, T* out, float* lse, int64_t B,
                                 int64_t Nq, int64_t Nk, int64_t H, int64_t Hk, int64_t D,
                                 int64_t max_k, int64_t block_size, int64_t qsb, int64_t qsn,
                                 int64_t qsh, int64_t ksb, int64_t ksn, int64_t ksh, int64_t vsb,
                                 int64_t vsn, int64_t vsh, float scale, bool causal,
                                 cudaStream_t stream) {
  if (B == 0 || H == 0 || Nq == 0) return cudaSuccess;
  if (Hk <= 0 || H % Hk != 0 || Nq > Nk || block_size <= 0) return cudaErrorInvalidValue;
  return bsa_detail::Launch<T>(q, k, v, block_idx, block_cnt, nullptr, nullptr, out, lse, B, Nq,
                               Nk, H, Hk, D, max_k, block::num_blocks(Nq, block_size),
                               block_size, qsb, qsn, qsh, ksb, ksn, ksh, vsb, vsn, vsh, scale,
                               causal, stream);
}

template <typename T>
cudaError_t BlockSparseAttentionVarlen(const T* q, const T* k, const T* v,
                                       const int32_t* block_idx, const int32_t* block_cnt,
                                       const int32_t* cu_seqlens_q, const int32_t* cu_seqlens_k,
                                       T* out, float* lse, int64_t S, int64_t total_q,
                                       int64_t total_k, int64_t H, int64_t Hk, int64_t D,
                                       int64_t max_k, int64_t nbq_max, int64_t block_size,
                                       int64_t qsn, int64_t qsh, int64_t ksn, int64_t ksh,
                                       int64_t vsn, int64_t vsh, float scale, bool causal,
                                       cudaStream_t stream) {
  if (S == 0 || H == 0 || total_q == 0 || nbq_max == 0) return cudaSuccess;
  if (Hk <= 0 || H % Hk != 0 || cu_seqlens_q == nullptr || cu_seqlens_k == nullptr)
    return cudaErrorInvalidValue;
  return bsa_detail::Launch<T>(q, k, v, block_idx, block_cnt, cu_seqlens_q, cu_seqlens_k, out,
                               lse, S, total_q, total_k, H, Hk, D, max_k, nbq_max, block_size,
                               0, qsn, qsh, 0, ksn, ksh, 0, vsn, vsh, scale, causal, stream);
}

// Paged KV: S sequences; q dense [S, Nq, H, D] (strides qsb, qsn, qsh; cu_seqlens_q nullptr) or
// packed [total_q, H, D] (Nq = total_q, cu_seqlens_q [S + 1]); k_cache / v_cache [num_pages,
// page_size, Hk, D] with page / row / head strides; block_table int32 [S, max_pages] and
// seq_lens_k [S] contiguous; block_idx [S, H, nbq, max_k], block_cnt [S, H, nbq]. The caller
// pre-fills out with 0 and lse with -inf.
template <typename T>
cudaError_t BlockSparseAttentionPaged(
    const T* q, const T* k_cache, const T* v_cache, const int32_t* block_table,
    const int32_t* seq_lens_k, const int32_t* cu_seqlens_q, const int32_t* block_idx,
    const int32_t* block_cnt, T* out, float* lse, int64_t S, int64_t Nq, int64_t H, int64_t Hk,
    int64_t D, int64_t num_pages, int64_t page_size, int64_t max_pages, int64_t max_k,
    int64_t nbq, int64_t block_size, int64_t qsb, int64_t qsn, int64_t qsh, int64_t ksp,
    int64_t ksn, int64_t ksh, int64_t vsp, int64_t vsn, int64_t vsh, float scale, bool causal,
    cudaStream_t stream) {
  if (S == 0 || H == 0 || Nq == 0 || nbq == 0) return cudaSuccess;
  if (Hk <= 0 || H % Hk != 0 || page_size <= 0 || block_table == nullptr ||
      seq_lens_k == nullptr)
    return cudaErrorInvalidValue;
  PagedKV pg;
  pg.block_table = block_table;
  pg.seq_lens = seq_lens_k;
  pg.max_pages = max_pages;
  pg.page_size = page_size;
  pg.num_pages = num_pages;
  pg.k_page_stride = ksp;
  pg.v_page_stride = vsp;
  return bsa_detail::Launch<T>(q, k_cache, v_cache, block_idx, block_cnt, cu_seqlens_q, nullptr,
                               out, lse, S, Nq, 0, H, Hk, D, max_k, nbq, block_size, qsb, qsn,
                               qsh, 0, ksn, ksh, 0, vsn, vsh, scale, causal, stream, pg);
}

// The entry points of the CUDA glue and the simulator runner: the kernels above for the element
// type `dt` of q, k, v and out (fp16 or bf16; fp32 gives cudaErrorInvalidValue). Dense: out and
// lse need no initial content (every row is written). Varlen: the caller pre-fills out with 0
// and lse with -inf (rows that malformed offsets leave uncovered keep those values).
inline cudaError_t BlockSparseAttentionLaunch(
    DType dt, const void* q, const void* k, const void* v, const int32_t* block_idx,
    const int32_t* block_cnt, void* out, float* lse, int64_t B, int64_t Nq, int64_t Nk,
    int64_t H, int64_t Hk, int64_t D, int64_t max_k, int64_t block_size, int64_t qsb,
    int64_t qsn, int64_t qsh, int64_t ksb, int64_t ksn, int64_t ksh, int64_t vsb, int64_t vsn,
    int64_t vsh, float scale, bool causal, cudaStream_t stream) {
  return DispatchHalf(dt, [&](auto tag) {
    using T = typename decltype(tag)::type;
    return BlockSparseAttention<T>(static_cast<const T*>(q), static_cast<const T*>(k),
                                   static_cast<const T*>(v), block_idx, block_cnt,
                                   static_cast<T*>(out), lse, B, Nq, Nk, H, Hk, D, max_k,
                                   block_size, qsb, qsn, qsh, ksb, ksn, ksh, vsb, vsn, vsh, scale,
                                   causal, stream);
  });
}

inline cudaError_t BlockSparseAttentionVarlenLaunch(
    DType dt, const void* q, const void* k, const void* v, const int32_t* block_idx,
    const int32_t* block_cnt, const int32_t* cu_seqlens_q, const int32_t* cu_seqlens_k,
    void* out, float* lse, int64_t S, int64_t total_q, int64_t total_k, int64_t H, int64_t Hk,
    int64_t D, int64_t max_k, int64_t nbq_max, int64_t block_size, int64_t qsn, int64_t qsh,
    int64_t ksn, int64_t ksh, int64_t vsn, int64_t vsh, float scale, bool causal,
    cudaStream_t stream) {
  return DispatchHalf(dt, [&](auto tag) {
    using T = typename decltype(tag)::type;
    return BlockSparseAttentionVarlen<T>(
        static_cast<const T*>(q), static_cast<const T*>(k), static_cast<const T*>(v), block_idx,
        block_cnt, cu_seqlens_q, cu_seqlens_k, static_cast<T*>(out), lse, S, total_q, total_k,
        H, Hk, D, max_k, nbq_max, block_size, qsn, qsh, ksn, ksh, vsn, vsh, scale, causal,
        stream);
  });
}

inline cudaError_t BlockSparseAttentionPagedLaunch(
    DType dt, const void* q, const void* k_cache, const void* v_cache,
    const int32_t* block_table, const int32_t* seq_lens_k, const int32_t* cu_seqlens_q,
    const int32_t* block_idx, const int32_t* block_cnt, void* out, float* lse, int64_t S,
    int64_t Nq, int64_t H, int64_t Hk, int64_t D, int64_t num_pages, int64_t page_size,
    int64_t max_pages, int64_t max_k, int64_t nbq, int64_t block_size, int64_t qsb, int64_t qsn,
    int64_t qsh, int64_t ksp, int64_t ksn, int64_t ksh, int64_t vsp, int64_t vsn, int64_t vsh,
    float scale, bool causal, cudaStream_t stream) {
  return DispatchHalf(dt, [&](auto tag) {
    using T = typename decltype(tag)::type;
    return BlockSparseAttentionPaged<T>(
        static_cast<const T*>(q), static_cast<const T*>(k_cache), static_cast<const T*>(v_cache),
        block_table, seq_lens_k, cu_seqlens_q, block_idx, block_cnt, static_cast<T*>(out), lse,
        S, Nq, H, Hk, D, num_pages, page_size, max_pages, max_k, nbq, block_size, qsb, qsn, qsh,
        ksp, ksn, ksh, vsp, vsn, vsh, scale, causal, stream);
  });
}

#ifdef TASKSIEVE_COMPILE_CHECK
#define TASKSIEVE_INSTANTIATE_BSA(T)                                                          \
  template cudaError_t BlockSparseAttention<T>(                                               \
      const T*, const T*, const T*, const int32_t*, const int32_t*, T*, float*, int64_t,      \
      int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, \
      int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, float, bool, cudaStream_t);
#define TASKSIEVE_INSTANTIATE_BSA_VARLEN(T)                                                   \
  template cudaError_t BlockSparseAttentionVarlen<T>(                                         \
      const T*, const T*, const T*, const int32_t*, const int32_t*, const int32_t*,           \
      const int32_t*, T*, float*, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t,       \
      int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, float, \
      bool, cudaStream_t);
TASKSIEVE_INSTANTIATE_BSA(__half)
TASKSIEVE_INSTANTIATE_BSA(__nv_bfloat16)
TASKSIEVE_INSTANTIATE_BSA_VARLEN(__half)
TASKSIEVE_INSTANTIATE_BSA_VARLEN(__nv_bfloat16)
template cudaError_t BlockSparseAttentionPaged<__half>(
    const __half*, const __half*, const __half*, const int32_t*, const int32_t*, const int32_t*,
    const int32_t*, const int32_t*, __half*, float*, int64_t, int64_t, int64_t, int64_t, int64_t,
    int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t,
    int64_t, int64_t, int64_t, int64_t, int64_t, float, bool, cudaStream_t);
template cudaError_t BlockSparseAttentionPaged<__nv_bfloat16>(
    const __nv_bfloat16*, const __nv_bfloat16*, const __nv_bfloat16*, const int32_t*,
    const int32_t*, const int32_t*, const int32_t*, const int32_t*, __nv_bfloat16*, float*,
    int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t,
    int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t,
    float, bool, cudaStream_t);
#undef TASKSIEVE_INSTANTIATE_BSA
#undef TASKSIEVE_INSTANTIATE_BSA_VARLEN
#endif

}  // namespace tasksieve
