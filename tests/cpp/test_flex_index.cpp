// Unit tests of the FlexPrefill index math (csrc/include/tasksieve/flex_index.h), host only.
// Built and run by CMake/ctest (no torch, no GPU). Every helper is checked against a brute
// force written from the op contracts in csrc/ops.cpp.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <limits>
#include <random>
#include <vector>

#include "tasksieve/flex_index.h"
#include "check.h"

namespace f = tasksieve::flex;


static void TestSizes() {
  CHECK_EQ(f::num_blocks(0, 16), 0);
  CHECK_EQ(f::num_blocks(1, 16), 1);
  CHECK_EQ(f::num_blocks(16, 16), 1);
  CHECK_EQ(f::num_blocks(17, 16), 2);
  CHECK_EQ(f::num_blocks(10, 0), 0);
  CHECK_EQ(f::num_rep_queries(0, 8), 0);
  CHECK_EQ(f::num_rep_queries(3, 8), 3);
  CHECK_EQ(f::num_rep_queries(100, 8), 8);
  CHECK_EQ(f::rep_query_index(10, 4, 0), 6);
  CHECK_EQ(f::rep_query_pos(50, 4, 3), 49);  // the last rep query sits at the last position
  for (int64_t Nk = 1; Nk < 70; ++Nk)
    for (int64_t bs = 1; bs < 20; ++bs) {
      const int64_t nb = f::num_blocks(Nk, bs);
      int64_t covered = 0;
      for (int64_t c = 0; c < nb; ++c) {
        CHECK(f::block_end(c, Nk, bs) > f::block_begin(c, bs));  // no empty block
        covered += f::block_end(c, Nk, bs) - f::block_begin(c, bs);
      }
      CHECK_EQ(covered, Nk);
      for (int64_t j = 0; j < Nk; ++j) {
        const int64_t c = f::key_block(j, bs);
        CHECK(c < nb && j >= f::block_begin(c, bs) && j < f::block_end(c, Nk, bs));
      }
    }
}

static void TestSlash() {
  // Brute force: the keys with slash_block == t are exactly [slash_key_begin, slash_key_end).
  for (int64_t pos = 0; pos < 60; ++pos)
    for (int64_t bs = 1; bs < 18; ++bs) {
      CHECK_EQ(f::slash_block(pos, pos + 1, bs), -1);  // future key: masked
      CHECK_EQ(f::slash_block(pos, pos, bs), 0);       // main diagonal
      for (int64_t t = 0; t <= pos / bs + 1; ++t) {
        const int64_t b = f::slash_key_begin(pos, t, bs), e = f::slash_key_end(pos, t, bs);
        for (int64_t j = 0; j <= pos; ++j) {
          const bool in = j >= b && j < e;
          CHECK_EQ(in, f::slash_block(pos, j, bs) == t);
        }
      }
      // Every visible key lies on exactly one offset block < nb for any Nk > pos.
      CHECK(f::slash_block(pos, 0, bs) < f::num_blocks(pos + 1, bs));
    }
}

// Brute-force sqrt(JSD) in double from the contract.
static double JsBrute(const std::vector<double>& p0, const std::vector<double>& q0, double eps) {
  const size_t n = p0.size();
  auto norm = [&](std::vector<double> x) {
    double s = 0;
    for (double v : x) s += v;
    for (double& v : x) v = s > 0 ? v / s : 1.0 / n;
    double c = 0;
    for (double& v : x) c += (v = v < eps ? eps : v);
    for (double& v : x) v /= c;
    return x;
  };
  const auto p = norm(p0), q = norm(q0);
  double d2 = 0;
  for (size_t i = 0; i < n; ++i) {
    const double m = 0.5 * (p[i] + q[i]);
    d2 += 0.5 * p[i] * std::log(p[i] / m) + 0.5 * q[i] * std::log(q[i] / m);
  }
  return std::sqrt(d2 > 0 ? d2 : 0);
}

static float JsHelpers(const std::vector<double>& p, const std::vector<double>& q, float eps) {
  const int64_t n = static_cast<int64_t>(p.size());
  float sp = 0, sq = 0;
  for (int64_t i = 0; i < n; ++i) sp += static_cast<float>(p[i]), sq += static_cast<float>(q[i]);
  float cp = 0, cq = 0;
  for (int64_t i = 0; i < n; ++i) {
    cp += f::js_clamp(f::js_normalize(static_cast<float>(p[i]), sp, n), eps);
    cq += f::js_clamp(f::js_normalize(static_cast<float>(q[i]), sq, n), eps);
  }
  float acc = 0;
  for (int64_t i = 0; i < n; ++i)
    acc += f::js_term(f::js_clamp(f::js_normalize(static_cast<float>(p[i]), sp, n), eps) / cp,
                      f::js_clamp(f::js_normalize(static_cast<float>(q[i]), sq, n), eps) / cq);
  return f::js_finish(acc);
}

static void TestJs() {
  const double sqrt_ln2 = std::sqrt(std::log(2.0));
  CHECK_NEAR(JsHelpers({1, 0}, {0, 1}, 1e-12f), sqrt_ln2, 1e-5);   // disjoint
  CHECK_EQ(JsHelpers({1, 2, 0}, {1, 2, 0}, 1e-12f), 0.f);          // identical: exactly 0
  CHECK_EQ(JsHelpers({0, 0, 0}, {0, 0, 0}, 1e-12f), 0.f);          // all zero: uniform
  CHECK_EQ(JsHelpers({0, 0, 0, 0}, {3, 3, 3, 3}, 1e-12f), 0.f);    // zero row == uniform
  CHECK_NEAR(f::js_normalize(0.f, 0.f, 4), 0.25, 0);
  CHECK(std::isnan(f::js_normalize(1.f, -1.f, 4)));                // negative sum: NaN
  CHECK(std::isnan(f::js_clamp(std::numeric_limits<float>::quiet_NaN(), 1e-3f)));
  CHECK_EQ(f::js_clamp(0.f, 1e-3f), 1e-3f);
  CHECK_EQ(f::js_finish(-1e-9f), 0.f);
  CHECK(std::isnan(f::js_finish(std::numeric_limits<float>::quiet_NaN())));
  std::mt19937 rng(7);
  std::uniform_real_distribution<double> u(0, 1);
  for (int it = 0; it < 300; ++it) {
    const int n = 1 + it % 40;
    std::vector<double> p(n), q(n);
    for (int i = 0; i < n; ++i) {
      p[i] = u(rng) < 0.3 ? 0.0 : u(rng);
      q[i] = u(rng) < 0.3 ? 0.0 : u(rng);
    }
    const float got = JsHelpers(p, q, 1e-12f);
    CHECK(!std::isnan(got) && got >= 0.f && got <= sqrt_ln2 + 1e-5);
    CHECK_NEAR(got, JsBrute(p, q, 1e-12), 2e-3);
  }
}

int main() {
  TestSizes();
  TestSlash();
  TestJs();
  if (g_failures) {
    std::fprintf(stderr, "%d check(s) failed\n", g_failures);
    return 1;
  }
  std::printf("flex_index: all checks passed\n");
  return 0;
}
