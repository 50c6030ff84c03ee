// Unit tests of the block-sparse attention index math (csrc/include/tasksieve/block_index.h),
// host only. Built and run by CMake/ctest (no torch, no GPU). Each helper is checked against a
// brute force written from the block_sparse_attention contract in csrc/ops.cpp.
#include <cstdint>
#include <cstdio>
#include <initializer_list>

#include "tasksieve/block_index.h"
#include "check.h"

namespace bk = tasksieve::block;


static void TestSizes() {
  CHECK_EQ(bk::num_blocks(0, 64), 0);
  CHECK_EQ(bk::num_blocks(1, 64), 1);
  CHECK_EQ(bk::num_blocks(64, 64), 1);
  CHECK_EQ(bk::num_blocks(65, 64), 2);
  CHECK_EQ(bk::block_begin(3, 16), 48);
  CHECK_EQ(bk::block_end(3, 16, 100), 64);
  CHECK_EQ(bk::block_end(6, 16, 100), 100);  // last block is short
  CHECK_EQ(bk::query_position(0, 4, 10), 6);
  CHECK_EQ(bk::query_key_end(0, 4, 10, true), 7);
  CHECK_EQ(bk::query_key_end(3, 4, 10, true), 10);
  CHECK_EQ(bk::query_key_end(0, 4, 10, false), 10);
  CHECK(bk::block_column_valid(0, 3));
  CHECK(bk::block_column_valid(2, 3));
  CHECK(!bk::block_column_valid(3, 3));
  CHECK(!bk::block_column_valid(-1, 3));
  CHECK_EQ(bk::clamp_block_count(-2, 5), 0);
  CHECK_EQ(bk::clamp_block_count(7, 5), 5);
  CHECK_EQ(bk::clamp_block_count(3, 5), 3);
}

// tile_visibility against the element-wise definition, every tile of many small grids.
static void TestVisibilityBruteForce() {
  for (int64_t Nk = 1; Nk <= 40; ++Nk) {
    for (int64_t Nq = 1; Nq <= Nk; ++Nq) {
      for (int64_t bs : {1, 3, 4, 16}) {
        for (int causal = 0; causal < 2; ++causal) {
          const int64_t nbq = bk::num_blocks(Nq, bs), nbk = bk::num_blocks(Nk, bs);
          for (int64_t r = 0; r < nbq; ++r) {
            for (int64_t c = 0; c < nbk; ++c) {
              const int64_t q0 = bk::block_begin(r, bs), q1 = bk::block_end(r, bs, Nq);
              const int64_t k0 = bk::block_begin(c, bs), k1 = bk::block_end(c, bs, Nk);
              int64_t seen = 0, total = 0;
              for (int64_t i = q0; i < q1; ++i) {
                for (int64_t j = k0; j < k1; ++j) {
                  ++total;
                  const bool vis = !causal || j <= bk::query_position(i, Nq, Nk);
                  CHECK_EQ(vis, j < bk::query_key_end(i, Nq, Nk, causal != 0));
                  seen += vis;
                }
              }
              const auto v = bk::tile_visibility(q0, q1, k0, k1, Nq, Nk, causal != 0);
              const auto expect = seen == 0 ? bk::kSkip : (seen == total ? bk::kFull : bk::kPartial);
              CHECK_EQ(static_cast<int>(v), static_cast<int>(expect));
            }
          }
        }
      }
    }
  }
}

// seq_span: exact on well-formed cu_seqlens; in bounds (every row it yields inside [0, total),
// nq <= nk) for arbitrary int32 contents, as the CUDA kernel relies on.
static void TestSeqSpan() {
  const int32_t cu_q[] = {0, 3, 3, 10, 12};
  const int32_t cu_k[] = {0, 5, 9, 20, 20 + 2};
  const int64_t expect[4][4] = {{0, 3, 0, 5}, {3, 0, 5, 4}, {3, 7, 9, 11}, {10, 2, 20, 2}};
  for (int64_t s = 0; s < 4; ++s) {
    const bk::SeqSpan sp = bk::seq_span(cu_q, cu_k, s, 12, 22);
    CHECK_EQ(sp.q_begin, expect[s][0]);
    CHECK_EQ(sp.nq, expect[s][1]);
    CHECK_EQ(sp.k_begin, expect[s][2]);
    CHECK_EQ(sp.nk, expect[s][3]);
  }
  // Malformed: every combination of a few awkward values (negative, decreasing, past the end,
  // INT32 extremes, nq > nk).
  const int32_t vals[] = {-2147483647 - 1, -5, 0, 2, 7, 9, 2147483647};
  const int64_t total_q = 7, total_k = 9;
  for (int32_t a : vals)
    for (int32_t b : vals)
      for (int32_t c : vals)
        for (int32_t d : vals) {
          const int32_t q2[] = {a, b}, k2[] = {c, d};
          const bk::SeqSpan sp = bk::seq_span(q2, k2, 0, total_q, total_k);
          CHECK(sp.q_begin >= 0 && sp.nq >= 0 && sp.q_begin + sp.nq <= total_q);
          CHECK(sp.k_begin >= 0 && sp.nk >= 0 && sp.k_begin + sp.nk <= total_k);
          CHECK(sp.nq <= sp.nk);
          const bool valid = 0 <= a && a <= b && b <= total_q && 0 <= c && c <= d &&
                             d <= total_k && b - a <= d - c;
          if (valid) {
            CHECK_EQ(sp.q_begin, a);
            CHECK_EQ(sp.nq, b - a);
            CHECK_EQ(sp.k_begin, c);
            CHECK_EQ(sp.nk, d - c);
          }
        }
}

int main() {
  TestSizes();
  TestVisibilityBruteForce();
  TestSeqSpan();
  if (g_failures) {
    std::fprintf(stderr, "test_block_index: %d failure(s)\n", g_failures);
    return 1;
  }
  std::printf("test_block_index: all passed\n");
  return 0;
}
