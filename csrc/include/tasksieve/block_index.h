// Block-sparse attention index math shared by the CPU impl (csrc/cpu/flexprefill_attention.cpp)
// and the CUDA kernel (block_sparse_attention.cuh). Torch-free, header-only; every function is
// TS_HOST_DEVICE (plain inline under g++).
//
// Notation: Nq queries, Nk >= Nq keys, block size bs. Queries are the LAST Nq positions: query i
// sits at position Nk - Nq + i. Query block r = queries [r*bs, min((r+1)*bs, Nq)); key block c =
// keys [c*bs, min((c+1)*bs, Nk)).
//
//   int64_t num_blocks(int64_t n, int64_t bs)                       ceil(n / bs)
//   int64_t block_begin(int64_t blk, int64_t bs)                    blk * bs
//   int64_t block_end(int64_t blk, int64_t bs, int64_t n)           min((blk + 1) * bs, n)
//   int64_t query_position(int64_t i, int64_t Nq, int64_t Nk)       Nk - Nq + i
//   int64_t query_key_end(int64_t i, int64_t Nq, int64_t Nk, bool causal)
//                                                   one past the last key query i sees
//   BlockVisibility tile_visibility(q0, q1, k0, k1, Nq, Nk, causal)
//                                                   for queries [q0, q1) x keys [k0, k1):
//                                                   kSkip (no key visible to any query),
//                                                   kFull (every key visible to every query),
//                                                   kPartial (needs the per-element mask)
//   bool    block_column_valid(int64_t c, int64_t nbk)              0 <= c < nbk
//   int64_t clamp_block_count(int64_t cnt, int64_t max_k)           clamp into [0, max_k]
//
// Packed varlen (flash-attn cu_seqlens): S sequences packed along the token dim; sequence s owns
// query rows [cu_q[s], cu_q[s+1]) of the total_q packed queries and key rows [cu_k[s], cu_k[s+1])
// of the total_k packed keys, and is a dense problem of its own (Nq = nq, Nk = nk above, key
// block columns relative to its first key).
//   SeqSpan seq_span(cu_q, cu_k, s, total_q, total_k)             {q_begin, nq, k_begin, nk}
//                                                   clamped: in bounds for ANY int32 contents
#pragma once

#include <cstdint>

#include "tasksieve/common.h"

namespace tasksieve {
namespace block {

enum BlockVisibility : int { kSkip = 0, kFull = 1, kPartial = 2 };

TS_HOST_DEVICE TS_INLINE int64_t num_blocks(int64_t n, int64_t bs) {
  return n <= 0 ? 0 : ceil_div(n, bs);
}

TS_HOST_DEVICE TS_INLINE int64_t block_begin(int64_t blk, int64_t bs) { return blk * bs; }

TS_HOST_DEVICE TS_INLINE int64_t block_end(int64_t blk, int64_t bs, int64_t n) {
  return ts_min((blk + 1) * bs, n);
}

TS_HOST_DEVICE TS_INLINE int64_t query_position(int64_t i, int64_t Nq, int64_t Nk) {
  return Nk - Nq + i;
}

TS_HOST_DEVICE TS_INLINE int64_t query_key_end(int64_t i, int64_t Nq, int64_t Nk, bool causal) {
  return causal ? ts_min(query_position(i, Nq, Nk) + 1, Nk) : Nk;
}

// Queries [q0, q1) (q0 < q1) against keys [k0, k1) (k0 < k1).
TS_HOST_DEVICE TS_INLINE BlockVisibility tile_visibility(int64_t q0, int64_t q1, int64_t k0,
                                                         int64_t k1, int64_t Nq, int64_t Nk,
                                                         bool causal) {
  if (!causal) return kFull;
  if (k0 >= query_key_end(q1 - 1, Nq, Nk, true)) return kSkip;     // above the diagonal
  if (k1 <= query_key_end(q0, Nq, Nk, true)) return kFull;         // below the diagonal
  return kPartial;                                                  // straddles it
}

TS_HOST_DEVICE TS_INLINE bool block_column_valid(int64_t c, int64_t nbk) {
  return c >= 0 && c < nbk;
}

TS_HOST_DEVICE TS_INLINE int64_t clamp_block_count(int64_t cnt, int64_t max_k) {
  return ts_clamp(cnt, int64_t{0}, max_k);
}

struct SeqSpan {
  int64_t q_begin, nq, k_begin, nk;
};

// cu_q, cu_k hold S + 1 entries; s < S. The CPU op validates cu_seqlens fully, so there the
// clamps change nothing; the CUDA kernel cannot raise without a host sync, so for malformed
// offsets the clamps keep every row it touches inside [0, total): begins into [0, total], ends
// into [begin, total], and nq <= nk so that query positions k_begin + nk - nq + i stay inside
// the sequence's keys.
TS_HOST_DEVICE TS_INLINE SeqSpan seq_span(const int32_t* cu_q, const int32_t* cu_k, int64_t s,
                                          int64_t total_q, int64_t total_k) {
  const int64_t qb = ts_clamp(static_cast<int64_t>(cu_q[s]), int64_t{0}, total_q);
  const int64_t qe = ts_clamp(static_cast<int64_t>(cu_q[s + 1]), qb, total_q);
  const int64_t kb = ts_clamp(static_cast<int64_t>(cu_k[s]), int64_t{0}, total_k);
  const int64_t ke = ts_clamp(static_cast<int64_t>(cu_k[s + 1]), kb, total_k);
  return {qb, ts_min(qe - qb, ke - kb), kb, ke - kb};
}

}  // namespace block
}  // namespace tasksieve
