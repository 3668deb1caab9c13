// A minimal test harness for the kernel unit tests: TEST(name) registers a function; CHECK and
// CHECK_NEAR record failures with file and line. The runner executes the tests whose name starts
// with its first argument (ctest passes a suite name), and fails if none ran.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <functional>
#include <random>
#include <string>
#include <vector>

#include "llmcore/dtype.h"

namespace llmcore_test {

struct Case {
  std::string name;
  std::function<void()> fn;
};

inline std::vector<Case>& registry() {
  static std::vector<Case> cases;
  return cases;
}

inline int& failures() {
  static int n = 0;
  return n;
}

struct Register {
  Register(const char* name, std::function<void()> fn) { registry().push_back({name, fn}); }
};

// Deterministic normal samples for inputs.
inline std::vector<double> randn(size_t n, uint32_t seed, double scale = 1.0, double shift = 0.0) {
  std::mt19937 gen(seed);
  std::normal_distribution<double> dist(0.0, 1.0);
  std::vector<double> v(n);
  for (auto& x : v) x = dist(gen) * scale + shift;
  return v;
}

// v rounded to the element type T (through its compute type, as the kernels round).
template <typename T>
std::vector<T> cast(const std::vector<double>& v) {
  std::vector<T> out(v.size());
  for (size_t i = 0; i < v.size(); ++i) out[i] = llmcore::narrow<T>(llmcore::compute_t<T>(v[i]));
  return out;
}

}  // namespace llmcore_test

#define LLMCORE_CAT2(a, b) a##b
#define LLMCORE_CAT(a, b) LLMCORE_CAT2(a, b)
#define TEST(name)                                                                         \
  static void LLMCORE_CAT(test_fn_, name)();                                               \
  static llmcore_test::Register LLMCORE_CAT(test_reg_, name)(#name, LLMCORE_CAT(test_fn_, name)); \
  static void LLMCORE_CAT(test_fn_, name)()

#define CHECK(cond)                                                               \
  do {                                                                            \
    if (!(cond)) {                                                                \
      std::fprintf(stderr, "%s:%d: CHECK failed: %s\n", __FILE__, __LINE__, #cond); \
      ++llmcore_test::failures();                                                 \
    }                                                                             \
  } while (0)

// |got - want| <= atol + rtol * |want|; reports the first few failures of a loop.
#define CHECK_NEAR(got, want, atol, rtol)                                                  \
  do {                                                                                     \
    const double g_ = double(got), w_ = double(want);                                      \
    if (!(std::fabs(g_ - w_) <= (atol) + (rtol) * std::fabs(w_))) {                        \
      if (llmcore_test::failures() < 20)                                                   \
        std::fprintf(stderr, "%s:%d: %s = %.9g, expected %s = %.9g\n", __FILE__, __LINE__, \
                     #got, g_, #want, w_);                                                 \
      ++llmcore_test::failures();                                                          \
    }                                                                                      \
  } while (0)
