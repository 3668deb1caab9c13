// CPU layer_norm / rms_norm, forward and backward, with the fused residual add.
//
// One row at a time per thread (OpenMP over rows, static contiguous chunks): the row is widened
// to the compute type C (fp32, fp64 for fp64 inputs) into a thread-local buffer that stays in
// L1/L2, statistics are summed in fp64 (cheap next to the memory traffic, and it keeps the
// kernel's error well below eager's), outputs are rounded to T once. Weight/bias gradients: per-thread fp64 partial sums reduced in thread
// order, so the result is deterministic for a given thread count.
#include <cmath>
#include <vector>

#include "llmcore/norm.h"
#include "parallel.h"

namespace llmcore {
namespace {

// buf = widen(x + residual); with a residual, the sum is rounded to T (it is the h the caller
// gets back) and stored in h, and the norm is taken of that rounded h.
template <typename T, typename C = compute_t<T>>
void load_row(const T* x, const T* res, T* h, C* buf, int64_t n) {
  if (res == nullptr) {
    for (int64_t j = 0; j < n; ++j) buf[j] = widen(x[j]);
    return;
  }
  for (int64_t j = 0; j < n; ++j) {
    const T v = narrow<T>(widen(x[j]) + widen(res[j]));
    h[j] = v;
    buf[j] = widen(v);
  }
}

template <typename T>
void norm_fwd(const NormFwdParams& p) {
  using C = compute_t<T>;
  const int64_t n = p.cols;
  const T* x = static_cast<const T*>(p.x);
  const T* res = static_cast<const T*>(p.residual);
  T* y = static_cast<T*>(p.y);
  T* h = static_cast<T*>(p.h);
  const C* w = static_cast<const C*>(p.weight);
  const C* b = static_cast<const C*>(p.bias);
  C* mean_out = static_cast<C*>(p.mean);
  C* rstd_out = static_cast<C*>(p.rstd);
  const int nt = cpu::team_size(p.rows, n, p.num_threads);

#pragma omp parallel num_threads(nt) if (nt > 1)
  {
    int64_t r0, r1;
    cpu::chunk(p.rows, cpu::team_threads(), cpu::thread_id(), &r0, &r1);
    std::vector<C> buf(n);
    C* hb = buf.data();
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t off = r * n;
      load_row(x + off, res ? res + off : nullptr, h ? h + off : nullptr, hb, n);
      double mean = 0.0;
      if (!p.rms) {
        double s = 0.0;
#pragma omp simd reduction(+ : s)
        for (int64_t j = 0; j < n; ++j) s += hb[j];
        mean = s / double(n);
      }
      const C mu = C(mean);
      double ss = 0.0;
#pragma omp simd reduction(+ : ss)
      for (int64_t j = 0; j < n; ++j) {
        const double d = double(hb[j]) - mean;
        ss += d * d;
      }
      const C rstd = C(1.0 / std::sqrt(ss / double(n) + p.eps));
      if (!p.rms) mean_out[r] = mu;
      rstd_out[r] = rstd;
      T* yr = y + off;
      for (int64_t j = 0; j < n; ++j) {
        C v = (hb[j] - mu) * rstd;
        if (w) v *= w[j];
        if (b) v += b[j];
        yr[j] = narrow<T>(v);
      }
    }
  }
}

// Backward. With xhat = (h - mean) * rstd (rms: xhat = h * rstd) and y = xhat * w + b, let
// g = dy * w (the gradient reaching xhat). Differentiating through mean and rstd:
//   layer: dh = rstd * (g - mean_j(g) - xhat * mean_j(g * xhat))
//   rms:   dh = rstd * (g - xhat * mean_j(g * xhat))
// plus the gradient dh_out of the returned h when there is one; dx = dresidual = dh.
//   dweight = sum_rows(dy * xhat),  dbias = sum_rows(dy)
template <typename T>
void norm_bwd(const NormBwdParams& p) {
  using C = compute_t<T>;
  const int64_t n = p.cols;
  const T* dy = static_cast<const T*>(p.dy);
  const T* dhout = static_cast<const T*>(p.dh);
  const T* h = static_cast<const T*>(p.h);
  T* dx = static_cast<T*>(p.dx);
  const C* w = static_cast<const C*>(p.weight);
  const C* mean = static_cast<const C*>(p.mean);
  const C* rstd_in = static_cast<const C*>(p.rstd);
  const bool want_dw = p.dweight != nullptr, want_db = p.dbias != nullptr;
  const int nt = cpu::team_size(p.rows, n, p.num_threads);
  // per-thread fp64 partials of dweight and dbias: (nt, n) each, zero where unused
  std::vector<double> part_w(want_dw ? size_t(nt) * n : 0, 0.0);
  std::vector<double> part_b(want_db ? size_t(nt) * n : 0, 0.0);

#pragma omp parallel num_threads(nt) if (nt > 1)
  {
    const int tid = cpu::thread_id();
    int64_t r0, r1;
    cpu::chunk(p.rows, cpu::team_threads(), tid, &r0, &r1);
    std::vector<C> xhat_buf(n), dy_buf(n);
    C* xh = xhat_buf.data();
    C* d = dy_buf.data();
    double* pw = want_dw ? part_w.data() + size_t(tid) * n : nullptr;
    double* pb = want_db ? part_b.data() + size_t(tid) * n : nullptr;
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t off = r * n;
      const C mu = p.rms ? C(0) : mean[r];
      const C rstd = rstd_in[r];
      double sum_g = 0.0, sum_gx = 0.0;
      for (int64_t j = 0; j < n; ++j) {
        xh[j] = (widen(h[off + j]) - mu) * rstd;
        d[j] = widen(dy[off + j]);
      }
#pragma omp simd reduction(+ : sum_g, sum_gx)
      for (int64_t j = 0; j < n; ++j) {
        const C g = w ? d[j] * w[j] : d[j];
        sum_g += g;
        sum_gx += double(g) * xh[j];
      }
      const C a = p.rms ? C(0) : C(sum_g / double(n));
      const C c = C(sum_gx / double(n));
      T* dxr = dx + off;
      if (dhout) {
        const T* dhr = dhout + off;
        for (int64_t j = 0; j < n; ++j) {
          const C g = w ? d[j] * w[j] : d[j];
          dxr[j] = narrow<T>(rstd * (g - a - xh[j] * c) + widen(dhr[j]));
        }
      } else {
        for (int64_t j = 0; j < n; ++j) {
          const C g = w ? d[j] * w[j] : d[j];
          dxr[j] = narrow<T>(rstd * (g - a - xh[j] * c));
        }
      }
      if (pw) {
#pragma omp simd
        for (int64_t j = 0; j < n; ++j) pw[j] += double(d[j]) * xh[j];
      }
      if (pb) {
#pragma omp simd
        for (int64_t j = 0; j < n; ++j) pb[j] += d[j];
      }
    }
  }
  // fixed-order reduction of the partials: thread 0, 1, ... (deterministic)
  if (want_dw || want_db) {
    for (int64_t j = 0; j < n; ++j) {
      double sw = 0.0, sb = 0.0;
      for (int t = 0; t < nt; ++t) {
        if (want_dw) sw += part_w[size_t(t) * n + j];
        if (want_db) sb += part_b[size_t(t) * n + j];
      }
      if (want_dw) static_cast<C*>(p.dweight)[j] = C(sw);
      if (want_db) static_cast<C*>(p.dbias)[j] = C(sb);
    }
  }
}

}  // namespace

void norm_fwd_cpu(const NormFwdParams& p) {
  if (p.rows == 0 || p.cols == 0) return;
  switch (p.dtype) {
    case DType::kFloat32: return norm_fwd<float>(p);
    case DType::kFloat16: return norm_fwd<Half>(p);
    case DType::kBFloat16: return norm_fwd<BFloat16>(p);
    case DType::kFloat64: return norm_fwd<double>(p);
  }
}

void norm_bwd_cpu(const NormBwdParams& p) {
  switch (p.dtype) {
    case DType::kFloat32: return norm_bwd<float>(p);
    case DType::kFloat16: return norm_bwd<Half>(p);
    case DType::kBFloat16: return norm_bwd<BFloat16>(p);
    case DType::kFloat64: return norm_bwd<double>(p);
  }
}

}  // namespace llmcore
