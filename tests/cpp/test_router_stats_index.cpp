// Unit tests of router_stats_update's chunk and workspace math
// (csrc/include/tasksieve/router_stats_index.h), host only. Built and run by CMake/ctest (no
// torch, no GPU). Each helper is checked against its contract in the header: the chunks tile
// [0, Tn) exactly, none is empty, their number respects the budget, and the slice layout covers
// every accumulator once.
#include <cstdint>
#include <vector>

#include "tasksieve/router_stats_index.h"
#include "check.h"

namespace m = tasksieve::moe;

static void TestChunksTileTheTokens() {
  const std::vector<int64_t> Ts = {0, 1, 2, 7, 63, 64, 65, 130, 1000, 4096, 8191, 100003,
                                   int64_t{1} << 24};
  const std::vector<int64_t> Es = {1, 3, 16, 33, 64, 256, 1024, 2048};
  for (int64_t T : Ts)
    for (int64_t E : Es) {
      const int64_t n = m::rs_num_chunks(T, E), len = m::rs_chunk_len(T, E);
      if (T == 0) {
        CHECK_EQ(n, 0);
        CHECK_EQ(len, 0);
        CHECK_EQ(m::rs_workspace_bytes(T, E), size_t{0});
        continue;
      }
      CHECK(n >= 1);
      CHECK(n <= m::rs_max_chunks(E));
      CHECK(n <= m::kRsMaxChunks);
      // small inputs are one chunk; chunks are never shorter than the minimum unless forced
      if (T <= m::kRsMinChunkTokens) CHECK_EQ(n, 1);
      CHECK(len >= (T < m::kRsMinChunkTokens ? T : m::kRsMinChunkTokens));
      int64_t covered = 0;
      for (int64_t c = 0; c < n; ++c) {
        const int64_t b = m::rs_chunk_begin(c, T, E), e = m::rs_chunk_end(c, T, E);
        CHECK_EQ(b, covered);  // contiguous, in order
        CHECK(e > b);          // no empty chunk
        CHECK(e - b <= len);
        covered = e;
      }
      CHECK_EQ(covered, T);
      CHECK_EQ(m::rs_chunk_begin(n, T, E), T);  // past the last chunk: empty
      CHECK_EQ(m::rs_workspace_bytes(T, E),
               static_cast<size_t>(n * m::rs_slice_elems(E)) * sizeof(double));
      // the budget holds whenever more than one chunk is used
      if (n > 1)
        CHECK(static_cast<int64_t>(m::rs_workspace_bytes(T, E)) <= m::kRsWorkspaceBudget);
    }
  // many tokens with small E: the chunk cap; large E: one chunk
  CHECK_EQ(m::rs_num_chunks(int64_t{1} << 24, 8), m::kRsMaxChunks);
  CHECK_EQ(m::rs_num_chunks(int64_t{1} << 24, 2048), 1);
  CHECK_EQ(m::rs_max_chunks(2048), 1);
  CHECK_EQ(m::rs_num_chunks(130, 33), 2);  // floor(130 / 64) chunks of 65
  CHECK_EQ(m::rs_chunk_len(130, 33), 65);
  CHECK_EQ(m::rs_num_chunks(200, 16), 3);  // 67, 67, 66
  CHECK_EQ(m::rs_chunk_end(2, 200, 16) - m::rs_chunk_begin(2, 200, 16), 66);
  CHECK_EQ(m::rs_num_chunks(127, 16), 1);
}

static void TestSliceLayout() {
  for (int64_t E : {1, 2, 3, 33, 256}) {
    std::vector<int> hit(static_cast<size_t>(m::rs_slice_elems(E)), 0);
    auto mark = [&](int64_t off, int64_t n) {
      for (int64_t i = 0; i < n; ++i) ++hit[static_cast<size_t>(off + i)];
    };
    mark(m::rs_gram_off(E), E * E);
    mark(m::rs_cosel_off(E), E * E);
    mark(m::rs_sum_off(E), E);
    mark(m::rs_count_off(E), E);
    for (int h : hit) CHECK_EQ(h, 1);
  }
}

static void TestIdValid() {
  CHECK(m::rs_id_valid(0, 1));
  CHECK(!m::rs_id_valid(1, 1));
  CHECK(!m::rs_id_valid(-1, 5));
  CHECK(m::rs_id_valid(4, 5));
  CHECK(!m::rs_id_valid(5, 5));
  CHECK(!m::rs_id_valid(INT64_MIN, 5));
  CHECK(!m::rs_id_valid(INT64_MAX, 5));
}

int main() {
  TestChunksTileTheTokens();
  TestSliceLayout();
  TestIdValid();
  if (g_failures) std::fprintf(stderr, "%d check(s) failed\n", g_failures);
  return g_failures != 0;
}
