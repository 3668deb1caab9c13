// CPU layer_norm / rms_norm (forward, backward, residual) against a naive fp64 reference.
#include <cmath>
#include <vector>

#include "harness.h"
#include "llmcore/norm.h"

using namespace llmcore;

namespace {

struct Ref {
  std::vector<double> y, h, dx, dw, db;
};

// Naive fp64 reference on inputs already rounded to the element type.
Ref reference(const std::vector<double>& x, const std::vector<double>* res,
              const std::vector<double>* w, const std::vector<double>* b,
              const std::vector<double>& dy, const std::vector<double>* dh, int64_t rows,
              int64_t cols, double eps, bool rms) {
  Ref r;
  r.y.resize(rows * cols);
  r.h.resize(rows * cols);
  r.dx.resize(rows * cols);
  r.dw.assign(cols, 0.0);
  r.db.assign(cols, 0.0);
  for (int64_t i = 0; i < rows; ++i) {
    const double* hx = &x[i * cols];
    double* h = &r.h[i * cols];
    for (int64_t j = 0; j < cols; ++j) h[j] = hx[j] + (res ? (*res)[i * cols + j] : 0.0);
    double mean = 0.0;
    if (!rms) {
      for (int64_t j = 0; j < cols; ++j) mean += h[j];
      mean /= cols;
    }
    double var = 0.0;
    for (int64_t j = 0; j < cols; ++j) var += (h[j] - mean) * (h[j] - mean);
    const double rstd = 1.0 / std::sqrt(var / cols + eps);
    std::vector<double> xhat(cols), g(cols);
    double mg = 0.0, mgx = 0.0;
    for (int64_t j = 0; j < cols; ++j) {
      xhat[j] = (h[j] - mean) * rstd;
      const double wj = w ? (*w)[j] : 1.0;
      r.y[i * cols + j] = xhat[j] * wj + (b ? (*b)[j] : 0.0);
      g[j] = dy[i * cols + j] * wj;
      mg += g[j];
      mgx += g[j] * xhat[j];
      r.dw[j] += dy[i * cols + j] * xhat[j];
      r.db[j] += dy[i * cols + j];
    }
    mg = rms ? 0.0 : mg / cols;
    mgx /= cols;
    for (int64_t j = 0; j < cols; ++j)
      r.dx[i * cols + j] = rstd * (g[j] - mg - xhat[j] * mgx) + (dh ? (*dh)[i * cols + j] : 0.0);
  }
  return r;
}

template <typename T>
std::vector<T> store(const std::vector<double>& v) {
  std::vector<T> out(v.size());
  for (size_t i = 0; i < v.size(); ++i) out[i] = narrow<T>(compute_t<T>(v[i]));
  return out;
}

template <typename T>
std::vector<double> load(const std::vector<T>& v) {
  std::vector<double> out(v.size());
  for (size_t i = 0; i < v.size(); ++i) out[i] = double(widen(v[i]));
  return out;
}

template <typename T>
void run_case(DType dtype, int64_t rows, int64_t cols, bool rms, bool has_w, bool has_b,
              bool residual, int threads, double tol) {
  has_b = has_b && !rms;
  using C = compute_t<T>;
  const double eps = 1e-5;
  // inputs rounded to T (and weights to C) first, so the reference sees exactly the same values
  auto x = load(store<T>(llmcore_test::randn(rows * cols, 1, 2.0, 0.5)));
  auto r = load(store<T>(llmcore_test::randn(rows * cols, 2)));
  auto w = load(store<C>(llmcore_test::randn(cols, 3, 0.3, 1.0)));
  auto b = load(store<C>(llmcore_test::randn(cols, 4)));
  auto dy = load(store<T>(llmcore_test::randn(rows * cols, 5)));
  auto dh = load(store<T>(llmcore_test::randn(rows * cols, 6)));
  const auto xs = store<T>(x), rs = store<T>(r), dys = store<T>(dy), dhs = store<T>(dh);
  const auto ws = store<C>(w), bs = store<C>(b);

  std::vector<T> y(rows * cols), h(rows * cols), dx(rows * cols);
  std::vector<C> mean(rows), rstd(rows), dw(cols), db(cols);
  NormFwdParams f;
  f.dtype = dtype;
  f.rms = rms;
  f.rows = rows;
  f.cols = cols;
  f.eps = eps;
  f.x = xs.data();
  f.residual = residual ? rs.data() : nullptr;
  f.weight = has_w ? ws.data() : nullptr;
  f.bias = has_b ? bs.data() : nullptr;
  f.y = y.data();
  f.h = residual ? h.data() : nullptr;
  f.mean = mean.data();
  f.rstd = rstd.data();
  f.num_threads = threads;
  norm_fwd_cpu(f);

  // the kernel normalises the h it returns (x + residual rounded to T): so does the reference
  const std::vector<double> hin = residual ? load(h) : x;
  Ref ref = reference(hin, nullptr, has_w ? &w : nullptr, has_b ? &b : nullptr, dy,
                      residual ? &dh : nullptr, rows, cols, eps, rms);
  if (residual) {
    for (int64_t i = 0; i < rows * cols; ++i) CHECK_NEAR(widen(h[i]), x[i] + r[i], 0.0, tol);
  }
  for (int64_t i = 0; i < rows * cols; ++i) CHECK_NEAR(widen(y[i]), ref.y[i], tol, tol);

  NormBwdParams g;
  g.dtype = dtype;
  g.rms = rms;
  g.rows = rows;
  g.cols = cols;
  g.dy = dys.data();
  g.dh = residual ? dhs.data() : nullptr;
  g.h = residual ? static_cast<const void*>(h.data()) : xs.data();
  g.weight = has_w ? ws.data() : nullptr;
  g.mean = mean.data();
  g.rstd = rstd.data();
  g.dx = dx.data();
  g.dweight = has_w ? dw.data() : nullptr;
  g.dbias = has_b ? db.data() : nullptr;
  g.num_threads = threads;
  norm_bwd_cpu(g);
  for (int64_t i = 0; i < rows * cols; ++i) CHECK_NEAR(widen(dx[i]), ref.dx[i], tol, tol);
  // sums over rows: scale the tolerance with the row count
  if (has_b)
    for (int64_t j = 0; j < cols; ++j) CHECK_NEAR(db[j], ref.db[j], tol * rows, tol);
  if (has_w) {
    for (int64_t j = 0; j < cols; ++j) CHECK_NEAR(dw[j], ref.dw[j], tol * rows, tol);
    // deterministic: a second run gives bit-identical weight gradients
    std::vector<C> dw2(cols);
    g.dweight = dw2.data();
    g.dbias = nullptr;
    norm_bwd_cpu(g);
    for (int64_t j = 0; j < cols; ++j) CHECK(dw2[j] == dw[j]);
  }
}

template <typename T>
void run_all(DType dtype, double tol) {
  const int64_t shapes[][2] = {{3, 97}, {17, 1023}, {64, 1500}, {1, 1}};
  for (auto& s : shapes)
    for (bool rms : {false, true})
      // weight+bias, neither, weight+bias with a residual, bias only
      for (int mode = 0; mode < 4; ++mode)
        for (int threads : {1, 2})
          run_case<T>(dtype, s[0], s[1], rms, /*has_w=*/mode == 0 || mode == 2,
                      /*has_b=*/mode != 1, /*residual=*/mode == 2, threads, tol);
}

}  // namespace

TEST(norm_fp32) { run_all<float>(DType::kFloat32, 2e-5); }
TEST(norm_fp64) { run_all<double>(DType::kFloat64, 1e-11); }
TEST(norm_bf16) { run_all<BFloat16>(DType::kBFloat16, 2e-2); }
TEST(norm_fp16) { run_all<Half>(DType::kFloat16, 3e-3); }

TEST(norm_empty_rows_zero_weight_grad) {
  std::vector<float> w(8, 1.f), dw(8, 5.f), db(8, 5.f);
  NormBwdParams g;
  g.rows = 0;
  g.cols = 8;
  g.weight = w.data();
  g.dweight = dw.data();
  g.dbias = db.data();
  norm_bwd_cpu(g);
  for (int j = 0; j < 8; ++j) CHECK(dw[j] == 0.f && db[j] == 0.f);
}
