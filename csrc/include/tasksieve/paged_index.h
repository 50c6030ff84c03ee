// Paged-KV index math shared by the CPU ops (csrc/cpu/flexprefill_attention.cpp,
// flexprefill_estimate.cpp) and the CUDA kernels (block_sparse_attention.cuh,
// flex_estimate.cuh) of block_sparse_attention_paged and flex_estimate_paged. Torch-free,
// header-only; every function is TS_HOST_DEVICE (plain inline under g++).
//
// A paged KV cache holds num_pages pages of page_size token rows each ([num_pages, page_size,
// Hk, D] with free page / row / head strides). Sequence s owns the pages block_table[s, 0..]
// (int32 [S, max_pages], contiguous rows) in order: its key j lives in page
// block_table[s, j / page_size], row j % page_size. seq_lens_k[s] is its key count (context +
// this chunk); its queries are the LAST nq_s of those positions (query i at nk_s - nq_s + i).
//
//   int64_t kv_capacity(max_pages, page_size, num_pages)   keys a table row can address:
//                                                          max_pages * page_size, 0 without pages
//   int64_t pages_used(nk, page_size)                     ceil(nk / page_size)
//   int64_t page_of(j, page_size), row_in_page(j, page_size)
//   bool    page_id_valid(id, num_pages)                   0 <= id < num_pages
//   int64_t clamp_page_id(id, num_pages)                   into [0, num_pages - 1]
//   int64_t key_offset(table_row, j, page_size, num_pages, page_stride, row_stride)
//                                                          element offset of key j (page id
//                                                          clamped: in bounds for ANY contents)
//   SeqSpan seq_span(cu_q, seq_lens, s, q_rows, kv_cap)    {q_begin, nq, nk} of sequence s
//
// The CPU ops validate every value (seq_lens_k within the capacity, the used page ids, the
// query offsets, nq_s <= nk_s) and raise, so there the clamps change nothing. The CUDA ops
// cannot raise without a host sync: the clamps keep every read inside the tensors for any
// int32 contents (results for malformed values are unspecified but finite and in bounds).
#pragma once

#include <cstdint>

#include "tasksieve/common.h"

namespace tasksieve {
namespace paged {

TS_HOST_DEVICE TS_INLINE int64_t kv_capacity(int64_t max_pages, int64_t page_size,
                                             int64_t num_pages) {
  return (num_pages <= 0 || max_pages <= 0 || page_size <= 0) ? 0 : max_pages * page_size;
}

TS_HOST_DEVICE TS_INLINE int64_t pages_used(int64_t nk, int64_t page_size) {
  return nk <= 0 ? 0 : ceil_div(nk, page_size);
}

TS_HOST_DEVICE TS_INLINE int64_t page_of(int64_t j, int64_t page_size) { return j / page_size; }

TS_HOST_DEVICE TS_INLINE int64_t row_in_page(int64_t j, int64_t page_size) {
  return j % page_size;
}

TS_HOST_DEVICE TS_INLINE bool page_id_valid(int64_t id, int64_t num_pages) {
  return id >= 0 && id < num_pages;
}

// num_pages >= 1 (kv_capacity is 0 otherwise, so no key is ever looked up).
TS_HOST_DEVICE TS_INLINE int64_t clamp_page_id(int64_t id, int64_t num_pages) {
  return ts_clamp(id, int64_t{0}, num_pages - 1);
}

// Key j (0 <= j < kv_capacity) of the sequence whose table row is `table_row`: element offset
// from the cache's (head-adjusted) base, page_stride / row_stride = strides of dims 0 / 1.
TS_HOST_DEVICE TS_INLINE int64_t key_offset(const int32_t* table_row, int64_t j,
                                            int64_t page_size, int64_t num_pages,
                                            int64_t page_stride, int64_t row_stride) {
  const int64_t page = clamp_page_id(static_cast<int64_t>(table_row[page_of(j, page_size)]),
                                     num_pages);
  return page * page_stride + row_in_page(j, page_size) * row_stride;
}

struct SeqSpan {
  int64_t q_begin, nq, nk;  // query rows [q_begin, q_begin + nq) of its q rows, nk keys
};

// Sequence s. Dense queries (cu_q == nullptr): q [S, Nq, H, D], q_rows = Nq, its rows are the
// whole batch row s. Packed (cu_q int32 [S + 1]): q [1, total_q, H, D], q_rows = total_q, rows
// [cu_q[s], cu_q[s + 1]). nk = seq_lens[s] clamped into [0, kv_cap]; begin clamped into
// [0, q_rows], end into [begin, q_rows], and nq <= nk (so query positions nk - nq + i >= 0).
TS_HOST_DEVICE TS_INLINE SeqSpan seq_span(const int32_t* cu_q, const int32_t* seq_lens,
                                          int64_t s, int64_t q_rows, int64_t kv_cap) {
  const int64_t nk = ts_clamp(static_cast<int64_t>(seq_lens[s]), int64_t{0}, kv_cap);
  if (cu_q == nullptr) return {0, ts_min(q_rows, nk), nk};
  const int64_t qb = ts_clamp(static_cast<int64_t>(cu_q[s]), int64_t{0}, q_rows);
  const int64_t qe = ts_clamp(static_cast<int64_t>(cu_q[s + 1]), qb, q_rows);
  return {qb, ts_min(qe - qb, nk), nk};
}

}  // namespace paged
}  // namespace tasksieve
