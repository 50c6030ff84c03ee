// FlexPrefill index math shared by the CPU impl (csrc/cpu/flexprefill_estimate.cpp) and the
// CUDA kernels (flex_estimate.cuh, js_divergence.cuh). Torch-free, header-only; every function
// is TS_HOST_DEVICE (plain inline under g++).
//
// Notation (fixed by the op contracts in csrc/ops.cpp): Nq queries that are the LAST Nq of Nk
// positions (query i at position Nk - Nq + i), block size bs >= 1, nb = ceil(Nk / bs) key
// blocks, m = min(bs, Nq) representative queries = the last m queries; representative query r
// (0 <= r < m) is query Nq - m + r and sits at position Nk - m + r.
//
//   int64_t num_blocks(int64_t Nk, int64_t bs)              nb = ceil(Nk / bs); 0 when Nk == 0
//   int64_t num_rep_queries(int64_t Nq, int64_t bs)         m = min(bs, Nq)
//   int64_t rep_query_index(int64_t Nq, int64_t m, int64_t r)  Nq - m + r (row of q)
//   int64_t rep_query_pos(int64_t Nk, int64_t m, int64_t r)    Nk - m + r (its position)
//   int64_t block_begin(int64_t c, int64_t bs)              first key of block c
//   int64_t block_end(int64_t c, int64_t Nk, int64_t bs)    one past its last key (<= Nk)
//   int64_t key_block(int64_t j, int64_t bs)                block of key j
//   int64_t slash_block(int64_t pos, int64_t j, int64_t bs) (pos - j) / bs; -1 when j > pos
//   int64_t slash_key_begin(int64_t pos, int64_t t, int64_t bs)  keys of offset block t for a
//   int64_t slash_key_end(int64_t pos, int64_t t, int64_t bs)    query at pos: [begin, end)
//   float   js_normalize(float x, float row_sum, int64_t n)  x / row_sum; 1/n if row_sum == 0
//   float   js_clamp(float x, float eps)                    max(x, eps), NaN propagates
//   float   js_term(float p, float q)                       p log(p/m) + q log(q/m), m=(p+q)/2
//   float   js_finish(float twice_d2)                       sqrt(max(0, twice_d2 / 2))
#pragma once

#include <cmath>
#include <cstdint>

#include "tasksieve/common.h"

namespace tasksieve {
namespace flex {

// ---- sizes --------------------------------------------------------------------------------

TS_HOST_DEVICE TS_INLINE int64_t num_blocks(int64_t Nk, int64_t bs) {
  return (Nk <= 0 || bs < 1) ? 0 : (Nk + bs - 1) / bs;
}

TS_HOST_DEVICE TS_INLINE int64_t num_rep_queries(int64_t Nq, int64_t bs) {
  return Nq < 0 ? 0 : (Nq < bs ? Nq : bs);
}

TS_HOST_DEVICE TS_INLINE int64_t rep_query_index(int64_t Nq, int64_t m, int64_t r) {
  return Nq - m + r;
}

TS_HOST_DEVICE TS_INLINE int64_t rep_query_pos(int64_t Nk, int64_t m, int64_t r) {
  return Nk - m + r;
}

// ---- key blocks (vertical) ----------------------------------------------------------------

TS_HOST_DEVICE TS_INLINE int64_t block_begin(int64_t c, int64_t bs) { return c * bs; }

TS_HOST_DEVICE TS_INLINE int64_t block_end(int64_t c, int64_t Nk, int64_t bs) {
  const int64_t e = (c + 1) * bs;
  return e < Nk ? e : Nk;
}

TS_HOST_DEVICE TS_INLINE int64_t key_block(int64_t j, int64_t bs) { return j / bs; }

// ---- diagonal offset blocks (slash) -------------------------------------------------------
// Offset delta = pos - j >= 0 for a visible key; offset block t = delta / bs, t = 0 holds the
// main block diagonal (delta in [0, bs)). Offset-first indexing (the official code stores it
// reversed, index nb - 1 = main diagonal).

TS_HOST_DEVICE TS_INLINE int64_t slash_block(int64_t pos, int64_t j, int64_t bs) {
  return j > pos ? -1 : (pos - j) / bs;
}

// The keys j with slash_block(pos, j, bs) == t are [slash_key_begin, slash_key_end), clipped
// to j >= 0 (empty when begin >= end).
TS_HOST_DEVICE TS_INLINE int64_t slash_key_begin(int64_t pos, int64_t t, int64_t bs) {
  const int64_t b = pos - (t + 1) * bs + 1;
  return b > 0 ? b : 0;
}

TS_HOST_DEVICE TS_INLINE int64_t slash_key_end(int64_t pos, int64_t t, int64_t bs) {
  const int64_t e = pos - t * bs + 1;
  return e > 0 ? e : 0;
}

// ---- Jensen-Shannon divergence ------------------------------------------------------------
// Per row of n entries: p_i = js_normalize(x_i, sum x, n); then p_i = js_clamp(p_i, eps) /
// sum_k js_clamp(p_k, eps) (likewise q); D = js_finish(sum_i js_term(p_i, q_i)).

// A row summing to 0 (fully masked) is uniform; a negative or NaN row sum gives NaN.
TS_HOST_DEVICE TS_INLINE float js_normalize(float x, float row_sum, int64_t n) {
  if (row_sum > 0.f) return x / row_sum;
  if (row_sum == 0.f) return 1.f / static_cast<float>(n);
  return __builtin_nanf("");
}

TS_HOST_DEVICE TS_INLINE float js_clamp(float x, float eps) { return x < eps ? eps : x; }

// p log(p / m) + q log(q / m) with m = (p + q) / 2, for p, q > 0 (after js_clamp).
TS_HOST_DEVICE TS_INLINE float js_term(float p, float q) {
  const float m = 0.5f * (p + q);
  return p * logf(p / m) + q * logf(q / m);
}

TS_HOST_DEVICE TS_INLINE float js_finish(float twice_d2) {
  const float d2 = 0.5f * twice_d2;
  return d2 > 0.f ? sqrtf(d2) : (d2 == d2 ? 0.f : d2);  // NaN propagates
}

}  // namespace flex
}  // namespace tasksieve
