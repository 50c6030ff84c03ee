// Key/value row sources of the attention-style kernels (torch-free): where row j of the keys (or
// values) of one (sequence, KV head) lives. The kernels load their tiles through one of these,
// so the same kernel body reads contiguous K/V or a paged KV cache.
//
//   ContigRows<T>{base, stride}(j)  = base + j * stride            (a [N, ..., D] tensor's rows)
//   PagedRows<T>{base, table, page_size, num_pages, page_stride, row_stride}(j)
//                                   = base + paged::key_offset(table, j, ...)
//     base: the cache [num_pages, page_size, Hk, D] already offset to the KV head; table: the
//     sequence's row of the block table. Page ids are clamped into the cache (paged_index.h),
//     so any table contents stay in bounds.
//
// Header-only structs with inline members: safe to include from several translation units.
#pragma once

#include <cstdint>

#include "tasksieve/common.h"
#include "tasksieve/paged_index.h"

namespace tasksieve {

template <typename T>
struct ContigRows {
  const T* base;
  int64_t stride;
  TS_HOST_DEVICE TS_INLINE const T* operator()(int64_t j) const { return base + j * stride; }
};

template <typename T>
struct PagedRows {
  const T* base;
  const int32_t* table;
  int64_t page_size, num_pages, page_stride, row_stride;
  TS_HOST_DEVICE TS_INLINE const T* operator()(int64_t j) const {
    return base + paged::key_offset(table, j, page_size, num_pages, page_stride, row_stride);
  }
};

// The paged cache arguments of a launch (block_table rows are max_pages apart).
struct PagedKV {
  const int32_t* block_table = nullptr;
  const int32_t* seq_lens = nullptr;
  int64_t max_pages = 0, page_size = 1, num_pages = 0;
  int64_t k_page_stride = 0, v_page_stride = 0;
  TS_HOST_DEVICE TS_INLINE int64_t kv_cap() const {
    return paged::kv_capacity(max_pages, page_size, num_pages);
  }
};

}  // namespace tasksieve
