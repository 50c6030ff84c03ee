// Fused FlexPrefill pattern estimation (torch-free).
//
//   FlexEstimateWorkspaceBytes(B, Nq, H, Hk, Nk, D, block_size) -> size_t
//   FlexEstimate<T>(q, k, vertical, slash, estimate, workspace, workspace_bytes, B, Nq, H, Hk,
//                   Nk, D, block_size, q strides, k strides, scale, stream) -> cudaError_t
//
// Math (the op contract in csrc/ops.cpp; index helpers in flex_index.h), per batch b and query
// head h (G = H / Hk, hk = h / G), fp32 throughout, bs = block_size, nb = ceil(Nk / bs),
// m = min(bs, Nq) representative queries (the last m; rep query r at position p_r = Nk - m + r):
//   x[r, j]   = scale * q[b, Nq - m + r, h, :] . k[b, j, hk, :]        for keys j <= p_r
//   A[r, j]   = exp(x[r, j] - m_r) / l_r       (row max m_r and sum l_r: pass 1)
//   vertical[c] = (1/m) sum_r sum_{j in block c} A[r, j]                                (pass 2)
//   slash[t]    = (1/m) sum_r sum_{j: (p_r - j) / bs == t} A[r, j]   t = 0: main diagonal (pass 2)
//   estimate[c] = softmax_c(scale * qbar . kbar_c), qbar = mean_r q_rep[r], kbar_c = mean of the
//                 real keys of block c (no causal mask)
// Pass 1: per-chunk (max, sum) partials and an in-order combine (qk_tiles.cuh, shared with
// WindowKV's window_scores.cuh: 32 x 64 tiles, head dim staged 64 at a time through shared
// memory). Pass 2:
// one CTA per (b, h, 512 keys): 32 x 64 tiles of A go through shared memory once; column sums
// give the token mass of the CTA's keys (reduced into whole key blocks: 512 is a multiple of
// bs), diagonal sums give the mass per offset delta = p_r - j of the CTA's delta range (at most
// 512 + m - 1 offsets), reduced into offset blocks as per-CTA partials that a combine kernel
// adds in CTA order. The [m, Nk] matrix never reaches global memory; no atomics, so the
// results are deterministic.
//
//   FlexEstimatePagedWorkspaceBytes(S, q_rows, H, Hk, D, max_pages, page_size, block_size)
//   FlexEstimatePaged<T>(q, k_cache, block_table, seq_lens_k, cu_seqlens_q, vertical, slash,
//                        estimate, workspace, ..., S, q_rows, H, Hk, D, num_pages, page_size,
//                        max_pages, block_size, strides..., scale, stream) -> cudaError_t
//
// Paged KV (flex_estimate_paged): the same six launches with Paged = true. Keys are read
// through PagedRows (kv_rows.cuh); every kernel takes its sequence's clamped span
// (paged::seq_span: nq_s, nk_s, first query row; m_s = min(bs, nq_s)) instead of the launch's
// uniform sizes; the plan covers max_pages * page_size keys. Outputs [S, H, nb_max] are zeroed
// first: entries past a sequence's blocks, and sequences without queries or keys, stay 0.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <climits>
#include <cstddef>
#include <cstdint>

#include "tasksieve/common.h"
#include "tasksieve/dtype.cuh"
#include "tasksieve/flex_index.h"
#include "tasksieve/kv_rows.cuh"
#include "tasksieve/paged_index.h"
#include "tasksieve/qk_tiles.cuh"

namespace tasksieve {
namespace flex_estimate_detail {

// The shared tile machinery (qk_tiles.cuh): 256 threads, 32 x 64 q.k tiles, (m, l) stats.
using qk_tiles::kAlign;
using qk_tiles::kDK;
using qk_tiles::kKT;
using qk_tiles::kMaxKeyTilesPerChunk;
using qk_tiles::kQT;
using qk_tiles::kRK;
using qk_tiles::kRQ;
using qk_tiles::kTargetBlocks;
using qk_tiles::kThreads;
using qk_tiles::kWarps;
using qk_tiles::AlignUp;
using qk_tiles::MergeStats;
using qk_tiles::RowStatsCombineKernel;
using qk_tiles::TileDotsRows;
using qk_tiles::TileSmem;
using qk_tiles::ToFloat;

constexpr int kKeysPerCta = 512;          // pass-2 keys per CTA, a multiple of every block size
constexpr int kMinBlock = 16, kMaxBlock = 128;
constexpr int kMaxDiag = kKeysPerCta + kMaxBlock;  // >= kKeysPerCta + m - 1 offsets
constexpr int kTileDiags = kQT + kKT - 1;          // 95 diagonals cross a 32 x 64 tile

TS_HOST_DEVICE TS_INLINE bool SupportedBlockSize(int64_t bs) {
  return bs >= kMinBlock && bs <= kMaxBlock && (bs & (bs - 1)) == 0;
}

// Offset blocks a CTA can touch: its deltas span <= kKeysPerCta + m - 2 <= kKeysPerCta + bs.
TS_HOST_DEVICE TS_INLINE int64_t SlashSpan(int64_t bs) { return kKeysPerCta / bs + 3; }

// Smallest delta = p_r - j of CTA cb over its keys [J0, J1) (deltas below 0 are masked).
TS_HOST_DEVICE TS_INLINE int64_t CtaMinDelta(int64_t cb, int64_t Nk, int64_t m) {
  const int64_t J1 = ts_min<int64_t>((cb + 1) * kKeysPerCta, Nk);
  return ts_max<int64_t>(0, (Nk - m) - (J1 - 1));
}

template <typename T>
__device__ __forceinline__ T BlockReduce(T v, T* red, bool is_max) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
#pragma unroll
  for (int off = 16; off > 0; off /= 2) {
    const float o = __shfl_xor_sync(0xffffffffu, v, off);
    v = is_max ? fmaxf(v, o) : v + o;
  }
  __syncthreads();  // red reusable
  if (lane == 0) red[warp] = v;
  __syncthreads();
  float r = red[0];
  for (int w = 1; w < kWarps; ++w) r = is_max ? fmaxf(r, red[w]) : r + red[w];
  return r;
}

// Paged-mode launch arguments (flex_estimate_paged); unused by the dense instantiations.
struct PagedEst {
  PagedKV kv;                    // table, lengths, page geometry (kv.k_page_stride)
  const int32_t* cu_q = nullptr;  // packed query offsets [S + 1], or nullptr (dense q)
  int64_t q_rows = 0;             // q dim 1: Nq (dense) or total_q (packed)
};

// The problem of batch row / sequence b: element offset of its first representative query
// (from q's base), its m representative queries, its Nk keys. Dense: the launch's m and Nk.
// Paged: paged::seq_span (clamped), m = min(bs, nq).
struct SeqInfo {
  int64_t q_off, m, nk;
};

template <bool Paged>
__device__ __forceinline__ SeqInfo GetSeq(int64_t b, int64_t m, int64_t Nq, int64_t Nk,
                                          int64_t bs, int64_t q_stride_b, int64_t q_stride_n,
                                          const PagedEst& pe) {
  if constexpr (Paged) {
    const paged::SeqSpan sp =
        paged::seq_span(pe.cu_q, pe.kv.seq_lens, b, pe.q_rows, pe.kv.kv_cap());
    const int64_t ms = flex::num_rep_queries(sp.nq, bs);
    const int64_t row0 = sp.q_begin + flex::rep_query_index(sp.nq, ms, 0);
    return {(pe.cu_q != nullptr ? 0 : b * q_stride_b) + row0 * q_stride_n, ms, sp.nk};
  } else {
    (void)bs;
    (void)pe;
    return {b * q_stride_b + flex::rep_query_index(Nq, m, 0) * q_stride_n, m, Nk};
  }
}

// Key rows of (b, KV head hk): the tensor's rows, or the pages of sequence b.
template <bool Paged, typename T>
__device__ __forceinline__ auto KeyRows(const T* k, int64_t b, int64_t hk, int64_t k_stride_b,
                                        int64_t k_stride_n, int64_t k_stride_h,
                                        const PagedEst& pe) {
  if constexpr (Paged) {
    (void)k_stride_b;
    return PagedRows<T>{k + hk * k_stride_h, pe.kv.block_table + b * pe.kv.max_pages,
                        pe.kv.page_size, pe.kv.num_pages, pe.kv.k_page_stride, k_stride_n};
  } else {
    (void)pe;
    return ContigRows<T>{k + b * k_stride_b + hk * k_stride_h, k_stride_n};
  }
}

// Pass 1, one CTA per (b, h, query tile qt, key chunk c): part[((b*H + h)*m + r)*chunks + c] =
// (max_j x[r, j], sum_j exp(x[r, j] - max)) over the visible keys j <= p_r of chunk c (rows
// r >= the sequence's own m, in paged mode, get the empty partial). q is the tensor's base.
template <typename T, bool Paged>
__global__ void __launch_bounds__(kThreads)
    FlexStatsKernel(const T* __restrict__ q, const T* __restrict__ k, float2* __restrict__ part,
                    int64_t m, int64_t H, int64_t Hk, int64_t Nk, int D, int64_t q_stride_b,
                    int64_t q_stride_n, int64_t q_stride_h, int64_t k_stride_b,
                    int64_t k_stride_n, int64_t k_stride_h, float scale, int64_t q_tiles,
                    int64_t chunks, int64_t tiles_per_chunk, int64_t Nq, int64_t bs,
                    PagedEst pe) {
  __shared__ TileSmem sm;
  int64_t bid = blockIdx.x;
  const int64_t c = bid % chunks;
  bid /= chunks;
  const int64_t qt = bid % q_tiles;
  bid /= q_tiles;
  const int64_t h = bid % H, b = bid / H;
  const int64_t hk = h / (H / Hk);
  const SeqInfo sq = GetSeq<Paged>(b, m, Nq, Nk, bs, q_stride_b, q_stride_n, pe);
  const T* qh = q + sq.q_off + h * q_stride_h;
  const auto krows = KeyRows<Paged>(k, b, hk, k_stride_b, k_stride_n, k_stride_h, pe);
  const int64_t ms = sq.m, nk = sq.nk;
  const int64_t i0 = qt * kQT, base = nk - ms;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  float mx[kRQ], l[kRQ], acc[kRQ][kRK];
#pragma unroll
  for (int r = 0; r < kRQ; ++r) mx[r] = ts_neg_inf(), l[r] = 0.f;
  for (int64_t t = 0; t < tiles_per_chunk; ++t) {
    const int64_t j0 = (c * tiles_per_chunk + t) * kKT;
    if (j0 >= nk || i0 >= ms) break;  // uniform over the CTA
    TileDotsRows(qh, q_stride_n, i0, ms, krows, j0, nk, D, sm, acc);
#pragma unroll
    for (int r = 0; r < kRQ; ++r) {
      const int64_t i = i0 + warp + kWarps * r;
#pragma unroll
      for (int cc = 0; cc < kRK; ++cc) {
        const int64_t j = j0 + lane + 32 * cc;
        if (i < ms && j <= base + i) MergeStats(mx[r], l[r], scale * acc[r][cc], 1.f);
      }
    }
  }
#pragma unroll
  for (int r = 0; r < kRQ; ++r) {
#pragma unroll
    for (int off = 16; off > 0; off /= 2) {
      const float m2 = __shfl_xor_sync(0xffffffffu, mx[r], off);
      const float l2 = __shfl_xor_sync(0xffffffffu, l[r], off);
      MergeStats(mx[r], l[r], m2, l2);
    }
    const int64_t i = i0 + warp + kWarps * r;
    if (lane == 0 && i < m) part[((b * H + h) * m + i) * chunks + c] = make_float2(mx[r], l[r]);
  }
}

// Pass 2, one CTA per (b, h, key range cb = keys [cb*512, min(cb*512 + 512, Nk))).
//   vertical[(b*H + h)*nb + c] for the CTA's key blocks c (whole blocks: 512 % bs == 0)
//   slash_part[((b*H + h)*kb + cb)*span + u] = unnormalised mass of offset block
//     CtaMinDelta(cb)/bs + u over the CTA's keys (times 1/m)
// q is the tensor's base; nb is the row length of vertical (paged: nb_max, the sequence's own
// blocks are written, the rest keeps the launcher's zeros); stats rows are m (the plan's) apart.
// Paged: a CTA past its sequence's keys, or of a sequence without queries, writes zero
// partials and exits.
template <typename T, bool Paged>
__global__ void __launch_bounds__(kThreads)
    FlexMassKernel(const T* __restrict__ q, const T* __restrict__ k,
                   const float2* __restrict__ stats, float* __restrict__ vertical,
                   float* __restrict__ slash_part, int64_t m, int64_t H, int64_t Hk, int64_t Nk,
                   int D, int64_t bs, int64_t nb, int64_t q_stride_b, int64_t q_stride_n,
                   int64_t q_stride_h, int64_t k_stride_b, int64_t k_stride_n,
                   int64_t k_stride_h, float scale, int64_t kb, int64_t span, int64_t Nq,
                   PagedEst pe) {
  __shared__ TileSmem sm;
  __shared__ float pt[kQT][kKT + 1];
  __shared__ float col[kKeysPerCta];
  __shared__ float diag[kMaxDiag];
  int64_t bid = blockIdx.x;
  const int64_t cb = bid % kb;
  const int64_t bh = bid / kb;
  const int64_t h = bh % H, b = bh / H;
  const int64_t hk = h / (H / Hk);
  const SeqInfo sq = GetSeq<Paged>(b, m, Nq, Nk, bs, q_stride_b, q_stride_n, pe);
  const T* qh = q + sq.q_off + h * q_stride_h;
  const auto krows = KeyRows<Paged>(k, b, hk, k_stride_b, k_stride_n, k_stride_h, pe);
  const int64_t ms = sq.m, nk = sq.nk;
  const float2* st = stats + bh * m;
  const int64_t J0 = cb * kKeysPerCta, J1 = ts_min<int64_t>(J0 + kKeysPerCta, nk);
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  if constexpr (Paged) {
    if (ms == 0 || J0 >= nk) {  // uniform over the CTA
      for (int64_t u = tid; u < span; u += kThreads) slash_part[(bh * kb + cb) * span + u] = 0.f;
      return;
    }
  }
  const int64_t base = nk - ms;  // position of rep query 0
  const int64_t dmin = CtaMinDelta(cb, nk, ms), dmax = nk - 1 - J0;

  for (int t = tid; t < kKeysPerCta; t += kThreads) col[t] = 0.f;
  for (int t = tid; t < kMaxDiag; t += kThreads) diag[t] = 0.f;
  // (ordered before the first use by TileDots' leading __syncthreads)

  for (int64_t j0 = J0; j0 < J1; j0 += kKT) {
    for (int64_t i0 = 0; i0 < ms; i0 += kQT) {
      float acc[kRQ][kRK];
      TileDotsRows(qh, q_stride_n, i0, ms, krows, j0, J1, D, sm, acc);
#pragma unroll
      for (int r = 0; r < kRQ; ++r) {
        const int ri = warp + kWarps * r;
        const int64_t i = i0 + ri;
        const float2 s = i < ms ? st[i] : make_float2(0.f, 0.f);  // (m_i, 1/l_i)
#pragma unroll
        for (int c = 0; c < kRK; ++c) {
          const int jl = lane + 32 * c;
          const int64_t j = j0 + jl;
          pt[ri][jl] = (i < ms && j < J1 && j <= base + i) ? expf(scale * acc[r][c] - s.x) * s.y
                                                          : 0.f;
        }
      }
      __syncthreads();
      if (tid < kKT) {
        float v = 0.f;
        for (int ri = 0; ri < kQT; ++ri) v += pt[ri][tid];
        if (j0 + tid < J1) col[j0 + tid - J0] += v;
      } else if (tid < kKT + kTileDiags) {
        const int dl = tid - kKT;  // tile diagonal: ri - jl = dl - (kKT - 1)
        const int64_t delta = base + i0 - j0 + dl - (kKT - 1);
        float v = 0.f;
        for (int ri = 0; ri < kQT; ++ri) {
          const int jl = ri + (kKT - 1) - dl;
          if (jl >= 0 && jl < kKT) v += pt[ri][jl];
        }
        // A nonzero entry always lies in [dmin, dmax]; the bound also keeps us in diag.
        if (delta >= dmin && delta <= dmax && delta - dmin < kMaxDiag) diag[delta - dmin] += v;
      }
      // pt / col / diag are next touched after the next TileDots' leading __syncthreads.
    }
  }
  __syncthreads();
  const float inv_m = 1.f / static_cast<float>(ms);
  const int64_t c0 = J0 / bs, c1 = ceil_div<int64_t>(J1, bs);
  for (int64_t c = c0 + tid; c < c1; c += kThreads) {
    const int64_t e = flex::block_end(c, nk, bs);
    float v = 0.f;
    for (int64_t j = flex::block_begin(c, bs); j < e; ++j) v += col[j - J0];
    vertical[bh * nb + c] = v * inv_m;
  }
  const int64_t t_lo = dmin / bs;
  for (int64_t u = tid; u < span; u += kThreads) {
    const int64_t t = t_lo + u;
    const int64_t lo = ts_max<int64_t>(t * bs, dmin), hi = ts_min<int64_t>((t + 1) * bs - 1, dmax);
    float v = 0.f;
    for (int64_t d = lo; d <= hi; ++d) v += diag[d - dmin];
    slash_part[(bh * kb + cb) * span + u] = v * inv_m;
  }
}

// slash[(b*H + h)*nb + t] = sum over CTAs cb (in order) of their partial for offset block t
// (every t < nb is written; paged: t past the sequence's blocks sums zero partials).
template <typename T, bool Paged>
__global__ void FlexSlashCombineKernel(const float* __restrict__ slash_part,
                                       float* __restrict__ slash, int64_t BH, int64_t nb,
                                       int64_t Nk, int64_t m, int64_t bs, int64_t kb,
                                       int64_t span, int64_t H, int64_t Nq, PagedEst pe) {
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= BH * nb) return;
  const int64_t t = idx % nb, bh = idx / nb;
  const SeqInfo sq = GetSeq<Paged>(bh / H, m, Nq, Nk, bs, 0, 0, pe);
  float v = 0.f;
  for (int64_t cb = 0; cb < kb; ++cb) {
    const int64_t u = t - CtaMinDelta(cb, sq.nk, sq.m) / bs;
    if (u >= 0 && u < span) v += slash_part[(bh * kb + cb) * span + u];
  }
  slash[idx] = v;
}

// kbar[((b*Hk + hk)*nb + c)*D + d] = mean over the real keys of block c of k[b, j, hk, d]
// (paged: blocks past the sequence's keys are skipped, never read).
template <typename T, bool Paged>
__global__ void __launch_bounds__(kThreads)
    FlexKeyMeanKernel(const T* __restrict__ k, float* __restrict__ kbar, int64_t Hk, int64_t Nk,
                      int D, int64_t bs, int64_t nb, int64_t k_stride_b, int64_t k_stride_n,
                      int64_t k_stride_h, PagedEst pe) {
  int64_t bid = blockIdx.x;
  const int64_t c = bid % nb;
  bid /= nb;
  const int64_t hk = bid % Hk, b = bid / Hk;
  const auto krows = KeyRows<Paged>(k, b, hk, k_stride_b, k_stride_n, k_stride_h, pe);
  int64_t nk = Nk;
  if constexpr (Paged)
    nk = ts_clamp(static_cast<int64_t>(pe.kv.seq_lens[b]), int64_t{0}, pe.kv.kv_cap());
  const int64_t j0 = flex::block_begin(c, bs), j1 = flex::block_end(c, nk, bs);
  if constexpr (Paged) {
    if (j0 >= j1) return;  // uniform over the CTA
  }
  const float inv = 1.f / static_cast<float>(j1 - j0);
  for (int d = threadIdx.x; d < D; d += blockDim.x) {
    float v = 0.f;
    for (int64_t j = j0; j < j1; ++j) v += ToFloat(krows(j)[d]);
    kbar[((b * Hk + hk) * nb + c) * D + d] = v * inv;
  }
}

// One CTA per (b, h): qbar = mean of the m rep queries; estimate[c] = softmax_c(scale *
// qbar . kbar_c). The logits are staged in `estimate` itself (global, same CTA). q is the
// tensor's base; nb the row length (paged: softmax over the sequence's own blocks, the rest
// keeps the launcher's zeros; a sequence without queries or keys is skipped).
template <typename T, bool Paged>
__global__ void __launch_bounds__(kThreads)
    FlexEstimateKernel(const T* __restrict__ q, const float* __restrict__ kbar,
                       float* __restrict__ estimate, int64_t m, int64_t H, int64_t Hk, int D,
                       int64_t nb, int64_t q_stride_b, int64_t q_stride_n, int64_t q_stride_h,
                       float scale, int64_t Nq, int64_t Nk, int64_t bs, PagedEst pe) {
  __shared__ float qbar[256];  // D <= 256 (checked by the launcher)
  __shared__ float red[kWarps];
  const int64_t bh = blockIdx.x;
  const int64_t h = bh % H, b = bh / H;
  const int64_t hk = h / (H / Hk);
  const SeqInfo sq = GetSeq<Paged>(b, m, Nq, Nk, bs, q_stride_b, q_stride_n, pe);
  const int64_t ms = sq.m, nbs = Paged ? flex::num_blocks(sq.nk, bs) : nb;
  if constexpr (Paged) {
    if (ms == 0 || nbs == 0) return;  // uniform over the CTA
  }
  const T* qh = q + sq.q_off + h * q_stride_h;
  const float* kb = kbar + (b * Hk + hk) * nb * D;
  float* out = estimate + bh * nb;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  for (int d = tid; d < D; d += kThreads) {
    float v = 0.f;
    for (int64_t r = 0; r < ms; ++r) v += ToFloat(qh[r * q_stride_n + d]);
    qbar[d] = v / static_cast<float>(ms);
  }
  __syncthreads();
  for (int64_t c = warp; c < nbs; c += kWarps) {
    float v = 0.f;
    for (int d = lane; d < D; d += 32) v = fmaf(qbar[d], kb[c * D + d], v);
#pragma unroll
    for (int off = 16; off > 0; off /= 2) v += __shfl_xor_sync(0xffffffffu, v, off);
    if (lane == 0) out[c] = scale * v;
  }
  __syncthreads();  // logits visible to the whole CTA
  float mx = ts_neg_inf();
  for (int64_t c = tid; c < nbs; c += kThreads) mx = fmaxf(mx, out[c]);
  mx = BlockReduce(mx, red, true);
  float sum = 0.f;
  for (int64_t c = tid; c < nbs; c += kThreads) sum += expf(out[c] - mx);
  sum = BlockReduce(sum, red, false);
  const float inv = 1.f / sum;
  for (int64_t c = tid; c < nbs; c += kThreads) out[c] = expf(out[c] - mx) * inv;
}

struct Plan {
  int64_t nb = 0, m = 0, q_tiles = 0, tiles_per_chunk = 1, chunks = 0, kb = 0, span = 0;
  size_t part_off = 0, stats_off = 0, slash_off = 0, kbar_off = 0, bytes = 0;
};

inline Plan MakePlan(int64_t B, int64_t Nq, int64_t H, int64_t Hk, int64_t Nk, int64_t D,
                     int64_t bs) {
  Plan p;
  p.nb = flex::num_blocks(Nk, bs);
  p.m = flex::num_rep_queries(Nq, bs);
  if (B <= 0 || H <= 0 || Hk <= 0 || p.nb <= 0 || p.m <= 0 || D <= 0) return p;
  // Pass 1: split the keys for >= ~kTargetBlocks blocks.
  p.q_tiles = ceil_div<int64_t>(p.m, kQT);
  const int64_t key_tiles = ceil_div<int64_t>(Nk, kKT);
  const int64_t want_chunks = ceil_div<int64_t>(kTargetBlocks, B * H * p.q_tiles);
  p.tiles_per_chunk =
      ts_clamp<int64_t>(ceil_div(key_tiles, want_chunks), 1, kMaxKeyTilesPerChunk);
  p.chunks = ceil_div(key_tiles, p.tiles_per_chunk);
  p.kb = ceil_div<int64_t>(Nk, kKeysPerCta);
  p.span = SlashSpan(bs);
  p.part_off = 0;
  p.stats_off = AlignUp(static_cast<size_t>(B * H * p.m * p.chunks) * sizeof(float2));
  p.slash_off = p.stats_off + AlignUp(static_cast<size_t>(B * H * p.m) * sizeof(float2));
  p.kbar_off = p.slash_off + AlignUp(static_cast<size_t>(B * H * p.kb * p.span) * sizeof(float));
  p.bytes = p.kbar_off + AlignUp(static_cast<size_t>(B * Hk * p.nb * D) * sizeof(float));
  return p;
}

}  // namespace flex_estimate_detail

// Bytes of device workspace FlexEstimate needs (0 when there is nothing to compute):
// about B*H*m*(chunks + 1)*8 + B*H*ceil(Nk/512)*(512/bs + 3)*4 + B*Hk*nb*D*4 bytes.
inline size_t FlexEstimateWorkspaceBytes(int64_t B, int64_t Nq, int64_t H, int64_t Hk,
                                         int64_t Nk, int64_t D, int64_t block_size) {
  if (block_size < 1) return 0;
  return flex_estimate_detail::MakePlan(B, Nq, H, Hk, Nk, D, block_size).bytes;
}

namespace flex_estimate_detail {

// The six launches of FlexEstimate / FlexEstimatePaged. Nq = q dim 1 (paged packed: total_q),
// Nk = keys (paged: the table's capacity; each sequence uses its own nk). Paged: outputs are
// zeroed first (entries past a sequence's blocks, sequences without queries or keys).
template <typename T, bool Paged>
cudaError_t Run(const T* q, const T* k, float* vertical, float* slash, float* estimate,
                void* workspace, size_t workspace_bytes, int64_t B, int64_t Nq, int64_t H,
                int64_t Hk, int64_t Nk, int64_t D, int64_t block_size, int64_t q_stride_b,
                int64_t q_stride_n, int64_t q_stride_h, int64_t k_stride_b, int64_t k_stride_n,
                int64_t k_stride_h, float scale, cudaStream_t stream, const PagedEst& pe) {
  namespace d = flex_estimate_detail;
  if (B < 0 || Nq < 0 || (!Paged && Nq > Nk) || Hk < 1 || H < 0 || H % Hk != 0 || D < 1 ||
      D > 256 || !d::SupportedBlockSize(block_size))
    return cudaErrorInvalidValue;
  const d::Plan p = d::MakePlan(B, Nq, H, Hk, Nk, D, block_size);
  const int64_t out_elems = B * H * p.nb;
  if (out_elems == 0) return cudaSuccess;
  if (Paged || p.m == 0) {  // paged: zeros past each sequence; no queries: no mass anywhere
    const size_t bytes = static_cast<size_t>(out_elems) * sizeof(float);
    cudaError_t err = cudaMemsetAsync(vertical, 0, bytes, stream);
    if (err == cudaSuccess) err = cudaMemsetAsync(slash, 0, bytes, stream);
    if (err == cudaSuccess) err = cudaMemsetAsync(estimate, 0, bytes, stream);
    if (err != cudaSuccess || p.m == 0) return err;
  }
  if (workspace == nullptr || workspace_bytes < p.bytes || !is_aligned(workspace, d::kAlign))
    return cudaErrorInvalidValue;
  const int64_t BH = B * H;
  const int64_t blocks1 = BH * p.q_tiles * p.chunks;
  const int64_t rows = BH * p.m;
  const int64_t blocks_c = ceil_div<int64_t>(rows, d::kThreads);
  const int64_t blocks2 = BH * p.kb;
  const int64_t blocks_s = ceil_div<int64_t>(out_elems, d::kThreads);
  const int64_t blocks_k = B * Hk * p.nb;
  if (blocks1 > INT_MAX || blocks_c > INT_MAX || blocks2 > INT_MAX || blocks_s > INT_MAX ||
      blocks_k > INT_MAX || BH > INT_MAX)
    return cudaErrorInvalidConfiguration;

  char* ws = static_cast<char*>(workspace);
  float2* part = reinterpret_cast<float2*>(ws + p.part_off);
  float2* stats = reinterpret_cast<float2*>(ws + p.stats_off);
  float* slash_part = reinterpret_cast<float*>(ws + p.slash_off);
  float* kbar = reinterpret_cast<float*>(ws + p.kbar_off);
  const int Di = static_cast<int>(D);

  d::FlexStatsKernel<T, Paged><<<static_cast<unsigned>(blocks1), d::kThreads, 0, stream>>>(
      q, k, part, p.m, H, Hk, Nk, Di, q_stride_b, q_stride_n, q_stride_h, k_stride_b,
      k_stride_n, k_stride_h, scale, p.q_tiles, p.chunks, p.tiles_per_chunk, Nq, block_size, pe);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  d::RowStatsCombineKernel<T><<<static_cast<unsigned>(blocks_c), d::kThreads, 0, stream>>>(
      part, stats, rows, p.chunks);
  if ((err = cudaGetLastError()) != cudaSuccess) return err;
  d::FlexMassKernel<T, Paged><<<static_cast<unsigned>(blocks2), d::kThreads, 0, stream>>>(
      q, k, stats, vertical, slash_part, p.m, H, Hk, Nk, Di, block_size, p.nb, q_stride_b,
      q_stride_n, q_stride_h, k_stride_b, k_stride_n, k_stride_h, scale, p.kb, p.span, Nq, pe);
  if ((err = cudaGetLastError()) != cudaSuccess) return err;
  d::FlexSlashCombineKernel<T, Paged>
      <<<static_cast<unsigned>(blocks_s), d::kThreads, 0, stream>>>(
          slash_part, slash, BH, p.nb, Nk, p.m, block_size, p.kb, p.span, H, Nq, pe);
  if ((err = cudaGetLastError()) != cudaSuccess) return err;
  d::FlexKeyMeanKernel<T, Paged><<<static_cast<unsigned>(blocks_k), 128, 0, stream>>>(
      k, kbar, Hk, Nk, Di, block_size, p.nb, k_stride_b, k_stride_n, k_stride_h, pe);
  if ((err = cudaGetLastError()) != cudaSuccess) return err;
  d::FlexEstimateKernel<T, Paged><<<static_cast<unsigned>(BH), d::kThreads, 0, stream>>>(
      q, kbar, estimate, p.m, H, Hk, Di, p.nb, q_stride_b, q_stride_n, q_stride_h, scale, Nq,
      Nk, block_size, pe);
  return cudaGetLastError();
}

}  // namespace flex_estimate_detail

// FlexPrefill estimation for every (b, query head).
//   q         [B, Nq, H, D] T, element strides (q_stride_b, q_stride_n, q_stride_h), head dim
//             contiguous; the queries are the last Nq of the Nk positions
//   k         [B, Nk, Hk, D] T, element strides (k_stride_b, k_stride_n, k_stride_h), head dim
//             contiguous
//   vertical, slash, estimate   float32 [B, H, nb] contiguous, nb = ceil(Nk / block_size)
//   workspace >= FlexEstimateWorkspaceBytes(...) bytes, 256-byte aligned
// T = float, __half or __nv_bfloat16; math in fp32. Requires 0 <= Nq <= Nk, H % Hk == 0,
// 1 <= D <= 256, block_size in {16, 32, 64, 128}. Empty outputs launch nothing; Nq == 0 with
// Nk > 0 zero-fills the outputs. Six launches on `stream`.
template <typename T>
cudaError_t FlexEstimate(const T* q, const T* k, float* vertical, float* slash, float* estimate,
                         void* workspace, size_t workspace_bytes, int64_t B, int64_t Nq,
                         int64_t H, int64_t Hk, int64_t Nk, int64_t D, int64_t block_size,
                         int64_t q_stride_b, int64_t q_stride_n, int64_t q_stride_h,
                         int64_t k_stride_b, int64_t k_stride_n, int64_t k_stride_h, float scale,
                         cudaStream_t stream) {
  return flex_estimate_detail::Run<T, false>(
      q, k, vertical, slash, estimate, workspace, workspace_bytes, B, Nq, H, Hk, Nk, D,
      block_size, q_stride_b, q_stride_n, q_stride_h, k_stride_b, k_stride_n, k_stride_h, scale,
      stream, flex_estimate_detail::PagedEst{});
}

// Bytes of device workspace FlexEstimatePaged needs: FlexEstimateWorkspaceBytes over S rows of
// q_rows queries and max_pages * page_size keys (the plan covers the whole table).
inline size_t FlexEstimatePagedWorkspaceBytes(int64_t S, int64_t q_rows, int64_t H, int64_t Hk,
                                              int64_t D, int64_t max_pages, int64_t page_size,
                                              int64_t block_size) {
  return FlexEstimateWorkspaceBytes(S, q_rows, H, Hk, max_pages * page_size, D, block_size);
}

// Paged-KV estimation (flex_estimate_paged): S sequences; q dense [S, Nq, H, D] (cu_seqlens_q
// nullptr, q_rows = Nq) or packed [total_q, H, D] (q_rows = total_q); k_cache [num_pages,
// page_size, Hk, D] with page / row / head strides; block_table [S, max_pages], seq_lens_k [S]
// contiguous int32. Outputs [S, H, nb_max] contiguous, nb_max = ceil(max_pages * page_size /
// block_size) (they are zeroed first; sequence s fills entries [0, ceil(nk_s / bs))). Values are
// clamped (paged_index.h), never validated. Workspace: FlexEstimatePagedWorkspaceBytes.
template <typename T>
cudaError_t FlexEstimatePaged(const T* q, const T* k_cache, const int32_t* block_table,
                              const int32_t* seq_lens_k, const int32_t* cu_seqlens_q,
                              float* vertical, float* slash, float* estimate, void* workspace,
                              size_t workspace_bytes, int64_t S, int64_t q_rows, int64_t H,
                              int64_t Hk, int64_t D, int64_t num_pages, int64_t page_size,
                              int64_t max_pages, int64_t block_size, int64_t q_stride_b,
                              int64_t q_stride_n, int64_t q_stride_h, int64_t k_stride_p,
                              int64_t k_stride_n, int64_t k_stride_h, float scale,
                              cudaStream_t stream) {
  if (page_size < 1 || max_pages < 0 || block_table == nullptr || seq_lens_k == nullptr)
    return cudaErrorInvalidValue;
  flex_estimate_detail::PagedEst pe;
  pe.kv.block_table = block_table;
  pe.kv.seq_lens = seq_lens_k;
  pe.kv.max_pages = max_pages;
  pe.kv.page_size = page_size;
  pe.kv.num_pages = num_pages;
  pe.kv.k_page_stride = k_stride_p;
  pe.cu_q = cu_seqlens_q;
  pe.q_rows = q_rows;
  // The output rows span the whole table (nb_max) even without pages: plan with max_pages *
  // page_size keys (kernels use each sequence's clamped nk, 0 when there are no pages).
  return flex_estimate_detail::Run<T, true>(
      q, k_cache, vertical, slash, estimate, workspace, workspace_bytes, S, q_rows, H, Hk,
      max_pages * page_size, D, block_size, q_stride_b, q_stride_n, q_stride_h, 0, k_stride_n,
      k_stride_h, scale, stream, pe);
}

// The entry point of the CUDA glue and the simulator runner: FlexEstimate<T> for the element
// type `dt` of q and k. The caller allocates the workspace (FlexEstimateWorkspaceBytes; its
// content on entry does not matter) and picks the scale (the op's default is 1/sqrt(D)).
inline cudaError_t FlexEstimateLaunch(DType dt, const void* q, const void* k, float* vertical,
                                      float* slash, float* estimate, void* workspace,
                                      size_t workspace_bytes, int64_t B, int64_t Nq, int64_t H,
                                      int64_t Hk, int64_t Nk, int64_t D, int64_t block_size,
                                      int64_t q_stride_b, int64_t q_stride_n, int64_t q_stride_h,
                                      int64_t k_stride_b, int64_t k_stride_n, int64_t k_stride_h,
                                      float scale, cudaStream_t stream) {
  return DispatchFloat(dt, [&](auto tag) {
    using T = typename decltype(tag)::type;
    return FlexEstimate<T>(static_cast<const T*>(q), static_cast<const T*>(k), vertical, slash,
                           estimate, workspace, workspace_bytes, B, Nq, H, Hk, Nk, D, block_size,
                           q_stride_b, q_stride_n, q_stride_h, k_stride_b, k_stride_n,
                           k_stride_h, scale, stream);
  });
}

inline cudaError_t FlexEstimatePagedLaunch(
    DType dt, const void* q, const void* k_cache, const int32_t* block_table,
    const int32_t* seq_lens_k, const int32_t* cu_seqlens_q, float* vertical, float* slash,
    float* estimate, void* workspace, size_t workspace_bytes, int64_t S, int64_t q_rows,
    int64_t H, int64_t Hk, int64_t D, int64_t num_pages, int64_t page_size, int64_t max_pages,
    int64_t block_size, int64_t q_stride_b, int64_t q_stride_n, int64_t q_stride_h,
    int64_t k_stride_p, int64_t k_stride_n, int64_t k_stride_h, float scale,
    cudaStream_t stream) {
  return DispatchFloat(dt, [&](auto tag) {
    using T = typename decltype(tag)::type;
    return FlexEstimatePaged<T>(static_cast<const T*>(q), static_cast<const T*>(k_cache),
                                block_table, seq_lens_k, cu_seqlens_q, vertical, slash, estimate,
                                workspace, workspace_bytes, S, q_rows, H, Hk, D, num_pages,
                                page_size, max_pages, block_size, q_stride_b, q_stride_n,
                                q_stride_h, k_stride_p, k_stride_n, k_stride_h, scale, stream);
  });
}

#ifdef TASKSIEVE_COMPILE_CHECK
#define TASKSIEVE_INSTANTIATE_FLEX_ESTIMATE(T)                                                 \
  template cudaError_t FlexEstimate<T>(const T*, const T*, float*, float*, float*, void*,      \
                                       size_t, int64_t, int64_t, int64_t, int64_t, int64_t,    \
                                       int64_t, int64_t, int64_t, int64_t, int64_t, int64_t,   \
                                       int64_t, int64_t, float, cudaStream_t);
TASKSIEVE_INSTANTIATE_FLEX_ESTIMATE(float)
TASKSIEVE_INSTANTIATE_FLEX_ESTIMATE(__half)
TASKSIEVE_INSTANTIATE_FLEX_ESTIMATE(__nv_bfloat16)
#undef TASKSIEVE_INSTANTIATE_FLEX_ESTIMATE
template cudaError_t FlexEstimatePaged<float>(
    const float*, const float*, const int32_t*, const int32_t*, const int32_t*, float*, float*,
    float*, void*, size_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t,
    int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, float, cudaStream_t);
#endif

}  // namespace tasksieve
