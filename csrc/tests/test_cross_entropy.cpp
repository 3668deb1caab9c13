// CPU cross-entropy (forward, backward, fused in-place) against a naive fp64 reference.
#include <cmath>
#include <vector>

#include "harness.h"
#include "llmcore/cross_entropy.h"

using namespace llmcore;

namespace {

struct Options {
  bool weight;
  double smoothing, z_loss, softcap;
  double z_ratio = 1.0;  // passed to the kernels when != 1
};

// Naive fp64 reference of the formulas in llmcore/cross_entropy.h, by explicit softmax.
void reference(const std::vector<double>& x, const std::vector<int64_t>& target,
               const std::vector<double>* w, int64_t rows, int64_t V, const Options& o,
               int64_t ignore, const std::vector<double>& dloss, std::vector<double>* loss,
               std::vector<double>* dx) {
  loss->assign(rows, 0.0);
  dx->assign(rows * V, 0.0);
  for (int64_t i = 0; i < rows; ++i) {
    const int64_t t = target[i];
    if (t == ignore) continue;
    std::vector<double> y(V), dcap(V, 1.0);
    for (int64_t c = 0; c < V; ++c) {
      y[c] = x[i * V + c];
      if (o.softcap > 0) {
        const double th = std::tanh(y[c] / o.softcap);
        y[c] = o.softcap * th;
        dcap[c] = 1 - th * th;
      }
    }
    double m = y[0];
    for (double v : y) m = std::max(m, v);
    double s = 0;
    for (double v : y) s += std::exp(v - m);
    const double lse = m + std::log(s);
    auto wc = [&](int64_t c) { return w ? (*w)[c] : 1.0; };
    const double z = o.z_loss * o.z_ratio;  // the z-term is not class-weighted
    double l = (1 - o.smoothing) * wc(t) * (lse - y[t]) + z * lse * lse;
    if (o.smoothing > 0)
      for (int64_t c = 0; c < V; ++c) l += o.smoothing / V * wc(c) * (lse - y[c]);
    (*loss)[i] = l;
    // dl/dy_c = (1-e) w_t (p_c - [c==t]) + e/V (W p_c - w_c) + 2 z lse p_c
    double W = 0;
    for (int64_t c = 0; c < V; ++c) W += wc(c);
    for (int64_t c = 0; c < V; ++c) {
      const double pc = std::exp(y[c] - lse);
      double g = (1 - o.smoothing) * wc(t) * (pc - (c == t ? 1.0 : 0.0));
      if (o.smoothing > 0) g += o.smoothing / V * (W * pc - wc(c));
      g += 2 * z * lse * pc;
      (*dx)[i * V + c] = dloss[i] * g * dcap[c];
    }
  }
}

template <typename T>
void run_case(DType dtype, int64_t rows, int64_t V, const Options& o, int threads, double tol) {
  using C = compute_t<T>;
  const int64_t ignore = -100;
  auto xd = llmcore_test::randn(rows * V, 11, 3.0);
  std::vector<T> x(rows * V);
  for (int64_t i = 0; i < rows * V; ++i) {
    x[i] = narrow<T>(compute_t<T>(xd[i]));
    xd[i] = double(widen(x[i]));
  }
  std::vector<int64_t> target(rows);
  for (int64_t i = 0; i < rows; ++i) target[i] = (i * 7919 + 3) % V;
  if (rows > 2) target[1] = ignore;
  auto wd = llmcore_test::randn(V, 12, 0.2, 1.0);
  std::vector<C> w(V);
  for (int64_t c = 0; c < V; ++c) {
    w[c] = C(wd[c]);
    wd[c] = double(w[c]);
  }
  auto dl = llmcore_test::randn(rows, 13);
  std::vector<C> dloss(rows);
  for (int64_t i = 0; i < rows; ++i) {
    dloss[i] = C(dl[i]);
    dl[i] = double(dloss[i]);
  }
  std::vector<double> ref_loss, ref_dx;
  reference(xd, target, o.weight ? &wd : nullptr, rows, V, o, ignore, dl, &ref_loss, &ref_dx);

  CrossEntropyParams p;
  p.dtype = dtype;
  p.rows = rows;
  p.classes = V;
  p.logits = x.data();
  p.target = target.data();
  p.weight = o.weight ? w.data() : nullptr;
  p.ignore_index = ignore;
  p.label_smoothing = o.smoothing;
  p.z_loss = o.z_loss;
  p.softcap = o.softcap;
  const C z_ratio = C(o.z_ratio);
  p.z_ratio = o.z_ratio != 1.0 ? &z_ratio : nullptr;
  p.num_threads = threads;
  std::vector<C> loss(rows), lse(rows);
  std::vector<T> dx(rows * V);
  p.loss = loss.data();
  p.lse = lse.data();
  cross_entropy_fwd_cpu(p);
  for (int64_t i = 0; i < rows; ++i) CHECK_NEAR(loss[i], ref_loss[i], tol, tol);
  p.dloss = dloss.data();
  p.dlogits = dx.data();
  cross_entropy_bwd_cpu(p);
  for (int64_t i = 0; i < rows * V; ++i) CHECK_NEAR(widen(dx[i]), ref_dx[i], tol, tol);

  // fused and in place: the same loss, and the gradient lands in the logits buffer
  std::vector<T> inplace = x;
  std::vector<C> loss2(rows), lse2(rows);
  p.logits = inplace.data();
  p.dlogits = inplace.data();
  p.loss = loss2.data();
  p.lse = lse2.data();
  cross_entropy_fwd_bwd_cpu(p);
  for (int64_t i = 0; i < rows; ++i) CHECK(loss2[i] == loss[i] && lse2[i] == lse[i]);
  for (int64_t i = 0; i < rows * V; ++i) CHECK(widen(inplace[i]) == widen(dx[i]));

  // one dloss for every row (stride 0, the gradient of a sum): as if it were repeated per row
  std::vector<C> same(rows, dloss[0]);
  std::vector<T> dx_rows(rows * V), dx_one(rows * V);
  p.logits = x.data();
  p.lse = lse.data();
  p.dloss = same.data();
  p.dlogits = dx_rows.data();
  cross_entropy_bwd_cpu(p);
  p.dloss = dloss.data();
  p.dloss_stride = 0;
  p.dlogits = dx_one.data();
  cross_entropy_bwd_cpu(p);
  for (int64_t i = 0; i < rows * V; ++i) CHECK(widen(dx_one[i]) == widen(dx_rows[i]));
}

template <typename T>
void run_all(DType dtype, double tol) {
  const Options opts[] = {{false, 0.0, 0.0, 0.0}, {true, 0.1, 1e-3, 0.0}, {true, 0.2, 1e-2, 7.0},
                          {false, 0.0, 0.0, 30.0}, {true, 0.0, 1e-2, 0.0, 1.7}};
  const int64_t shapes[][2] = {{5, 97}, {3, 4099}, {1, 1}, {37, 1000}};
  for (auto& s : shapes)
    for (const auto& o : opts)
      for (int threads : {1, 2}) run_case<T>(dtype, s[0], s[1], o, threads, tol);
}

}  // namespace

TEST(cross_entropy_fp32) { run_all<float>(DType::kFloat32, 2e-5); }
TEST(cross_entropy_fp64) { run_all<double>(DType::kFloat64, 1e-10); }
TEST(cross_entropy_bf16) { run_all<BFloat16>(DType::kBFloat16, 1e-2); }
TEST(cross_entropy_fp16) { run_all<Half>(DType::kFloat16, 2e-3); }

TEST(cross_entropy_leading_masked_block_is_finite) {
  // the first blocks of the row entirely -inf (a masked vocabulary range): finite loss/gradient
  const int64_t V = 4100;
  std::vector<float> x(V), dx(V);
  for (int64_t c = 0; c < V; ++c) x[c] = c < 4096 ? -INFINITY : float(c % 5) * 0.5f;
  const int64_t target = V - 2;
  std::vector<double> xd(x.begin(), x.end()), ref_loss, ref_dx;
  reference(xd, {target}, nullptr, 1, V, Options{false, 0.0, 0.0, 0.0}, -100, {1.0}, &ref_loss,
            &ref_dx);
  float loss = 0.f, lse = 0.f, dloss = 1.f;
  CrossEntropyParams p;
  p.rows = 1;
  p.classes = V;
  p.logits = x.data();
  p.target = &target;
  p.loss = &loss;
  p.lse = &lse;
  p.dloss = &dloss;
  p.dlogits = dx.data();
  cross_entropy_fwd_bwd_cpu(p);
  CHECK(std::isfinite(loss));
  CHECK_NEAR(loss, ref_loss[0], 1e-5, 1e-5);
  for (int64_t c = 0; c < V; ++c) CHECK_NEAR(dx[c], ref_dx[c], 1e-6, 1e-5);
}
