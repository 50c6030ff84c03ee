// Unit tests of the expert GEMM index math (csrc/include/tasksieve/expert_gemm_index.h), host
// only. Built and run by CMake/ctest (no torch, no GPU). The tile walk is checked against a
// brute-force moe_align layout built from the contract in csrc/ops.cpp.
#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <vector>

#include "tasksieve/expert_gemm_index.h"
#include "check.h"

namespace moe = tasksieve::moe;

static void TestSizes() {
  CHECK_EQ(moe::padded_size(0, 4, 16), 64);     // 0 + 4*15 = 60 -> 64
  CHECK_EQ(moe::padded_size(12, 4, 4), 24);     // vLLM's docstring example: 12 + 12 = 24
  CHECK_EQ(moe::padded_size(1, 1, 1), 1);
  CHECK_EQ(moe::padded_size(5, 3, 64), 256);    // 5 + 189 = 194 -> 256
  CHECK_EQ(moe::active_rows(-3, 64), 0);
  CHECK_EQ(moe::active_rows(80, 64), 64);
  CHECK_EQ(moe::active_rows(32, 64), 32);
  CHECK(moe::tile_active(0, 16, 1));
  CHECK(!moe::tile_active(0, 16, 0));
  CHECK(moe::tile_active(1, 16, 17));
  CHECK(!moe::tile_active(1, 16, 16));
  CHECK(moe::tile_expert_valid(0, 1));
  CHECK(!moe::tile_expert_valid(-1, 3));
  CHECK(!moe::tile_expert_valid(3, 3));
  CHECK(moe::slot_valid(0, 1));
  CHECK(!moe::slot_valid(1, 1));  // the sentinel S
  CHECK(!moe::slot_valid(-1, 5));
  CHECK_EQ(moe::slot_source_row(7, 3, true), 2);
  CHECK_EQ(moe::slot_source_row(7, 3, false), 7);
  CHECK_EQ(moe::slot_source_row(0, 8, true), 0);
  CHECK_EQ(moe::choose_block_m(16, 8), 16);
  CHECK_EQ(moe::choose_block_m(8192 * 2, 8), 64);
  CHECK_EQ(moe::choose_block_m(30 * 8, 8), 32);
  CHECK_EQ(moe::choose_block_m(5, 0), 16);
}

// weight_row against the definition: every weight row read exactly once per output column.
static void TestWeightRows() {
  for (int64_t I = 1; I <= 40; ++I) {
    for (int64_t half : {1, 16, 64}) {
      // silu_mul: N = 2I; tiles of `half` columns over [0, I).
      std::vector<int> seen(2 * I, 0);
      for (int64_t n0 = 0; n0 < I; n0 += half) {
        for (int64_t r = 0; r < 2 * half + 3; ++r) {
          const int64_t w = moe::weight_row(r, n0, half, I, true, 2 * I);
          if (r >= 2 * half) {
            CHECK_EQ(w, -1);
            continue;
          }
          const int64_t c = n0 + (r < half ? r : r - half);
          if (c >= I) {
            CHECK_EQ(w, -1);
          } else {
            CHECK_EQ(w, r < half ? c : I + c);
            if (w >= 0 && w < 2 * I) ++seen[w];
          }
        }
      }
      for (int64_t w = 0; w < 2 * I; ++w) CHECK_EQ(seen[w], 1);
      // none: N = I rows; tiles of `half` columns.
      std::vector<int> seen_n(I, 0);
      for (int64_t n0 = 0; n0 < I; n0 += half) {
        for (int64_t r = 0; r < half + 2; ++r) {
          const int64_t w = moe::weight_row(r, n0, half, I, false, I);
          if (r >= half || n0 + r >= I) {
            CHECK_EQ(w, -1);
          } else {
            CHECK_EQ(w, n0 + r);
            ++seen_n[w];
          }
        }
      }
      for (int64_t w = 0; w < I; ++w) CHECK_EQ(seen_n[w], 1);
    }
  }
}

// A brute-force moe_align layout, walked tile by tile with the helpers: every slot of a kept
// expert is visited exactly once, in a tile of its expert, and nothing else is.
static void TestTileWalk() {
  unsigned state = 12345u;
  auto rnd = [&](unsigned n) {
    state = state * 1103515245u + 12345u;
    return (state >> 8) % n;
  };
  for (int trial = 0; trial < 200; ++trial) {
    const int64_t T = rnd(20), k = 1 + rnd(4), E = 1 + rnd(6);
    const int64_t bm = int64_t{1} << rnd(5);
    const int64_t S = T * k;
    std::vector<int64_t> ids(S), map(E);
    for (auto& v : ids) v = rnd(E);
    int64_t Ec = 0;
    for (auto& v : map) v = rnd(4) == 0 ? -1 : Ec++;
    if (Ec == 0) continue;
    const int64_t P = moe::padded_size(S, E, bm);
    std::vector<int64_t> sorted(P, S), tiles(P / bm, -1);
    int64_t pos = 0;
    for (int64_t e = 0; e < Ec; ++e) {
      const int64_t start = pos;
      for (int64_t s = 0; s < S; ++s)
        if (map[ids[s]] == e) sorted[pos++] = s;
      if (pos == start) continue;
      pos = start + tasksieve::round_up(pos - start, bm);
      for (int64_t t = start / bm; t < pos / bm; ++t) tiles[t] = e;
    }
    CHECK(pos <= P);
    std::vector<int> visits(S, 0);
    const int64_t rows = moe::active_rows(pos, P);
    for (int64_t t = 0; t < P / bm; ++t) {
      if (!moe::tile_active(t, bm, rows) || !moe::tile_expert_valid(tiles[t], Ec)) continue;
      for (int64_t r = 0; r < bm; ++r) {
        const int64_t s = sorted[t * bm + r];
        if (!moe::slot_valid(s, S)) continue;
        CHECK_EQ(map[ids[s]], tiles[t]);
        CHECK(moe::slot_source_row(s, k, true) < T);
        ++visits[s];
      }
    }
    for (int64_t s = 0; s < S; ++s) CHECK_EQ(visits[s], map[ids[s]] >= 0 ? 1 : 0);
  }
}

// The CUDA grid (gemm_grid_tiles) covers every tile a layout may use, also when the used tiles
// are not a prefix: random layouts of valid tiles at random positions before num_padded (what
// the CPU op accepts). The old bound ceil(S / bm) + min(E_c, S) misses some of them.
static void TestGridCoversEveryTile() {
  CHECK_EQ(moe::gemm_grid_tiles(0, 16), 0);
  CHECK_EQ(moe::gemm_grid_tiles(64, 16), 4);
  CHECK_EQ(moe::gemm_grid_tiles(976, 16), 61);
  unsigned state = 777u;
  auto rnd = [&](unsigned n) {
    state = state * 1103515245u + 12345u;
    return (state >> 8) % n;
  };
  int old_bound_misses = 0;
  for (int trial = 0; trial < 300; ++trial) {
    const int64_t S = 1 + rnd(12), Ec = 1 + rnd(4), bm = int64_t{16} << rnd(3);
    const int64_t tiles = 1 + rnd(8), P = tiles * bm;
    const int64_t num_padded = bm * rnd(static_cast<unsigned>(tiles + 1));
    const int64_t grid = moe::gemm_grid_tiles(P, bm);
    const int64_t old_bound = std::min(P / bm, (S + bm - 1) / bm + std::min(Ec, S));
    for (int64_t t = 0; t < tiles; ++t) {
      const int64_t e = static_cast<int64_t>(rnd(static_cast<unsigned>(Ec + 1))) - 1;
      if (!moe::tile_active(t, bm, moe::active_rows(num_padded, P)) ||
          !moe::tile_expert_valid(e, Ec))
        continue;
      CHECK(t < grid);
      if (t >= old_bound) ++old_bound_misses;
    }
  }
  CHECK(old_bound_misses > 0);  // the cases the fix is about do occur in this sample
}

int main() {
  TestSizes();
  TestWeightRows();
  TestTileWalk();
  TestGridCoversEveryTile();
  if (g_failures) std::fprintf(stderr, "%d check(s) failed\n", g_failures);
  else std::printf("test_expert_gemm_index: all checks passed\n");
  return g_failures != 0;
}
