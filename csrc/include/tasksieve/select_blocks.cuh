// FlexPrefill block selection (torch-free): the contract of tasksieve::select_blocks in
// csrc/ops.cpp, on the device, for every (b, h) at once.
//
//   SelectBlocks(vertical, slash, qa_map, is_qa, block_idx, block_cnt, BH, Nq, Nk, bs, gamma,
//                min_blocks, max_blocks, stream) -> cudaError_t
//
// vertical, slash: float32 [BH, nb] contiguous; qa_map: float32 [BH, nbq, nb] contiguous; is_qa:
// bool [BH]; block_idx: int32 [BH, nbq, nb]; block_cnt: int32 [BH, nbq]; nb = ceil(Nk / bs),
// nbq = ceil(Nq / bs).
//
// One thread block per (b, h). "The top n entries" of a line (vertical, slash or the causal
// entries of qa_map) are the entries whose ranking key (select_index.h: value desc, ties to the
// lower flat index) is >= a threshold key; the threshold is found by a 64-step bisection on the
// key bits, each step one block-wide reduction (sum in float64 and count of the entries at or
// above the candidate key). No sort, no workspace, no host sync. Tie rule: the float64 sums are
// reduced in a tree order (per-thread strided sums, warp xor butterflies, warps in order), the
// CPU op's in rank order; both give the same selection whenever those sums are exact (always for
// fp32 masses of similar magnitude: 24-bit significands in a 53-bit sum), exact ties with
// gamma * total included. Where the sums round, a line's count is the one the tree-order sums
// give, which can differ from the CPU op's by more than one (2^60 next to 255 ones, gamma 1:
// 130 vs 1; tests/sim/test_sim_flexprefill.py::test_select_blocks_rounding_tie_rule).
// NaN, -0 and negative entries count as 0 (flex::sel_value); a line whose entries all count as 0
// takes its first ranked entry, as the CPU op and the reference do.
// Rows are written by one warp each: ballot over 32 columns at a time gives the ascending
// compaction, then the row is padded with 0 up to nb.
#pragma once

#include <cuda_runtime.h>

#include <climits>
#include <cstdint>

#include "tasksieve/common.h"
#include "tasksieve/select_index.h"

namespace tasksieve {
namespace select_blocks_detail {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr uint64_t kNone = ~0ull;  // threshold that selects nothing (no key reaches it)

// A line of n ranked entries. Line kinds: a plain array of n values (vertical, slash), or the
// causal entries of an [nbq, nb] map (entry i = r*nb + c, valid iff c <= diag(r)).
struct Line {
  const float* x;
  int64_t n;      // flat entries
  int64_t nb;     // row length (map) or n (array)
  bool is_map;
  int64_t Nq, Nk, bs;
};

struct SumCount {
  double sum;
  unsigned long long cnt;
};

// Sum (float64) and count of the valid entries with key >= k, broadcast to every thread.
template <int kT>
__device__ SumCount AtOrAbove(const Line& L, uint64_t k, SumCount* red) {
  double s = 0.0;
  unsigned long long c = 0;
  if (!L.is_map) {
    for (int64_t i = threadIdx.x; i < L.n; i += kT) {
      const float v = L.x[i];
      if (flex::sel_key(v, i) >= k) s += static_cast<double>(flex::sel_value(v)), ++c;
    }
  } else {  // causal entries only: one warp per row, no per-entry division
    const int64_t rows = L.n / L.nb;
    for (int64_t r = threadIdx.x / 32; r < rows; r += kT / 32) {
      const int64_t d = flex::diag_block(r, L.Nq, L.Nk, L.bs);
      for (int64_t col = threadIdx.x % 32; col <= d; col += 32) {
        const int64_t i = r * L.nb + col;
        const float v = L.x[i];
        if (flex::sel_key(v, i) >= k) s += static_cast<double>(flex::sel_value(v)), ++c;
      }
    }
  }
#pragma unroll
  for (int off = 16; off > 0; off /= 2) {
    s += __shfl_xor_sync(0xffffffffu, s, off);
    c += __shfl_xor_sync(0xffffffffu, c, off);
  }
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  __syncthreads();  // red may still be read from the previous call
  if (lane == 0) red[warp] = SumCount{s, c};
  __syncthreads();
  SumCount out{0.0, 0};
  for (int w = 0; w < kT / 32; ++w) out.sum += red[w].sum, out.cnt += red[w].cnt;
  return out;
}

// Largest key k whose set {entries with key >= k} is NOT empty and has (by_mass ? sum : count)
// >= target; kNone when even k = 0 (all valid entries) falls short or target asks for nothing
// (count target 0). The set must be non-empty because a mass target can be 0 (a line whose
// values are all 0 after sel_value: 0 >= gamma * 0 holds for the empty set too); the CPU op and
// the reference then take the first ranked entry, and so does this (the key of that entry is
// the largest key with a non-empty set). The predicate is monotone in k (sel_value >= 0 and
// float64 addition is monotone), so the bisection finds the key of the n-th ranked entry.
template <int kT>
__device__ uint64_t Threshold(const Line& L, bool by_mass, double target, SumCount* red) {
  if (!by_mass && target <= 0.0) return kNone;
  const SumCount all = AtOrAbove<kT>(L, 0, red);
  if ((by_mass ? all.sum : static_cast<double>(all.cnt)) < target || all.cnt == 0) return kNone;
  uint64_t k = 0;
  for (int bit = 63; bit >= 0; --bit) {
    const uint64_t cand = k | (1ull << bit);
    const SumCount sc = AtOrAbove<kT>(L, cand, red);
    if (sc.cnt > 0 && (by_mass ? sc.sum : static_cast<double>(sc.cnt)) >= target) k = cand;
  }
  return k;
}

// Count threshold of a line: the top n entries, n = clamp(n_mass, lo, hi) (by_mass) or n = lo.
template <int kT>
__device__ uint64_t TopLines(const Line& L, bool by_mass, double gamma, int64_t lo, int64_t hi,
                             SumCount* red) {
  int64_t n = lo;
  if (by_mass) {
    const SumCount all = AtOrAbove<kT>(L, 0, red);
    const uint64_t km = Threshold<kT>(L, true, gamma * all.sum, red);
    const int64_t nm = km == kNone ? static_cast<int64_t>(all.cnt)
                                   : static_cast<int64_t>(AtOrAbove<kT>(L, km, red).cnt);
    n = ts_clamp<int64_t>(nm, lo, hi);
  }
  n = ts_min<int64_t>(n, L.n);
  return Threshold<kT>(L, false, static_cast<double>(n), red);
}

template <int kT>
__global__ void __launch_bounds__(kT)
    SelectBlocksKernel(const float* __restrict__ vertical, const float* __restrict__ slash,
                       const float* __restrict__ qa_map, const bool* __restrict__ is_qa,
                       int32_t* __restrict__ block_idx, int32_t* __restrict__ block_cnt,
                       int64_t nbq, int64_t nb, int64_t Nq, int64_t Nk, int64_t bs, double gamma,
                       int64_t min_blocks, int64_t max_blocks) {
  __shared__ SumCount red[kT / 32];
  const int64_t bh = blockIdx.x;
  const bool qa = is_qa[bh];
  const float* v = vertical + bh * nb;
  const float* s = slash + bh * nb;
  const float* m = qa_map + bh * nbq * nb;
  const Line Lv{v, nb, nb, false, Nq, Nk, bs};
  const Line Ls{s, nb, nb, false, Nq, Nk, bs};
  // Vertical-slash heads: top lines by mass, clamped; query-aware heads: a min_blocks skeleton.
  const uint64_t kv = TopLines<kT>(Lv, !qa, gamma, min_blocks, max_blocks, red);
  const uint64_t ks = TopLines<kT>(Ls, !qa, gamma, min_blocks, max_blocks, red);
  uint64_t km = kNone;
  if (qa) {
    const Line Lm{m, nbq * nb, nb, true, Nq, Nk, bs};
    const SumCount all = AtOrAbove<kT>(Lm, 0, red);
    km = Threshold<kT>(Lm, true, gamma * all.sum, red);
    if (km == kNone && all.cnt > 0) km = 0;  // unreachable (gamma <= 1): every causal entry
  }
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (int64_t r = warp; r < nbq; r += kT / 32) {
    const int64_t d = flex::diag_block(r, Nq, Nk, bs);
    int32_t* out = block_idx + (bh * nbq + r) * nb;
    int64_t cnt = 0;
    for (int64_t c0 = 0; c0 <= d; c0 += 32) {
      const int64_t c = c0 + lane;
      bool sel = false;
      if (c <= d) {
        sel = c == 0 || c == d || flex::sel_key(v[c], c) >= kv ||
              flex::sel_key(s[d - c], d - c) >= ks ||
              (qa && flex::sel_key(m[r * nb + c], r * nb + c) >= km);
      }
      const unsigned ball = __ballot_sync(0xffffffffu, sel);
      if (sel) out[cnt + __popc(ball & ((1u << lane) - 1u))] = static_cast<int32_t>(c);
      cnt += __popc(ball);
    }
    for (int64_t c = cnt + lane; c < nb; c += 32) out[c] = 0;
    if (lane == 0) block_cnt[bh * nbq + r] = static_cast<int32_t>(cnt);
  }
}

}  // namespace select_blocks_detail

// BH >= 0, 0 <= Nq <= Nk, bs >= 1, 0 < gamma <= 1, 0 <= min_blocks <= max_blocks. Entries are
// attention masses: NaN, -0 and negative entries count as 0 (flex::sel_value, shared with the
// CPU op; a host-side rejection would need a sync). One launch on `stream` (none when there is
// nothing to write).
template <typename T = float>
cudaError_t SelectBlocks(const T* vertical, const T* slash, const T* qa_map, const bool* is_qa,
                         int32_t* block_idx, int32_t* block_cnt, int64_t BH, int64_t Nq,
                         int64_t Nk, int64_t bs, double gamma, int64_t min_blocks,
                         int64_t max_blocks, cudaStream_t stream) {
  namespace d = select_blocks_detail;
  if (BH < 0 || Nq < 0 || Nk < Nq || bs < 1 || !(gamma > 0.0 && gamma <= 1.0) ||
      min_blocks < 0 || max_blocks < min_blocks)
    return cudaErrorInvalidValue;
  const int64_t nb = ceil_div<int64_t>(Nk, bs), nbq = ceil_div<int64_t>(Nq, bs);
  if (BH == 0 || nbq == 0) return cudaSuccess;
  if (BH > INT_MAX || nbq * nb > static_cast<int64_t>(UINT32_MAX)) return cudaErrorInvalidValue;
  d::SelectBlocksKernel<d::kThreads><<<static_cast<unsigned>(BH), d::kThreads, 0, stream>>>(
      vertical, slash, qa_map, is_qa, block_idx, block_cnt, nbq, nb, Nq, Nk, bs, gamma,
      min_blocks, max_blocks);
  return cudaGetLastError();
}

#ifdef TASKSIEVE_COMPILE_CHECK
template cudaError_t SelectBlocks<float>(const float*, const float*, const float*, const bool*,
                                         int32_t*, int32_t*, int64_t, int64_t, int64_t, int64_t,
                                         double, int64_t, int64_t, cudaStream_t);
#endif

}  // namespace tasksieve
