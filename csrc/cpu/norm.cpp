// CPU layer_norm / rms_norm, forward and backward, with the fused residual add.
//
// One row at a time per thread (OpenMP over rows, static contiguous chunks): the row is widened
// to the compute type C (fp32, fp64 for fp64 inputs) into thread-local buffers that stay in
// L1/L2 (fp32 rows are read in place), so each pass reads its inputs from memory once and
// writes its output once. Statistics are summed in C lanes folded into fp64 every few terms
// (cpu::dot_lanes: C's speed, an error close to an fp64 sum's), outputs are rounded to T once.
// Weight/bias gradients: per-thread C partial sums over kFoldRows rows, folded into fp64
// partials that are reduced in thread order, so the result is deterministic for a given thread
// count. The row loops are compiled per x86 ISA level (LLMCORE_CPU_CLONES).
#include <cmath>
#include <type_traits>
#include <vector>

#include "llmcore/norm.h"
#include "parallel.h"
#include "vmath.h"

namespace llmcore {
namespace {

constexpr int64_t kFoldRows = 16;  // rows summed in C before the fp64 weight-gradient partials

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
  // fp32/fp64: read x's row where it is, or with a residual the row of h just written (still
  // in L1); no scratch copy
  constexpr bool kInPlace = std::is_same<T, C>::value;
  std::vector<C> buf(kInPlace ? 0 : n);
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t off = r * n;
    const C* hb;
    if constexpr (kInPlace) {
      if (res == nullptr) {
        hb = x + off;
      } else {
        const T* __restrict__ xr = x + off;
        const T* __restrict__ rr = res + off;
        T* __restrict__ hr = h + off;
#pragma omp simd
        for (int64_t j = 0; j < n; ++j) hr[j] = xr[j] + rr[j];
        hb = hr;
      }
    } else {
      load_row(x + off, res ? res + off : nullptr, h ? h + off : nullptr, buf.data(), n);
      hb = buf.data();
    }
    const C mu = p.rms ? C(0) : C(cpu::dot_lanes<C>(hb, nullptr, n) / double(n));
    const double var = cpu::sum_sq_dev_lanes(hb, n, mu) / double(n);
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

template <typename C>
using LanesOf = cpu::LanesOf<C, cpu::kSumLanes>;

// kSumLanes consecutive T into a vector of C, widened
template <typename C, typename T>
LLMCORE_ALWAYS_INLINE inline void load_lanes(LanesOf<C>& v, const T* p) {
  if constexpr (std::is_same<T, C>::value) {
    cpu::vload(v, p);
  } else {
    C tmp[cpu::kSumLanes];
    for (int l = 0; l < cpu::kSumLanes; ++l) tmp[l] = widen(p[l]);
    cpu::vload(v, tmp);
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
  // L1/L2 scratch: this thread's C partials of dweight and dbias over the last < kFoldRows
  // rows, ones standing in for a missing weight, and (fp16/bf16 rows) xhat and g of the row;
  // fp32/fp64 rows recompute them from h and dy, still in cache, in the second pass.
  constexpr bool kInPlace = std::is_same<T, C>::value;
  std::vector<C> bufs((kInPlace ? 3 : 5) * n, C(0));
  C* sw = bufs.data();
  C* sb = sw + n;
  C* ones = sb + n;
  C* xh = kInPlace ? nullptr : ones + n;
  C* g = kInPlace ? nullptr : xh + n;
  std::fill(ones, ones + n, C(1));
  const C* wv = w ? w : ones;
  auto fold = [&] {
    if (pw)
      for (int64_t j = 0; j < n; ++j) pw[j] += double(sw[j]);
    if (pb)
      for (int64_t j = 0; j < n; ++j) pb[j] += double(sb[j]);
    std::fill(sw, sw + 2 * n, C(0));
  };
  constexpr int kL = cpu::kSumLanes;
  const int64_t whole = n - n % kL;
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t off = r * n;
    const C mu = p.rms ? C(0) : mean[r];
    const C rstd = rstd_in[r];
    const T* hr = h + off;
    const T* dyr = dy + off;
    // the next row's h and dy are asked for a line at a time alongside this row's loads: a
    // row of 4 KiB is a page, where the hardware prefetchers likely start over (~8% of
    // the backward at 8192 x 1024 fp32; a burst of prefetches per row was slower than none)
    const T* hn = r + 1 < r1 ? hr + n : nullptr;
    const T* dyn = r + 1 < r1 ? dyr + n : nullptr;
    // one pass over h and dy: xhat, g, the weight-gradient partials, and sum(g), sum(g * xhat)
    // in C lanes folded into fp64 as cpu::dot_lanes does
    double lane_a[kL] = {}, lane_c[kL] = {};
    for (int64_t j = 0; j < whole; j += cpu::kFoldLen * kL) {
      const int64_t end = std::min<int64_t>(j + cpu::kFoldLen * kL, whole);
      // the lane sums as GCC vectors, so they stay in registers across the steps (as arrays
      // GCC kept them on the stack: a store-to-load round trip per step, the loop's bound)
      LanesOf<C> pa = {}, pc = {};
      for (int64_t t = j; t < end; t += kL) {
        if (hn != nullptr) {
          __builtin_prefetch(hn + t, 0, 3);
          __builtin_prefetch(dyn + t, 0, 3);
        }
        LanesOf<C> dv, hv, wl, swl, sbl;
        load_lanes<C>(dv, dyr + t);
        load_lanes<C>(hv, hr + t);
        load_lanes<C>(wl, wv + t);
        load_lanes<C>(swl, sw + t);
        load_lanes<C>(sbl, sb + t);
        const LanesOf<C> xv = (hv - mu) * rstd;
        const LanesOf<C> gv = dv * wl;
        if constexpr (!kInPlace) {
          cpu::vstore(xh + t, xv);
          cpu::vstore(g + t, gv);
        }
        pa += gv;
        pc += gv * xv;
        swl += dv * xv;
        sbl += dv;
        cpu::vstore(sw + t, swl);
        cpu::vstore(sb + t, sbl);
      }
      for (int l = 0; l < kL; ++l) {
        lane_a[l] += double(pa[l]);
        lane_c[l] += double(pc[l]);
      }
    }
    double sum_g = 0.0, sum_gx = 0.0;
    for (int64_t k = whole; k < n; ++k) {
      const C dv = widen(dyr[k]);
      const C xv = (widen(hr[k]) - mu) * rstd;
      const C gv = dv * wv[k];
      if constexpr (!kInPlace) {
        xh[k] = xv;
        g[k] = gv;
      }
      sum_g += double(gv);
      sum_gx += double(gv) * double(xv);
      sw[k] += dv * xv;
      sb[k] += dv;
    }
    sum_g += cpu::sum_lanes(lane_a);
    sum_gx += cpu::sum_lanes(lane_c);
    const C a = p.rms ? C(0) : C(sum_g / double(n));
    const C c = C(sum_gx / double(n));
    T* dxr = dx + off;
    const T* dhr = dhout ? dhout + off : nullptr;
    if constexpr (kInPlace) {
      if (dhr) {
        for (int64_t j = 0; j < n; ++j)
          dxr[j] = rstd * (dyr[j] * wv[j] - a - (hr[j] - mu) * rstd * c) + dhr[j];
      } else {
        for (int64_t j = 0; j < n; ++j)
          dxr[j] = rstd * (dyr[j] * wv[j] - a - (hr[j] - mu) * rstd * c);
      }
    } else {
      if (dhr) {
        for (int64_t j = 0; j < n; ++j)
          dxr[j] = narrow<T>(rstd * (g[j] - a - xh[j] * c) + widen(dhr[j]));
      } else {
        for (int64_t j = 0; j < n; ++j) dxr[j] = narrow<T>(rstd * (g[j] - a - xh[j] * c));
      }
    }
    if ((r - r0) % kFoldRows == kFoldRows - 1 || r == r1 - 1) fold();
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
  cpu::run_chunks(p.rows, p.cols, p.num_threads, [&](int64_t r0, int64_t r1) { fn(p, r0, r1); });
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
  cpu::run_team(nt, [&] {
    const int tid = cpu::thread_id();
    int64_t r0, r1;
    cpu::chunk(p.rows, cpu::team_threads(), tid, &r0, &r1);
    fn(p, r0, r1, want_dw ? part_w.data() + size_t(tid) * n : nullptr,
       want_db ? part_b.data() + size_t(tid) * n : nullptr);
  });
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
