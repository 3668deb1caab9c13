// CPU layer_norm / rms_norm, forward and backward, with the fused residual add.
//
// One row at a time per thread (OpenMP over rows, static contiguous chunks): the row is widened
// to the compute type C (fp32, fp64 for fp64 inputs) into thread-local buffers that stay in
// L1/L2, statistics are summed in fp64 lanes (cheap next to the memory traffic, and it keeps the
// kernel's error well below eager's), outputs are rounded to T once. Weight/bias gradients:
// per-thread fp64 partial sums reduced in thread order, so the result is deterministic for a
// given thread count. The row loops are compiled per x86 ISA level (LLMCORE_CPU_CLONES).
#include <cmath>
#include <vector>

#include "llmcore/norm.h"
#include "parallel.h"
#include "vmath.h"

namespace llmcore {
namespace {

// buf = widen(x + residual); with a residual, the sum is rounded to T (it is the h the caller
// gets back) and stored in h, and the norm is taken of that rounded h.
template <typename T, typename C>
LLMCORE_ALWAYS_INLINE inline void load_row(const T* x, const T* res, T* h, C* buf, int64_t n) {
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

// Forward of rows [r0, r1).
template <typename T>
LLMCORE_ALWAYS_INLINE inline void fwd_rows(const NormFwdParams& p, int64_t r0, int64_t r1) {
  using C = compute_t<T>;
  const int64_t n = p.cols;
  const T* x = static_cast<const T*>(p.x);
  const T* res = static_cast<const T*>(p.residual);
  T* y = static_cast<T*>(p.y);
  T* h = static_cast<T*>(p.h);
  const C* w = static_cast<const C*>(p.weight);
  const C* b = static_cast<const C*>(p.bias);
  std::vector<C> buf(n);
  C* hb = buf.data();
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t off = r * n;
    load_row(x + off, res ? res + off : nullptr, h ? h + off : nullptr, hb, n);
    const double mean = p.rms ? 0.0 : cpu::dot_f64<C>(hb, nullptr, n) / double(n);
    const double var = cpu::sum_sq_dev_f64(hb, n, mean) / double(n);
    const C mu = C(mean);
    const C rstd = C(1.0 / std::sqrt(var + p.eps));
    if (!p.rms) static_cast<C*>(p.mean)[r] = mu;
    static_cast<C*>(p.rstd)[r] = rstd;
    T* yr = y + off;
    if (w && b) {
      for (int64_t j = 0; j < n; ++j) yr[j] = narrow<T>((hb[j] - mu) * rstd * w[j] + b[j]);
    } else if (w) {
      for (int64_t j = 0; j < n; ++j) yr[j] = narrow<T>((hb[j] - mu) * rstd * w[j]);
    } else if (b) {
      for (int64_t j = 0; j < n; ++j) yr[j] = narrow<T>((hb[j] - mu) * rstd + b[j]);
    } else {
      for (int64_t j = 0; j < n; ++j) yr[j] = narrow<T>((hb[j] - mu) * rstd);
    }
  }
}

// Backward of rows [r0, r1). With xhat = (h - mean) * rstd (rms: xhat = h * rstd) and
// y = xhat * w + b, let g = dy * w (the gradient reaching xhat). Through mean and rstd:
//   layer: dh = rstd * (g - mean_j(g) - xhat * mean_j(g * xhat))
//   rms:   dh = rstd * (g - xhat * mean_j(g * xhat))
// plus the gradient dh_out of the returned h when there is one; dx = dresidual = dh.
//   dweight = sum_rows(dy * xhat),  dbias = sum_rows(dy)   (into this thread's partials)
template <typename T>
LLMCORE_ALWAYS_INLINE inline void bwd_rows(const NormBwdParams& p, int64_t r0, int64_t r1,
                                           double* pw, double* pb) {
  using C = compute_t<T>;
  const int64_t n = p.cols;
  const T* dy = static_cast<const T*>(p.dy);
  const T* dhout = static_cast<const T*>(p.dh);
  const T* h = static_cast<const T*>(p.h);
  T* dx = static_cast<T*>(p.dx);
  const C* w = static_cast<const C*>(p.weight);
  const C* mean = static_cast<const C*>(p.mean);
  const C* rstd_in = static_cast<const C*>(p.rstd);
  std::vector<C> bufs(3 * n);
  C* xh = bufs.data();
  C* d = xh + n;
  C* g = d + n;
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t off = r * n;
    const C mu = p.rms ? C(0) : mean[r];
    const C rstd = rstd_in[r];
    for (int64_t j = 0; j < n; ++j) {
      xh[j] = (widen(h[off + j]) - mu) * rstd;
      d[j] = widen(dy[off + j]);
    }
    if (w) {
      for (int64_t j = 0; j < n; ++j) g[j] = d[j] * w[j];
    } else {
      for (int64_t j = 0; j < n; ++j) g[j] = d[j];
    }
    const C a = p.rms ? C(0) : C(cpu::dot_f64<C>(g, nullptr, n) / double(n));
    const C c = C(cpu::dot_f64(g, xh, n) / double(n));
    T* dxr = dx + off;
    if (dhout) {
      const T* dhr = dhout + off;
      for (int64_t j = 0; j < n; ++j)
        dxr[j] = narrow<T>(rstd * (g[j] - a - xh[j] * c) + widen(dhr[j]));
    } else {
      for (int64_t j = 0; j < n; ++j) dxr[j] = narrow<T>(rstd * (g[j] - a - xh[j] * c));
    }
    if (pw)
      for (int64_t j = 0; j < n; ++j) pw[j] += double(d[j]) * double(xh[j]);
    if (pb)
      for (int64_t j = 0; j < n; ++j) pb[j] += double(d[j]);
  }
}

// One function per element type, compiled for several x86 ISA levels (runtime dispatch).
#define LLMCORE_NORM_ROWS(suffix, T)                                                         \
  LLMCORE_CPU_CLONES void fwd_rows_##suffix(const NormFwdParams& p, int64_t r0, int64_t r1) { \
    fwd_rows<T>(p, r0, r1);                                                                  \
  }                                                                                          \
  LLMCORE_CPU_CLONES void bwd_rows_##suffix(const NormBwdParams& p, int64_t r0, int64_t r1,   \
                                            double* pw, double* pb) {                        \
    bwd_rows<T>(p, r0, r1, pw, pb);                                                          \
  }
LLMCORE_NORM_ROWS(f32, float)
LLMCORE_NORM_ROWS(f16, Half)
LLMCORE_NORM_ROWS(bf16, BFloat16)
LLMCORE_NORM_ROWS(f64, double)
#undef LLMCORE_NORM_ROWS

}  // namespace

void norm_fwd_cpu(const NormFwdParams& p) {
  if (p.rows == 0 || p.cols == 0) return;
  auto* fn = p.dtype == DType::kFloat32 ? fwd_rows_f32
             : p.dtype == DType::kFloat16 ? fwd_rows_f16
             : p.dtype == DType::kBFloat16 ? fwd_rows_bf16 : fwd_rows_f64;
  const int nt = cpu::team_size(p.rows, p.cols, p.num_threads);
#pragma omp parallel num_threads(nt) if (nt > 1)
  {
    int64_t r0, r1;
    cpu::chunk(p.rows, cpu::team_threads(), cpu::thread_id(), &r0, &r1);
    fn(p, r0, r1);
  }
}

void norm_bwd_cpu(const NormBwdParams& p) {
  const int64_t n = p.cols;
  auto* fn = p.dtype == DType::kFloat32 ? bwd_rows_f32
             : p.dtype == DType::kFloat16 ? bwd_rows_f16
             : p.dtype == DType::kBFloat16 ? bwd_rows_bf16 : bwd_rows_f64;
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
    fn(p, r0, r1, want_dw ? part_w.data() + size_t(tid) * n : nullptr,
       want_db ? part_b.data() + size_t(tid) * n : nullptr);
  }
  // fixed-order reduction of the partials: thread 0, 1, ... (deterministic)
  auto reduce = [&](const std::vector<double>& part, void* out) {
    for (int64_t j = 0; j < n; ++j) {
      double s = 0.0;
      for (int t = 0; t < nt; ++t) s += part[size_t(t) * n + j];
      if (p.dtype == DType::kFloat64) static_cast<double*>(out)[j] = s;
      else static_cast<float*>(out)[j] = float(s);
    }
  };
  if (want_dw) reduce(part_w, p.dweight);
  if (want_db) reduce(part_b, p.dbias);
}

}  // namespace llmcore
