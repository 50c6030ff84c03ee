// Unit tests of the WindowKV index math (csrc/include/tasksieve/window_index.h), host only.
// Built and run by CMake/ctest (no torch, no GPU). Every helper is checked against a brute
// force written from the op contracts in csrc/ops.cpp.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <limits>
#include <numeric>
#include <random>
#include <vector>

#include "tasksieve/window_index.h"
#include "check.h"

namespace w = tasksieve::window;


static const float kNaN = std::numeric_limits<float>::quiet_NaN();
static const float kInf = std::numeric_limits<float>::infinity();

static void TestSizes() {
  CHECK_EQ(w::num_windows(10, 2, 3), 2);      // 8 review-able tokens -> 2 whole windows
  CHECK_EQ(w::num_windows(8, 8, 1), 0);       // A == N: nothing to review
  CHECK_EQ(w::num_windows(9, 1, 8), 1);
  CHECK_EQ(w::num_windows(16, 1, 8), 1);      // 15 tokens: remainder 7 joins the tail
  CHECK_EQ(w::num_windows(17, 1, 8), 2);
  CHECK_EQ(w::num_windows(7, 1, 8), 0);       // fewer tokens than one window
  CHECK_EQ(w::num_windows(100, 4, 0), 0);     // invalid window
  CHECK_EQ(w::num_windows(100, 4, -3), 0);
  CHECK_EQ(w::num_windows(131072, 32, 8), 16380);
  CHECK_EQ(w::num_windows(int64_t(1) << 40, 1, 1), (int64_t(1) << 40) - 1);
  for (int64_t N = 1; N <= 40; ++N)
    for (int64_t A = 1; A <= N; ++A)
      for (int64_t win = 1; win <= 12; ++win) {
        const int64_t nw = w::num_windows(N, A, win), R = w::review_len(N, A, win);
        CHECK_EQ(R, nw * win);
        CHECK(R <= N - A);
        CHECK(N - A - R < win);  // the remainder is less than one window
      }

  CHECK_EQ(w::topk_count(1), 1);
  CHECK_EQ(w::topk_count(2), 1);
  CHECK_EQ(w::topk_count(3), 1);
  CHECK_EQ(w::topk_count(4), 2);
  CHECK_EQ(w::topk_count(8), 4);
  CHECK_EQ(w::topk_count(9), 4);
  CHECK_EQ(w::topk_count(64), 32);
  CHECK_EQ(w::topk_count(65), 32);
  CHECK_EQ(w::gathered_len(3, 8, 5), 29);
  CHECK_EQ(w::gathered_len(0, 8, 0), 0);
}

static void TestKeyRanges() {
  CHECK_EQ(w::clamp_kv_start(-5, 10, 2), 0);
  CHECK_EQ(w::clamp_kv_start(3, 10, 2), 3);
  CHECK_EQ(w::clamp_kv_start(8, 10, 2), 8);
  CHECK_EQ(w::clamp_kv_start(9, 10, 2), 8);  // never past N - A: query 0 keeps one key
  CHECK_EQ(w::clamp_kv_start(4, 5, 5), 0);
  // Brute force: query i at position N - A + i sees kv_start <= j <= N - A + i.
  for (int64_t N = 1; N <= 12; ++N)
    for (int64_t A = 1; A <= N; ++A)
      for (int64_t raw = -2; raw <= N + 1; ++raw) {
        const int64_t ks = w::clamp_kv_start(raw, N, A);
        CHECK(ks >= 0 && ks <= N - A);
        for (int64_t i = 0; i < A; ++i) {
          CHECK_EQ(w::query_key_begin(ks), ks);
          CHECK_EQ(w::query_key_end(N, A, i), N - A + i + 1);
          int64_t seen = 0;
          for (int64_t j = -1; j <= N; ++j) {
            const bool want = j >= ks && j <= N - A + i;
            CHECK_EQ(w::key_visible(j, i, N, A, ks), want);
            seen += want;
          }
          CHECK(seen >= 1);  // the softmax of every query has at least one term
        }
      }
  // The last query sees every key from kv_start on, the first one not the other queries' keys.
  CHECK(w::key_visible(9, 1, 10, 2, 0));
  CHECK(!w::key_visible(9, 0, 10, 2, 0));
  CHECK(w::key_visible(8, 0, 10, 2, 0));
  CHECK(!w::key_visible(2, 1, 10, 2, 3));
}

static void TestGather() {
  // N = 20, window = 4, tail = 3: valid windows v have 4v + 4 <= 17, i.e. v <= 3.
  CHECK(w::window_index_valid(0, 4, 20, 3));
  CHECK(w::window_index_valid(3, 4, 20, 3));
  CHECK(!w::window_index_valid(4, 4, 20, 3));
  CHECK(!w::window_index_valid(-1, 4, 20, 3));
  CHECK(!w::window_index_valid(std::numeric_limits<int32_t>::max(), 4, 20, 3));
  CHECK(!w::window_index_valid(std::numeric_limits<int32_t>::min(), 4, 20, 3));
  CHECK(!w::window_index_valid(0, 4, 3, 0));     // N < window
  CHECK(!w::window_index_valid(0, 4, 20, 20));   // everything is tail
  CHECK(!w::window_index_valid(0, 0, 20, 0));    // invalid window size
  for (int64_t N = 0; N <= 30; ++N)
    for (int64_t tail = 0; tail <= N; ++tail)
      for (int64_t win = 1; win <= 7; ++win)
        for (int64_t v = -3; v <= 12; ++v)
          CHECK_EQ(w::window_index_valid(v, win, N, tail), v >= 0 && v * win + win <= N - tail);

  const int32_t idx[3] = {0, 3, 2};
  const int64_t keep = 3, win = 4, N = 20, tail = 3;
  std::vector<int64_t> want;
  for (int32_t v : idx)
    for (int64_t t = 0; t < win; ++t) want.push_back(v * win + t);
  for (int64_t t = 0; t < tail; ++t) want.push_back(N - tail + t);  // 17, 18, 19
  CHECK_EQ(static_cast<int64_t>(want.size()), w::gathered_len(keep, win, tail));
  for (int64_t r = 0; r < static_cast<int64_t>(want.size()); ++r)
    CHECK_EQ(w::gather_source_row(r, idx, keep, win, N, tail), want[r]);
  CHECK_EQ(w::gather_source_row(-1, idx, keep, win, N, tail), -1);
  CHECK_EQ(w::gather_source_row(15, idx, keep, win, N, tail), -1);  // past the end
  CHECK_EQ(w::gather_source_row(0, idx, keep, 0, N, tail), -1);

  // Invalid window indices map every row of that window to -1, the others are untouched.
  const int32_t bad[4] = {1, 4, -1, 2147483647};
  for (int64_t r = 0; r < 4 * win + tail; ++r) {
    const int64_t got = w::gather_source_row(r, bad, 4, win, N, tail);
    if (r < win) CHECK_EQ(got, 4 + r);
    else if (r < 4 * win) CHECK_EQ(got, -1);
    else CHECK_EQ(got, N - tail + (r - 4 * win));
  }
  // No windows at all: only the tail.
  CHECK_EQ(w::gather_source_row(0, nullptr, 0, win, N, tail), 17);
  CHECK_EQ(w::gather_source_row(3, nullptr, 0, win, N, tail), -1);
}

static bool BruteRankBefore(float a, int64_t ia, float b, int64_t ib) {
  const float ka = std::isnan(a) ? -kInf : a, kb = std::isnan(b) ? -kInf : b;
  if (ka != kb) return ka > kb;
  return ia < ib;
}

static void TestRank() {
  CHECK(w::rank_before(2.f, 5, 1.f, 0));
  CHECK(!w::rank_before(1.f, 0, 2.f, 5));
  CHECK(w::rank_before(1.f, 2, 1.f, 3));   // tie: lower index first
  CHECK(!w::rank_before(1.f, 3, 1.f, 2));
  CHECK(!w::rank_before(1.f, 3, 1.f, 3));  // irreflexive
  CHECK(w::rank_before(-kInf, 0, kNaN, 1));  // NaN == -inf: index decides
  CHECK(w::rank_before(kNaN, 0, -kInf, 1));
  CHECK(w::rank_before(-1e30f, 9, kNaN, 0));
  CHECK(w::rank_before(-0.f, 0, 0.f, 1));  // -0 == +0
  CHECK(w::rank_before(0.f, 0, -0.f, 1));

  const float specials[] = {kNaN, -kInf, kInf, 0.f, -0.f, 1.f, -1.f, 1e-40f, -1e-40f,
                            3.5f, 3.5f, -2.25f, std::numeric_limits<float>::max(),
                            std::numeric_limits<float>::lowest(), 1e-30f};
  const int n = sizeof(specials) / sizeof(specials[0]);
  for (int a = 0; a < n; ++a)
    for (int b = 0; b < n; ++b)
      for (int64_t ia : {int64_t(0), int64_t(1), int64_t(7)})
        for (int64_t ib : {int64_t(0), int64_t(1), int64_t(7), int64_t(4000000000LL)}) {
          const bool want = BruteRankBefore(specials[a], ia, specials[b], ib);
          CHECK_EQ(w::rank_before(specials[a], ia, specials[b], ib), want);
          CHECK_EQ(w::rank_key(specials[a], ia) < w::rank_key(specials[b], ib), want);
        }
  std::mt19937 rng(1234);
  std::uniform_int_distribution<int> small(-3, 3);
  std::normal_distribution<float> normal(0.f, 10.f);
  for (int it = 0; it < 20000; ++it) {
    const float a = (it % 3) ? normal(rng) : static_cast<float>(small(rng));
    const float b = (it % 5) ? normal(rng) : static_cast<float>(small(rng));
    const int64_t ia = rng() % 64, ib = rng() % 64;
    const bool want = BruteRankBefore(a, ia, b, ib);
    CHECK_EQ(w::rank_before(a, ia, b, ib), want);
    CHECK_EQ(w::rank_key(a, ia) < w::rank_key(b, ib), want);
  }
}

// Host replica of the device radix select in select_windows.cuh: key of the kk-th ranked
// element via 8 MSB-first passes of 8 bits over rank_key, then the elements with key <= it.
static std::vector<int32_t> RadixSelect(const std::vector<float>& s, int64_t kk) {
  const int64_t nw = static_cast<int64_t>(s.size());
  uint64_t threshold = ~0ull;
  if (kk < nw) {
    uint64_t prefix = 0, mask = 0;
    int64_t need = kk;
    for (int shift = 56; shift >= 0; shift -= 8) {
      int64_t hist[256] = {};
      for (int64_t m = 0; m < nw; ++m) {
        const uint64_t key = w::rank_key(s[m], m);
        if ((key & mask) == prefix) ++hist[(key >> shift) & 0xFF];
      }
      int64_t below = 0;
      for (int bin = 0; bin < 256; ++bin) {
        if (below + hist[bin] >= need) {
          prefix |= static_cast<uint64_t>(bin) << shift;
          need -= below;
          break;
        }
        below += hist[bin];
      }
      mask |= 0xFFull << shift;
    }
    threshold = prefix;
  }
  std::vector<int32_t> out;
  for (int64_t m = 0; m < nw; ++m)
    if (w::rank_key(s[m], m) <= threshold) out.push_back(static_cast<int32_t>(m));
  return out;
}

static void TestSelect() {
  std::mt19937 rng(99);
  for (int it = 0; it < 400; ++it) {
    const int64_t nw = 1 + rng() % 300;
    std::vector<float> s(nw);
    for (auto& x : s) {
      const int kind = rng() % 10;
      x = kind == 0 ? kNaN : kind == 1 ? -kInf : kind < 5 ? static_cast<float>(rng() % 4)
                                                       : static_cast<float>(rng() % 1000) * 0.01f;
    }
    std::vector<int32_t> order(nw);
    std::iota(order.begin(), order.end(), 0);
    std::sort(order.begin(), order.end(),
              [&](int32_t a, int32_t b) { return w::rank_before(s[a], a, s[b], b); });
    for (int64_t kk : {int64_t(1), nw / 3 + 1, nw - 1, nw}) {
      if (kk < 1 || kk > nw) continue;
      std::vector<int32_t> want(order.begin(), order.begin() + kk);
      std::sort(want.begin(), want.end());
      const std::vector<int32_t> got = RadixSelect(s, kk);
      CHECK(got == want);
    }
  }
  // Ties: with equal scores the lowest indices win.
  const std::vector<float> flat(10, 0.5f);
  CHECK((RadixSelect(flat, 3) == std::vector<int32_t>{0, 1, 2}));
  const std::vector<float> mix = {1.f, kNaN, 3.f, 3.f, -kInf, 1.f};
  CHECK((RadixSelect(mix, 3) == std::vector<int32_t>{0, 2, 3}));
  CHECK((RadixSelect(mix, 5) == std::vector<int32_t>{0, 1, 2, 3, 5}));  // NaN ties -inf, lower idx
}

// Brute force window reduce: sort descending, average the first kt; mean in index order.
static float BruteReduce(const std::vector<float>& s, bool reduce_max) {
  const int64_t win = static_cast<int64_t>(s.size());
  float sum = 0.f;
  if (!reduce_max) {
    for (float x : s) sum += x;
    return sum / static_cast<float>(win);
  }
  std::vector<float> sorted = s;
  std::sort(sorted.begin(), sorted.end(), [](float a, float b) { return a > b; });
  const int64_t kt = std::max<int64_t>(1, win / 2);
  for (int64_t t = 0; t < kt; ++t) sum += sorted[t];
  return sum / static_cast<float>(kt);
}

static void TestWindowReduce() {
  const float a[8] = {0.1f, 0.9f, 0.3f, 0.7f, 0.2f, 0.8f, 0.0f, 0.4f};
  // top 4 = 0.9, 0.8, 0.7, 0.4 (summed in that order)
  CHECK(w::window_reduce(a, 8, true) == (((0.9f + 0.8f) + 0.7f) + 0.4f) / 4.f);
  CHECK(w::window_reduce(a, 8, false) ==
        (((((((0.1f + 0.9f) + 0.3f) + 0.7f) + 0.2f) + 0.8f) + 0.0f) + 0.4f) / 8.f);
  const float one = 0.25f;
  CHECK(w::window_reduce(&one, 1, true) == 0.25f);  // kt = max(1, 0) = 1
  CHECK(w::window_reduce(&one, 1, false) == 0.25f);
  const float three[3] = {0.5f, 2.f, 1.f};
  CHECK(w::window_reduce(three, 3, true) == 2.f);  // kt = 1: the max
  const float ties[6] = {1.f, 1.f, 1.f, 0.f, 1.f, 0.f};
  CHECK(w::window_reduce(ties, 6, true) == 1.f);  // kt = 3 of the four 1s
  const float zeros[4] = {0.f, 0.f, 0.f, 0.f};  // masked tokens count as 0
  CHECK(w::window_reduce(zeros, 4, true) == 0.f);
  CHECK(w::window_reduce(zeros, 0, true) == 0.f);

  std::mt19937 rng(7);
  for (int64_t win = 1; win <= 130; ++win)  // beyond 64 too: any window size
    for (int rep = 0; rep < 6; ++rep) {
      std::vector<float> s(win);
      for (auto& x : s)
        x = (rep % 2) ? static_cast<float>(rng() % 5) * 0.125f  // many ties
                      : static_cast<float>(rng() % 100000) * 1e-5f;
      CHECK(w::window_reduce(s.data(), win, true) == BruteReduce(s, true));
      CHECK(w::window_reduce(s.data(), win, false) == BruteReduce(s, false));
    }
}

static void TestSharedScore() {
  // scores [Hk = 3, nw = 4]: column m at col + m, stride nw.
  const float sc[12] = {1.f, 2.f, 3.f, 4.f, 5.f, 6.f, 7.f, 8.f, 0.f, 1.f, 2.f, 3.f};
  CHECK(w::shared_score(sc + 0, 4, 3) == (1.f + 5.f + 0.f) / 3.f);
  CHECK(w::shared_score(sc + 3, 4, 3) == (4.f + 8.f + 3.f) / 3.f);
  CHECK(w::shared_score(sc + 2, 4, 1) == 3.f);
  CHECK(w::shared_score(sc, 4, 0) == 0.f);
}

int main() {
  TestSizes();
  TestKeyRanges();
  TestGather();
  TestRank();
  TestSelect();
  TestWindowReduce();
  TestSharedScore();
  if (g_failures) {
    std::fprintf(stderr, "test_window_index: %d check(s) failed\n", g_failures);
    return 1;
  }
  std::printf("test_window_index: all checks passed\n");
  return 0;
}
