// Minimal check macros shared by the host-only C++ unit tests (no gtest: CI has no network).
// A failed check prints where and what, and counts; main() returns g_failures != 0.
#pragma once
#include <cmath>
#include <cstdio>

static int g_failures = 0;

#define CHECK(cond)                                                                 \
  do {                                                                              \
    if (!(cond)) {                                                                  \
      std::fprintf(stderr, "%s:%d: CHECK failed: %s\n", __FILE__, __LINE__, #cond); \
      ++g_failures;                                                                 \
    }                                                                               \
  } while (0)

#define CHECK_EQ(a, b)                                                                    \
  do {                                                                                    \
    const auto va = (a);                                                                  \
    const auto vb = (b);                                                                  \
    if (!(va == vb)) {                                                                    \
      std::fprintf(stderr, "%s:%d: CHECK_EQ failed: %s == %s (%lld vs %lld)\n", __FILE__, \
                   __LINE__, #a, #b, static_cast<long long>(va),                          \
                   static_cast<long long>(vb));                                           \
      ++g_failures;                                                                       \
    }                                                                                     \
  } while (0)

#define CHECK_NEAR(a, b, tol)                                                              \
  do {                                                                                     \
    const double va = (a), vb = (b);                                                       \
    if (!(std::fabs(va - vb) <= (tol))) {                                                  \
      std::fprintf(stderr, "%s:%d: CHECK_NEAR failed: %s ~ %s (%.9g vs %.9g)\n", __FILE__, \
                   __LINE__, #a, #b, va, vb);                                              \
      ++g_failures;                                                                        \
    }                                                                                      \
  } while (0)
