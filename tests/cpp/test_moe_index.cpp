// Unit tests of the PreMoe routing index math (csrc/include/tasksieve/moe_index.h), host only.
// Built and run by CMake/ctest (no torch, no GPU). Each helper is checked against a brute force
// written from the route_topk / moe_align contracts in csrc/ops.cpp.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <vector>

#include "tasksieve/moe_index.h"
#include "check.h"

namespace m = tasksieve::moe;

// The order of route_key is "higher value first, ties to the lower id, NaN as -inf, -0 as +0",
// and ranks_before is the same order.
static void TestRankOrder() {
  const float inf = std::numeric_limits<float>::infinity();
  const float nan = std::numeric_limits<float>::quiet_NaN();
  const std::vector<float> vals = {-inf, -3.5f, -1e-30f, -0.f, 0.f, 1e-30f, 0.25f, 7.f, inf, nan};
  auto canon = [&](float x) { return std::isnan(x) ? -inf : (x == 0.f ? 0.f : x); };
  for (size_t a = 0; a < vals.size(); ++a)
    for (size_t b = 0; b < vals.size(); ++b)
      for (int64_t ea : {0, 3, 1023})
        for (int64_t eb : {0, 5, 1023}) {
          const float va = canon(vals[a]), vb = canon(vals[b]);
          const bool expect = va > vb || (va == vb && ea < eb);
          CHECK_EQ(m::ranks_before(vals[a], ea, vals[b], eb), expect);
          if (ea != eb) {
            CHECK_EQ(m::route_key(vals[a], ea) > m::route_key(vals[b], eb), expect);
          }
        }
  // Keys are never 0 (0 marks "not selectable") and decode to their expert.
  for (float v : vals)
    for (int64_t e : {0, 1, 31, 32, 1023, 70000}) {
      CHECK(m::route_key(v, e) != 0);
      CHECK_EQ(m::route_key_expert(m::route_key(v, e)), e);
    }
}

// Sorting random keys gives the brute-force ranking (ties are frequent on purpose).
static void TestTopKMatchesBruteForce() {
  std::mt19937 rng(7);
  std::uniform_int_distribution<int> small(-3, 3);
  for (int trial = 0; trial < 200; ++trial) {
    const int E = 1 + trial % 70;
    std::vector<float> v(E);
    for (auto& x : v) x = static_cast<float>(small(rng)) * 0.5f;
    std::vector<uint64_t> keys(E);
    for (int e = 0; e < E; ++e) keys[e] = m::route_key(v[e], e);
    std::sort(keys.begin(), keys.end(), std::greater<uint64_t>());
    std::vector<int64_t> order(E);
    for (int e = 0; e < E; ++e) order[e] = e;
    std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return v[a] > v[b]; });
    for (int j = 0; j < E; ++j) CHECK_EQ(m::route_key_expert(keys[j]), order[j]);
  }
}

static void TestAlignSizes() {
  CHECK_EQ(m::align_sentinel(4, 3), 12);
  CHECK_EQ(m::align_padded_size(12, 5, 4), 28);  // vLLM's docstring example: 12 + 5*3 -> 28
  CHECK_EQ(m::align_num_tiles(12, 5, 4), 7);
  CHECK_EQ(m::align_padded_size(0, 1, 1), 0);
  CHECK_EQ(m::align_padded_size(0, 3, 16), 48);
  CHECK_EQ(m::align_padded_size(7, 2, 1), 7);
  CHECK_EQ(m::align_run_length(0, 16), 0);
  CHECK_EQ(m::align_run_length(1, 16), 16);
  CHECK_EQ(m::align_run_length(16, 16), 16);
  CHECK_EQ(m::align_run_length(17, 16), 32);
  CHECK_EQ(m::slot_token(0, 3), 0);
  CHECK_EQ(m::slot_token(5, 3), 1);
  CHECK_EQ(m::slot_token(6, 3), 2);
  // P bounds every assignment of S slots to E experts: sum of padded runs <= P, P % bm == 0.
  std::mt19937 rng(11);
  for (int trial = 0; trial < 500; ++trial) {
    const int64_t E = 1 + trial % 40, bm = 1 + (trial * 7) % 70, S = (trial * 13) % 300;
    std::vector<int64_t> cnt(E, 0);
    std::uniform_int_distribution<int64_t> pick(0, E - 1);
    for (int64_t s = 0; s < S; ++s) ++cnt[pick(rng)];
    int64_t used = 0;
    for (int64_t c : cnt) used += m::align_run_length(c, bm);
    const int64_t P = m::align_padded_size(S, E, bm);
    CHECK(used <= P);
    CHECK_EQ(P % bm, 0);
    CHECK_EQ(m::align_num_tiles(S, E, bm) * bm, P);
    CHECK(P < S + E * (bm - 1) + bm);
  }
}

static void TestCompactExpert() {
  const int32_t map[5] = {-1, 0, 7, 1, 4};
  CHECK_EQ(m::compact_expert(0, 5, map), -1);   // mapped to -1: dropped
  CHECK_EQ(m::compact_expert(1, 5, map), 0);
  CHECK_EQ(m::compact_expert(2, 5, map), -1);   // map entry out of range: dropped
  CHECK_EQ(m::compact_expert(3, 5, map), 1);
  CHECK_EQ(m::compact_expert(4, 5, map), 4);
  CHECK_EQ(m::compact_expert(5, 5, map), -1);   // id out of range: dropped, map not read
  CHECK_EQ(m::compact_expert(-2, 5, map), -1);
  CHECK_EQ(m::compact_expert(3, 5, nullptr), 3);
  CHECK_EQ(m::compact_expert(5, 5, nullptr), -1);
  CHECK_EQ(m::compact_expert(-1, 5, nullptr), -1);
}

int main() {
  TestRankOrder();
  TestTopKMatchesBruteForce();
  TestAlignSizes();
  TestCompactExpert();
  if (g_failures) std::fprintf(stderr, "%d check(s) failed\n", g_failures);
  return g_failures != 0;
}
