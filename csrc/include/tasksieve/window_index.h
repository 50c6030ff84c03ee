// WindowKV index math shared by the CPU impl (csrc/cpu/kv_window.cpp) and the CUDA kernels
// (window_scores.cuh, select_windows.cuh, gather_windows.cuh). Torch-free, header-only; every
// function is TS_HOST_DEVICE (plain inline under g++). The API below is stable: do not rename.
//
// Notation: N tokens, A observation queries (the last A positions), window w >= 1,
// nw = (N - A) // w windows in the review region [0, nw*w), kt = max(1, w // 2).
//
//   int64_t num_windows(int64_t N, int64_t A, int64_t window)       nw; 0 when N - A < window
//   int64_t topk_count(int64_t window)                               kt = max(1, window / 2)
//   int64_t review_len(int64_t N, int64_t A, int64_t window)         R = nw * window
//   int64_t clamp_kv_start(int64_t kv_start, int64_t N, int64_t A)   clamp into [0, N - A]
//   int64_t query_key_begin(int64_t kv_start)                        first key query i sees
//   int64_t query_key_end(int64_t N, int64_t A, int64_t i)           one past its last key
//   bool    key_visible(int64_t j, int64_t i, int64_t N, int64_t A, int64_t kv_start)
//   int64_t gathered_len(int64_t keep, int64_t window, int64_t tail) keep * window + tail
//   bool    window_index_valid(int64_t v, int64_t window, int64_t N, int64_t tail)
//   int64_t gather_source_row(int64_t r, const int32_t* idx_row, int64_t keep,
//                             int64_t window, int64_t N, int64_t tail)    -1 when invalid
//   bool    rank_before(float a, int64_t ia, float b, int64_t ib)    select order (see below)
//   uint64_t rank_key(float score, int64_t index)   rank_before(a,ia,b,ib) == key(a,ia) < key(b,ib)
//   float   window_reduce(const float* s, int64_t window, bool reduce_max)
//   float   shared_score(const float* col, int64_t stride, int64_t Hk)    mean over heads
//
// Conventions (fixed by the op contracts in csrc/ops.cpp):
// - Query i (0 <= i < A) sits at position N - A + i and sees keys kv_start <= j <= N - A + i.
//   kv_start is clamped into [0, N - A] so every query sees at least one key (the CUDA path
//   cannot validate device values without a sync; the CPU path checks and raises).
// - Ranking for select_windows: higher score first, ties -> lower window index, NaN as -inf.
// - window_reduce("max") sums the top kt scores in rank order (descending) and divides by kt;
//   ("mean") sums in index order and divides by window. Any window size works: the top-kt
//   walk is O(window * kt) with O(1) memory (no local arrays, so nothing spills on device).
#pragma once

#include <cstdint>

#include "tasksieve/common.h"

namespace tasksieve {
namespace window {

// ---- sizes ------------------------------------------------------------------------------

// nw = (N - A) // window: whole windows only; the remainder joins the always-kept tail.
TS_HOST_DEVICE TS_INLINE int64_t num_windows(int64_t N, int64_t A, int64_t window) {
  if (window < 1 || N - A < window) return 0;
  return (N - A) / window;
}

// kt = max(1, window // 2): number of top token scores averaged by reduce="max".
TS_HOST_DEVICE TS_INLINE int64_t topk_count(int64_t window) {
  return window / 2 > 1 ? window / 2 : 1;
}

// R = nw * window: tokens [0, R) are scored; tokens [R, N) are always kept.
TS_HOST_DEVICE TS_INLINE int64_t review_len(int64_t N, int64_t A, int64_t window) {
  return num_windows(N, A, window) * window;
}

// Length of a compacted sequence.
TS_HOST_DEVICE TS_INLINE int64_t gathered_len(int64_t keep, int64_t window, int64_t tail) {
  return keep * window + tail;
}

// ---- causal key range of an observation query ------------------------------------------

TS_HOST_DEVICE TS_INLINE int64_t clamp_kv_start(int64_t kv_start, int64_t N, int64_t A) {
  return ts_clamp<int64_t>(kv_start, 0, N - A > 0 ? N - A : 0);
}

// Query i sees keys [query_key_begin(kv_start), query_key_end(N, A, i)).
TS_HOST_DEVICE TS_INLINE int64_t query_key_begin(int64_t kv_start) { return kv_start; }

TS_HOST_DEVICE TS_INLINE int64_t query_key_end(int64_t N, int64_t A, int64_t i) {
  return N - A + i + 1;
}

TS_HOST_DEVICE TS_INLINE bool key_visible(int64_t j, int64_t i, int64_t N, int64_t A,
                                          int64_t kv_start) {
  return j >= query_key_begin(kv_start) && j < query_key_end(N, A, i);
}

// ---- gather -------------------------------------------------------------------------------

// Window v may be gathered iff its tokens [v*window, v*window + window) lie before the tail.
TS_HOST_DEVICE TS_INLINE bool window_index_valid(int64_t v, int64_t window, int64_t N,
                                                 int64_t tail) {
  return v >= 0 && window >= 1 && v <= (N - tail) / window - 1;  // == v*window+window <= N-tail
}

// Source token of output row r of a compacted sequence of keep*window + tail rows:
//   r <  keep*window: token idx_row[r / window] * window + r % window   (-1 if that window is
//                     invalid, so the caller writes zeros / raises)
//   r >= keep*window: token N - tail + (r - keep*window)
// -1 as well when r is outside [0, keep*window + tail) or window < 1.
TS_HOST_DEVICE TS_INLINE int64_t gather_source_row(int64_t r, const int32_t* idx_row,
                                                   int64_t keep, int64_t window, int64_t N,
                                                   int64_t tail) {
  if (window < 1 || r < 0) return -1;
  const int64_t body = keep * window;
  if (r < body) {
    const int64_t v = idx_row[r / window];
    return window_index_valid(v, window, N, tail) ? v * window + r % window : -1;
  }
  const int64_t t = r - body;
  return t < tail ? N - tail + t : -1;
}

// ---- ranking ------------------------------------------------------------------------------

// True iff (a, ia) ranks strictly ahead of (b, ib): higher score first, NaN counts as -inf,
// equal scores -> lower index first. A strict total order on distinct indices.
TS_HOST_DEVICE TS_INLINE bool rank_before(float a, int64_t ia, float b, int64_t ib) {
  a = ts_nan_to_neg_inf(a);
  b = ts_nan_to_neg_inf(b);
  return a > b || (a == b && ia < ib);
}

// 64-bit key with the same order as rank_before: rank_before(a, ia, b, ib) iff
// rank_key(a, ia) < rank_key(b, ib), for 0 <= index < 2^32. High 32 bits: the score mapped to an
// unsigned integer that decreases as the score increases (NaN -> -inf, -0 -> +0 so that equal
// scores give equal bits); low 32 bits: the index. Used by the device radix select.
TS_HOST_DEVICE TS_INLINE uint64_t rank_key(float score, int64_t index) {
  float f = ts_nan_to_neg_inf(score);
  if (f == 0.f) f = 0.f;  // canonical +0
  uint32_t u;
  __builtin_memcpy(&u, &f, sizeof(u));
  // Ascending-order map of IEEE floats: flip all bits of negatives, the sign bit of positives.
  u = (u & 0x80000000u) ? ~u : (u | 0x80000000u);
  return (static_cast<uint64_t>(~u) << 32) | static_cast<uint32_t>(index);
}

// ---- window reduce ------------------------------------------------------------------------

// Score of one window from its `window` token scores s[0..window):
//   reduce_max: (sum of the kt largest s, taken in rank order) / kt, kt = topk_count(window)
//   else:       (sum of s in index order) / window
// The top-kt walk picks, kt times, the best element ranked strictly after the previous pick
// (rank_before order), so it needs no scratch memory and handles ties and NaN exactly like
// select_windows. A NaN token score is ranked as -inf but still added (the result is NaN).
TS_HOST_DEVICE TS_INLINE float window_reduce(const float* s, int64_t window, bool reduce_max) {
  if (window < 1) return 0.f;
  float sum = 0.f;
  if (!reduce_max) {
    for (int64_t t = 0; t < window; ++t) sum += s[t];
    return sum / static_cast<float>(window);
  }
  const int64_t kt = topk_count(window);
  int64_t prev = -1;  // index of the previous pick; -1 = none yet
  for (int64_t r = 0; r < kt; ++r) {
    int64_t best = -1;
    for (int64_t t = 0; t < window; ++t) {
      if (prev >= 0 && !rank_before(s[prev], prev, s[t], t)) continue;  // not after prev
      if (best < 0 || rank_before(s[t], t, s[best], best)) best = t;
    }
    sum += s[best];  // best >= 0: kt <= window, so an element after prev always exists
    prev = best;
  }
  return sum / static_cast<float>(kt);
}

// Shared ranking score of a window for select_windows(share=True): the mean over the Hk heads
// of col[h * stride], summed in head order (CPU and CUDA use this to break ties identically).
TS_HOST_DEVICE TS_INLINE float shared_score(const float* col, int64_t stride, int64_t Hk) {
  float sum = 0.f;
  for (int64_t h = 0; h < Hk; ++h) sum += col[h * stride];
  return Hk > 0 ? sum / static_cast<float>(Hk) : 0.f;
}

}  // namespace window
}  // namespace tasksieve
