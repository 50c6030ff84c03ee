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

int main() {
  TestSizes();
  TestVisibilityBruteForce();
  if (g_failures) {
    std::fprintf(stderr, "test_block_index: %d failure(s)\n", g_failures);
    return 1;
  }
  std::printf("test_block_index: all passed\n");
  return 0;
}
