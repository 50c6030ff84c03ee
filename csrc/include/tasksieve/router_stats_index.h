// router_stats_update index math shared by the CPU impl (csrc/cpu/router_stats.cpp) and the CUDA
// kernels (router_stats.cuh). Torch-free, header-only; every function is TS_HOST_DEVICE (plain
// inline under g++). Contract: router_stats_update in csrc/ops.cpp.
//
// The CUDA kernel cuts the Tn tokens into `chunks` contiguous chunks of `chunk_len` tokens (the
// last one shorter), sums each chunk into its own fp64 slice of a workspace, then adds the
// slices to the accumulators in chunk order: deterministic, no floating-point atomics.
//   int64_t rs_slice_elems(E)              doubles per chunk slice: gram [E*E], coselect [E*E],
//                                          logit_sum [E], counts [E], in that order
//   int64_t rs_max_chunks(E)               most chunks whose slices fit kRsWorkspaceBudget (>= 1)
//   int64_t rs_chunk_len(Tn, E)            tokens per chunk: ceil(Tn / min(Tn / kRsMinChunkTokens,
//                                          rs_max_chunks(E))), so >= kRsMinChunkTokens unless Tn
//                                          is smaller (then Tn: one chunk); 0 for Tn = 0
//   int64_t rs_num_chunks(Tn, E)           ceil(Tn / chunk_len): every chunk holds >= 1 token
//   int64_t rs_chunk_begin(c, Tn, E)       first token of chunk c; rs_chunk_end: one past its last
//   size_t  rs_workspace_bytes(Tn, E)      rs_num_chunks * rs_slice_elems * sizeof(double)
//   bool    rs_id_valid(id, E)             0 <= id < E: the ids the op counts (the CPU op raises
//                                          on any other; the CUDA kernel skips them)
//   int64_t rs_gram_off / rs_cosel_off / rs_sum_off / rs_count_off (E)
//                                          offsets of the four parts inside a slice
#pragma once

#include <cstddef>
#include <cstdint>

#include "tasksieve/common.h"

namespace tasksieve {
namespace moe {

// Token chunks of at least this many tokens (a chunk's work is 32 tokens per tile pass).
constexpr int64_t kRsMinChunkTokens = 64;
// At most this many chunks, whatever E.
constexpr int64_t kRsMaxChunks = 128;
// The workspace of all chunk slices stays below this many bytes (one chunk if a slice alone is
// larger: E > ~1400).
constexpr int64_t kRsWorkspaceBudget = int64_t{32} << 20;

TS_HOST_DEVICE TS_INLINE int64_t rs_slice_elems(int64_t E) { return 2 * E * E + 2 * E; }

TS_HOST_DEVICE TS_INLINE int64_t rs_gram_off(int64_t /*E*/) { return 0; }
TS_HOST_DEVICE TS_INLINE int64_t rs_cosel_off(int64_t E) { return E * E; }
TS_HOST_DEVICE TS_INLINE int64_t rs_sum_off(int64_t E) { return 2 * E * E; }
TS_HOST_DEVICE TS_INLINE int64_t rs_count_off(int64_t E) { return 2 * E * E + E; }

TS_HOST_DEVICE TS_INLINE int64_t rs_max_chunks(int64_t E) {
  const int64_t slice_bytes = rs_slice_elems(E) * static_cast<int64_t>(sizeof(double));
  const int64_t fit = kRsWorkspaceBudget / (slice_bytes > 0 ? slice_bytes : 1);
  return ts_clamp<int64_t>(fit, 1, kRsMaxChunks);
}

TS_HOST_DEVICE TS_INLINE int64_t rs_chunk_len(int64_t Tn, int64_t E) {
  if (Tn <= 0) return 0;
  // floor, not ceil: every chunk then holds at least kRsMinChunkTokens tokens (or all Tn)
  const int64_t want =
      ts_clamp<int64_t>(Tn / kRsMinChunkTokens, 1, rs_max_chunks(E));
  return ceil_div<int64_t>(Tn, want);
}

TS_HOST_DEVICE TS_INLINE int64_t rs_num_chunks(int64_t Tn, int64_t E) {
  const int64_t len = rs_chunk_len(Tn, E);
  return len > 0 ? ceil_div<int64_t>(Tn, len) : 0;
}

TS_HOST_DEVICE TS_INLINE int64_t rs_chunk_begin(int64_t c, int64_t Tn, int64_t E) {
  return ts_min<int64_t>(c * rs_chunk_len(Tn, E), Tn);
}

TS_HOST_DEVICE TS_INLINE int64_t rs_chunk_end(int64_t c, int64_t Tn, int64_t E) {
  return rs_chunk_begin(c + 1, Tn, E);
}

TS_HOST_DEVICE TS_INLINE size_t rs_workspace_bytes(int64_t Tn, int64_t E) {
  return static_cast<size_t>(rs_num_chunks(Tn, E) * rs_slice_elems(E)) * sizeof(double);
}

TS_HOST_DEVICE TS_INLINE bool rs_id_valid(int64_t id, int64_t E) { return id >= 0 && id < E; }

}  // namespace moe
}  // namespace tasksieve
