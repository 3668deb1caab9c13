// gelu_cpu against a double-precision reference (llmcore/gelu.h), both forms, forward and
// backward, with x rows inside wider strided rows, columns across the kernel's blocks and under
// one, x far into both tails, a team of threads, and every element type; and the fp32 normal
// CDF (vmath.h) against erfc over a dense grid.
#include <cmath>
#include <vector>

#include "../cpu/vmath.h"
#include "harness.h"
#include "llmcore/gelu.h"

namespace {

using llmcore::DType;

using llmcore_test::cast;

template <typename T>
double at(const std::vector<T>& v, int64_t i) {
  return double(llmcore::widen(v[size_t(i)]));
}

// y and dy/dx in double
void reference(double x, bool tanh, double* y, double* dydx) {
  if (tanh) {
    const double k = std::sqrt(2.0 / M_PI), t = std::tanh(k * (x + 0.044715 * x * x * x));
    *y = 0.5 * x * (1.0 + t);
    *dydx = 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * k * (1.0 + 3.0 * 0.044715 * x * x);
    return;
  }
  const double cdf = 0.5 * std::erfc(-x / std::sqrt(2.0));
  *y = x * cdf;
  *dydx = cdf + x * std::exp(-0.5 * x * x) / std::sqrt(2.0 * M_PI);
}

template <typename T>
void run(DType dtype, double tol, int64_t rows, int64_t cols, bool tanh, bool backward) {
  const int64_t sx = cols + 3, sdy = cols + 5;            // padded rows: any row stride works
  const auto x = cast<T>(llmcore_test::randn(size_t(rows * sx), 21, 4.0));
  const auto dy = cast<T>(llmcore_test::randn(size_t(rows * sdy), 22));
  std::vector<T> out(size_t(rows * cols));
  llmcore::GeluParams p;
  p.dtype = dtype;
  p.tanh = tanh;
  p.backward = backward;
  p.rows = rows;
  p.cols = cols;
  p.x = x.data();
  p.x_stride = sx;
  p.dy = dy.data();
  p.dy_stride = sdy;
  p.out = out.data();
  p.num_threads = 2;
  llmcore::gelu_cpu(p);
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t j = 0; j < cols; ++j) {
      double y, dydx;
      reference(at(x, r * sx + j), tanh, &y, &dydx);   // x as the kernel sees it (rounded to T)
      const double want = backward ? at(dy, r * sdy + j) * dydx : y;
      CHECK_NEAR(at(out, r * cols + j), want, tol, tol);
    }
  }
}

template <typename T>
void all(DType dtype, double tol) {
  for (bool tanh : {false, true}) {
    for (bool backward : {false, true}) {
      run<T>(dtype, tol, 130, 300, tanh, backward);   // two column blocks per row, a team of 2
      run<T>(dtype, tol, 9, 7, tanh, backward);       // one short block, one thread
      run<T>(dtype, tol, 3, 1, tanh, backward);
    }
  }
}

}  // namespace

TEST(gelu_fp32) { all<float>(DType::kFloat32, 2e-6); }
TEST(gelu_fp64) { all<double>(DType::kFloat64, 1e-13); }
TEST(gelu_bf16) { all<llmcore::BFloat16>(DType::kBFloat16, 1e-2); }
TEST(gelu_fp16) { all<llmcore::Half>(DType::kFloat16, 2e-3); }
TEST(gelu_empty) {
  llmcore::GeluParams p;                    // no rows: nothing is read or written
  p.cols = 5;
  llmcore::gelu_cpu(p);
}

// The fit's promise: |x (Phi - cdf)| <= 8.2e-8 max(1, |x|) in exact arithmetic; fp32 adds a
// few roundings of x Phi (an ulp of it is up to 1.2e-7 |x Phi|). The two halves agree, and the
// tails go to exactly 0 and 1.
TEST(gelu_normal_cdf_fp32) {
  for (double xd = -40.0; xd <= 40.0; xd += 1.0 / 1024) {
    const float x = float(xd);
    float cdf, upper;
    llmcore::cpu::normal_cdf_pair(x, &cdf, &upper);
    const double want = 0.5 * std::erfc(-double(x) / std::sqrt(2.0));
    const double scale = std::max(1.0, std::fabs(xd));
    CHECK_NEAR(double(x) * cdf, double(x) * want, 2.5e-7 * scale, 0.0);
    CHECK_NEAR(double(upper), 0.5 * std::erfc(double(x) / std::sqrt(2.0)), 1.2e-7, 0.0);
  }
  float cdf, upper;
  llmcore::cpu::normal_cdf_pair(1e4f, &cdf, &upper);
  CHECK_NEAR(cdf, 1.0, 0.0, 0.0);
  CHECK_NEAR(upper, 0.0, 0.0, 0.0);
  llmcore::cpu::normal_cdf_pair(-1e30f, &cdf, &upper);
  CHECK_NEAR(cdf, 0.0, 0.0, 0.0);
}
