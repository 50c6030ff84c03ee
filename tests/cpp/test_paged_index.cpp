// Unit tests of the paged-KV index math (csrc/include/tasksieve/paged_index.h), host only.
// Built and run by CMake/ctest (no torch, no GPU). Each helper is checked against a brute force
// written from the block_sparse_attention_paged / flex_estimate_paged contract in csrc/ops.cpp.
#include <cstdint>
#include <cstdio>
#include <initializer_list>
#include <vector>

#include "tasksieve/paged_index.h"
#include "check.h"

namespace pg = tasksieve::paged;

static void TestSizes() {
  CHECK_EQ(pg::kv_capacity(4, 16, 10), 64);
  CHECK_EQ(pg::kv_capacity(4, 16, 0), 0);  // no pages: nothing addressable
  CHECK_EQ(pg::kv_capacity(0, 16, 3), 0);
  CHECK_EQ(pg::pages_used(0, 16), 0);
  CHECK_EQ(pg::pages_used(1, 16), 1);
  CHECK_EQ(pg::pages_used(16, 16), 1);
  CHECK_EQ(pg::pages_used(17, 16), 2);
  CHECK_EQ(pg::pages_used(7, 1), 7);
  CHECK_EQ(pg::page_of(47, 16), 2);
  CHECK_EQ(pg::row_in_page(47, 16), 15);
  CHECK_EQ(pg::page_of(5, 3), 1);
  CHECK_EQ(pg::row_in_page(5, 3), 2);
  CHECK(pg::page_id_valid(0, 3));
  CHECK(pg::page_id_valid(2, 3));
  CHECK(!pg::page_id_valid(3, 3));
  CHECK(!pg::page_id_valid(-1, 3));
  CHECK_EQ(pg::clamp_page_id(-5, 3), 0);
  CHECK_EQ(pg::clamp_page_id(9, 3), 2);
  CHECK_EQ(pg::clamp_page_id(1, 3), 1);
}

// key_offset against a brute force walk of a gathered sequence: key j is row j % ps of page
// table[j / ps], for every page size and both cache layouts' strides.
static void TestKeyOffsetBruteForce() {
  const int32_t table[] = {5, 0, 3, 7, 1, 6};
  const int64_t num_pages = 8;
  for (int64_t ps : {1, 3, 16}) {
    // flash-attn [2, pages, ps, Hk, D] (k = cache[0]): page stride ps*Hk*D, row stride Hk*D;
    // cpu_attn [pages, Hk, 2*ps, D] permuted: page stride Hk*2*ps*D, row stride D.
    for (int layout = 0; layout < 2; ++layout) {
      const int64_t Hk = 2, D = 4;
      const int64_t sp = layout == 0 ? ps * Hk * D : Hk * 2 * ps * D;
      const int64_t sn = layout == 0 ? Hk * D : D;
      int64_t j = 0;
      for (int64_t p = 0; p < 6; ++p) {
        for (int64_t r = 0; r < ps; ++r, ++j) {
          CHECK_EQ(pg::key_offset(table, j, ps, num_pages, sp, sn), table[p] * sp + r * sn);
        }
      }
    }
  }
  // out-of-range ids are clamped into the cache
  const int32_t bad[] = {-3, 100};
  CHECK_EQ(pg::key_offset(bad, 0, 4, num_pages, 10, 1), 0);
  CHECK_EQ(pg::key_offset(bad, 5, 4, num_pages, 10, 1), 7 * 10 + 1);
}

static void TestSeqSpan() {
  const int32_t lens[] = {40, 0, 7, -3, 1000};
  // dense: every sequence's rows are its whole batch row, nq = min(Nq, nk)
  pg::SeqSpan a = pg::seq_span(nullptr, lens, 0, 10, 64);
  CHECK_EQ(a.q_begin, 0);
  CHECK_EQ(a.nq, 10);
  CHECK_EQ(a.nk, 40);
  a = pg::seq_span(nullptr, lens, 2, 10, 64);
  CHECK_EQ(a.nq, 7);  // malformed: Nq > nk (the CPU op raises), clamped
  CHECK_EQ(a.nk, 7);
  a = pg::seq_span(nullptr, lens, 3, 10, 64);
  CHECK_EQ(a.nk, 0);
  CHECK_EQ(a.nq, 0);
  a = pg::seq_span(nullptr, lens, 4, 10, 64);
  CHECK_EQ(a.nk, 64);  // capped at the table's capacity
  // packed
  const int32_t cu[] = {0, 5, 5, 12, 12, 20};
  a = pg::seq_span(cu, lens, 0, 20, 64);
  CHECK_EQ(a.q_begin, 0);
  CHECK_EQ(a.nq, 5);
  CHECK_EQ(a.nk, 40);
  a = pg::seq_span(cu, lens, 1, 20, 64);
  CHECK_EQ(a.q_begin, 5);
  CHECK_EQ(a.nq, 0);
  a = pg::seq_span(cu, lens, 2, 20, 64);
  CHECK_EQ(a.q_begin, 5);
  CHECK_EQ(a.nq, 7);
  CHECK_EQ(a.nk, 7);
  a = pg::seq_span(cu, lens, 4, 20, 64);
  CHECK_EQ(a.q_begin, 12);
  CHECK_EQ(a.nq, 8);
  // malformed offsets: everything inside [0, q_rows], nq <= nk
  const int32_t weird[] = {-9, 1000000, 3, -1};
  const int32_t lens2[] = {10, 10, 10};
  for (int64_t s = 0; s < 3; ++s) {
    const pg::SeqSpan w = pg::seq_span(weird, lens2, s, 20, 64);
    CHECK(w.q_begin >= 0 && w.q_begin <= 20);
    CHECK(w.nq >= 0 && w.q_begin + w.nq <= 20);
    CHECK(w.nq <= w.nk);
  }
}

int main() {
  TestSizes();
  TestKeyOffsetBruteForce();
  TestSeqSpan();
  if (g_failures == 0) std::printf("test_paged_index: all checks passed\n");
  return g_failures != 0;
}
