// swiglu_cpu against a double-precision reference (llmcore/swiglu.h), forward and backward,
// with x rows inside wider strided rows, F across the kernel's column blocks and under one,
// gates far into both tails of the sigmoid, a team of threads, and every element type.
#include <cmath>
#include <vector>

#include "harness.h"
#include "llmcore/swiglu.h"

namespace {

using llmcore::DType;

using llmcore_test::cast;

template <typename T>
double at(const std::vector<T>& v, int64_t i) {
  return double(llmcore::widen(v[size_t(i)]));
}

template <typename T>
void run(DType dtype, double tol, int64_t rows, int64_t f, bool backward) {
  const int64_t sx = 2 * f + 3, sdy = f + 5;            // padded rows: any row stride works
  const auto x = cast<T>(llmcore_test::randn(size_t(rows * sx), 11, 4.0));
  const auto dy = cast<T>(llmcore_test::randn(size_t(rows * sdy), 12));
  std::vector<T> out(size_t(rows * (backward ? 2 * f : f)));
  llmcore::SwigluParams p;
  p.dtype = dtype;
  p.backward = backward;
  p.rows = rows;
  p.cols = f;
  p.x = x.data();
  p.x_stride = sx;
  p.dy = dy.data();
  p.dy_stride = sdy;
  p.out = out.data();
  p.num_threads = 2;
  llmcore::swiglu_cpu(p);
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t j = 0; j < f; ++j) {
      // the inputs as the kernel sees them (rounded to T)
      const double g = at(x, r * sx + j), u = at(x, r * sx + f + j);
      const double s = 1.0 / (1.0 + std::exp(-g));
      if (!backward) {
        CHECK_NEAR(at(out, r * f + j), g * s * u, tol, tol);
        continue;
      }
      const double d = at(dy, r * sdy + j);
      CHECK_NEAR(at(out, r * 2 * f + j), d * u * s * (1.0 + g * (1.0 - s)), tol, tol);
      CHECK_NEAR(at(out, r * 2 * f + f + j), d * g * s, tol, tol);
    }
  }
}

template <typename T>
void all(DType dtype, double tol) {
  for (bool backward : {false, true}) {
    run<T>(dtype, tol, 130, 300, backward);   // two column blocks per row, a team of 2
    run<T>(dtype, tol, 9, 7, backward);       // one short block, one thread
    run<T>(dtype, tol, 3, 1, backward);
  }
}

}  // namespace

TEST(swiglu_fp32) { all<float>(DType::kFloat32, 2e-6); }
TEST(swiglu_fp64) { all<double>(DType::kFloat64, 1e-13); }
TEST(swiglu_bf16) { all<llmcore::BFloat16>(DType::kBFloat16, 1e-2); }
TEST(swiglu_fp16) { all<llmcore::Half>(DType::kFloat16, 2e-3); }
TEST(swiglu_empty) {
  llmcore::SwigluParams p;                  // no rows: nothing is read or written
  p.cols = 5;
  llmcore::swiglu_cpu(p);
}
