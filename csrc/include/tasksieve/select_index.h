// FlexPrefill block-selection index math shared by the CPU impl (csrc/cpu/flexprefill_select.cpp)
// and the CUDA kernel (select_blocks.cuh). Torch-free, header-only; every function is
// TS_HOST_DEVICE (plain inline under g++).
//
// Notation (fixed by the select_blocks contract in csrc/ops.cpp): Nq queries that are the LAST
// Nq of Nk positions (query i at position Nk - Nq + i), block size bs >= 1, nb = ceil(Nk / bs)
// key blocks, nbq = ceil(Nq / bs) query blocks; query block r = queries [r*bs, min((r+1)*bs, Nq)).
//
//   int64_t diag_block(r, Nq, Nk, bs)   key block of the LAST query of query block r:
//                                       (Nk - Nq + min((r+1)*bs, Nq) - 1) / bs; the rightmost
//                                       causal key block of row r ("its diagonal block")
//   float    sel_value(float x)         the value an entry is ranked and summed by: x if x > 0,
//                                       else +0 (NaN, -0 and negative entries count as 0, so the
//                                       masses are >= 0 and the CUDA bisection stays monotone)
//   uint32_t sel_order_bits(float x)    monotone map of sel_value(x) -> uint32 (a < b iff
//                                       bits(a) < bits(b) for a, b >= 0)
//   uint64_t sel_key(float x, int64_t i) ranking key of entry i (flat index < 2^32) with value x:
//                                       larger key = ranked first; higher value first, ties to the
//                                       lower index
#pragma once

#include <cstdint>

#include "tasksieve/common.h"

namespace tasksieve {
namespace flex {

TS_HOST_DEVICE TS_INLINE int64_t diag_block(int64_t r, int64_t Nq, int64_t Nk, int64_t bs) {
  const int64_t e = (r + 1) * bs;
  const int64_t last = Nk - Nq + (e < Nq ? e : Nq) - 1;
  return last < 0 ? -1 : last / bs;
}

TS_HOST_DEVICE TS_INLINE float sel_value(float x) { return x > 0.f ? x : 0.f; }

TS_HOST_DEVICE TS_INLINE uint32_t sel_order_bits(float x) {
  union {
    float f;
    uint32_t u;
  } v;
  v.f = sel_value(x);
  return (v.u & 0x80000000u) ? ~v.u : (v.u | 0x80000000u);
}

TS_HOST_DEVICE TS_INLINE uint64_t sel_key(float x, int64_t i) {
  return (static_cast<uint64_t>(sel_order_bits(x)) << 32) |
         static_cast<uint64_t>(0xFFFFFFFFu - static_cast<uint32_t>(i));
}

}  // namespace flex
}  // namespace tasksieve
