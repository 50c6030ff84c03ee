// Unit tests of the FlexPrefill block-selection index math (csrc/include/tasksieve/
// select_index.h), host only. Built and run by CMake/ctest (no torch, no GPU). Each helper is
// checked against a brute force written from the select_blocks contract in csrc/ops.cpp.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <limits>
#include <random>
#include <vector>

#include "tasksieve/select_index.h"
#include "check.h"

namespace f = tasksieve::flex;


// diag_block(r) = key block of the last query of query block r, i.e. the largest key block
// holding a key visible to some query of the block (query i at position Nk - Nq + i).
static void TestDiag() {
  CHECK_EQ(f::diag_block(0, 16, 16, 16), 0);
  CHECK_EQ(f::diag_block(1, 37, 37, 8), 1);
  CHECK_EQ(f::diag_block(4, 37, 37, 8), 4);   // partial last block: last query at 36
  CHECK_EQ(f::diag_block(0, 3, 10, 4), 2);    // positions 7..9
  CHECK_EQ(f::diag_block(0, 3, 9, 4), 2);     // positions 6..8
  CHECK_EQ(f::diag_block(0, 2, 9, 4), 2);     // positions 7..8
  CHECK_EQ(f::diag_block(0, 1, 8, 4), 1);     // position 7
  for (int64_t Nk = 1; Nk < 60; ++Nk)
    for (int64_t Nq = 1; Nq <= Nk; ++Nq)
      for (int64_t bs = 1; bs < 12; ++bs) {
        const int64_t nbq = (Nq + bs - 1) / bs, nb = (Nk + bs - 1) / bs;
        for (int64_t r = 0; r < nbq; ++r) {
          int64_t brute = -1;
          for (int64_t i = r * bs; i < Nq && i < (r + 1) * bs; ++i) {
            const int64_t pos = Nk - Nq + i;
            for (int64_t j = 0; j <= pos; ++j) brute = brute > j / bs ? brute : j / bs;
          }
          CHECK_EQ(f::diag_block(r, Nq, Nk, bs), brute);
          CHECK(brute < nb);
          if (Nq == Nk) CHECK_EQ(brute, r);  // square: the block diagonal
        }
      }
}

// sel_key orders by value descending then index ascending; NaN and -0 rank as +0.
static void TestKeys() {
  const float nan = std::numeric_limits<float>::quiet_NaN();
  const float inf = std::numeric_limits<float>::infinity();
  CHECK(f::sel_value(nan) == 0.f);
  CHECK(!std::signbit(f::sel_value(-0.f)));
  CHECK_EQ(f::sel_order_bits(-0.f), f::sel_order_bits(0.f));
  CHECK_EQ(f::sel_order_bits(nan), f::sel_order_bits(0.f));
  CHECK(f::sel_key(1.f, 5) > f::sel_key(0.5f, 0));
  CHECK(f::sel_key(0.5f, 0) > f::sel_key(0.5f, 1));  // tie: lower index first
  CHECK(f::sel_key(0.f, 3) < f::sel_key(-1.f, 0));  // -1 counts as 0: tie, lower index first
  CHECK(f::sel_key(inf, 100) > f::sel_key(3e38f, 0));
  CHECK(f::sel_key(-inf, 0) > f::sel_key(-3e38f, 100));  // both count as 0
  CHECK(f::sel_key(inf, 0) != ~0ull);  // ~0 is the "select nothing" sentinel
  std::mt19937 rng(7);
  std::uniform_real_distribution<float> U(-2.f, 2.f);
  for (int it = 0; it < 20000; ++it) {
    float a = U(rng), b = U(rng);
    if (it % 5 == 0) b = a;
    if (it % 7 == 0) a = 0.f, b = -0.f;
    const int64_t i = rng() % 1000, j = rng() % 1000;
    if (i == j) continue;
    const float xa = f::sel_value(a), xb = f::sel_value(b);
    const bool a_first = xa > xb || (xa == xb && i < j);
    CHECK_EQ(f::sel_key(a, i) > f::sel_key(b, j), a_first);
    CHECK_EQ(f::sel_order_bits(a) < f::sel_order_bits(b), xa < xb);
  }
}

// Negative entries (not masses) count as 0, like NaN and -0, on the CPU op and the CUDA kernel
// alike: summed as 0 and ranked as 0 (ties to the lower index). This keeps the sums over "the
// entries at or above a key" monotone in the key, which the CUDA bisection relies on.
static void TestNegatives() {
  const float inf = std::numeric_limits<float>::infinity();
  const float neg[] = {-1.f, -1e-30f, -3e38f, -inf, -std::numeric_limits<float>::denorm_min()};
  for (float x : neg) {
    CHECK(f::sel_value(x) == 0.f);
    CHECK(!std::signbit(f::sel_value(x)));
    CHECK_EQ(f::sel_order_bits(x), f::sel_order_bits(0.f));
    CHECK(f::sel_key(x, 2) < f::sel_key(0.f, 1));
    CHECK(f::sel_key(x, 1) > f::sel_key(0.f, 2));
    CHECK(f::sel_key(x, 0) < f::sel_key(1e-30f, 9));
  }
  CHECK(f::sel_value(inf) == inf);
  CHECK(f::sel_value(2.5f) == 2.5f);
  CHECK(f::sel_value(std::numeric_limits<float>::denorm_min()) ==
        std::numeric_limits<float>::denorm_min());
  // monotone: the sum of sel_value over the entries with key >= k never grows as k grows
  std::mt19937 rng(11);
  std::uniform_real_distribution<float> U(-1.f, 1.f);
  std::vector<float> x(40);
  for (int it = 0; it < 200; ++it) {
    for (float& v : x) v = U(rng);
    double prev = -1.0;
    std::vector<uint64_t> keys;
    for (size_t i = 0; i < x.size(); ++i) keys.push_back(f::sel_key(x[i], int64_t(i)));
    std::sort(keys.begin(), keys.end());  // ascending keys: the sums must not grow
    for (size_t a = 0; a < keys.size(); ++a) {
      double s = 0.0;
      for (size_t i = 0; i < x.size(); ++i)
        if (f::sel_key(x[i], int64_t(i)) >= keys[a]) s += f::sel_value(x[i]);
      if (prev >= 0.0) CHECK(s <= prev);
      prev = s;
    }
  }
}

int main() {
  TestDiag();
  TestKeys();
  TestNegatives();
  if (g_failures) {
    std::fprintf(stderr, "%d check(s) failed\n", g_failures);
    return 1;
  }
  std::printf("select_index: all checks passed\n");
  return 0;
}
