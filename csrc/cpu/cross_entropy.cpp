// CPU cross-entropy forward and backward (formulas in llmcore/cross_entropy.h).
//
// Forward: one pass over each row in L1-sized blocks with an online logsumexp: per block, the
// capped logits are widened into a thread-local buffer, the running max m is raised to the block
// max (rescaling the running sum s by exp(m_old - m_new)), then s += sum exp(y - m) over the block
// (vectorised exp from vmath.h). Only lse = m + log(s) is kept for the backward, which recomputes
// p = exp(y - lse) and writes dlogits in one more pass. OpenMP over rows; a row belongs to one
// thread, so the result does not depend on the thread count.
#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "llmcore/cross_entropy.h"
#include "parallel.h"
#include "vmath.h"

namespace llmcore {
namespace {

constexpr int64_t kBlock = 2048;  // classes per block: 8 KiB of fp32, stays in L1

template <typename C>
double weight_sum(const C* w, int64_t classes) {
  if (w == nullptr) return double(classes);
  double s = 0.0;
  for (int64_t c = 0; c < classes; ++c) s += w[c];
  return s;
}

// buf[k] = cap(widen(x[k])) for one block; cap(x) = s tanh(x / s), or x without a softcap.
template <typename T, typename C>
LLMCORE_ALWAYS_INLINE inline void load_block(const T* x, int64_t n, C softcap, C* buf) {
  if (softcap > C(0)) {
    const C inv = C(1) / softcap;
#pragma omp simd
    for (int64_t k = 0; k < n; ++k) buf[k] = softcap * cpu::tanh_approx(widen(x[k]) * inv);
  } else {
    for (int64_t k = 0; k < n; ++k) buf[k] = widen(x[k]);
  }
}

// Problem-wide constants of one call.
template <typename C>
struct Setup {
  int64_t V;
  const C* w;                // class weights or null
  double e, W;               // label smoothing, sum of the class weights (if smoothing)
  C cap, inv_cap;            // softcap and 1/softcap (0, 0 without a cap)
  double z;                  // z_loss * z_ratio: the (unweighted) z-term's coefficient
  explicit Setup(const CrossEntropyParams& p)
      : V(p.classes), w(static_cast<const C*>(p.weight)), e(p.label_smoothing),
        W(p.label_smoothing > 0.0 ? weight_sum(w, p.classes) : 0.0), cap(C(p.softcap)),
        inv_cap(p.softcap > 0.0 ? C(1.0 / p.softcap) : C(0)),
        z(p.z_loss * (p.z_ratio ? double(*static_cast<const C*>(p.z_ratio)) : 1.0)) {}
};

// Forward of one valid row: returns lse, writes the row's loss. buf: kBlock scratch.
template <typename T, typename C>
LLMCORE_ALWAYS_INLINE inline double row_fwd(const Setup<C>& k, const T* x, int64_t t, C* buf,
                                            double* loss) {
  const int64_t V = k.V;
  const bool smoothing = k.e > 0.0;
  C m = -std::numeric_limits<C>::infinity();
  double s = 0.0;             // running sum of exp(y - m)
  double sum_wy = 0.0;        // sum_c w[c] y_c (label smoothing only)
  C y_t = C(0);
  for (int64_t c0 = 0; c0 < V; c0 += kBlock) {
    const int64_t n = std::min(kBlock, V - c0);
    load_block(x + c0, n, k.cap, buf);
    const C bmax = cpu::max_of(buf, n);
    if (bmax > m) {
      if (s > 0.0) s *= double(cpu::exp_nonpos(C(m - bmax)));
      m = bmax;
    }
    // while every logit so far is -inf (a masked vocabulary range), the block adds exp(-inf) = 0;
    // skipping it avoids exp(-inf - -inf) = nan
    if (m != -std::numeric_limits<C>::infinity()) s += cpu::sum_exp_shifted(buf, n, m);
    if (smoothing) {
      C by = C(0);
      if (k.w) {
#pragma omp simd reduction(+ : by)
        for (int64_t j = 0; j < n; ++j) by += k.w[c0 + j] * buf[j];
      } else {
#pragma omp simd reduction(+ : by)
        for (int64_t j = 0; j < n; ++j) by += buf[j];
      }
      sum_wy += by;
    }
    if (t >= c0 && t < c0 + n) y_t = buf[t - c0];
  }
  const double lse = double(m) + std::log(s);
  const double wt = k.w ? double(k.w[t]) : 1.0;
  double l = (1.0 - k.e) * wt * (lse - double(y_t)) + k.z * lse * lse;
  if (smoothing) l += k.e / double(V) * (k.W * lse - sum_wy);
  *loss = l;
  return lse;
}

// dy_c = (ga p_c - ge w_c) * (1 - tanh^2) for one block of n classes into out (compute type);
// the branches are resolved outside the loops so each loop vectorises.
template <typename T, typename C>
LLMCORE_ALWAYS_INLINE inline void block_bwd(const Setup<C>& k, const T* x, const C* w, int64_t n,
                                            C lse, C ga, C ge, C* out) {
  if (k.cap > C(0)) {
    if (w) {
#pragma omp simd
      for (int64_t c = 0; c < n; ++c) {
        const C th = cpu::tanh_approx(widen(x[c]) * k.inv_cap);
        out[c] = (ga * cpu::exp_nonpos(C(k.cap * th - lse)) - ge * w[c]) * (C(1) - th * th);
      }
    } else {
#pragma omp simd
      for (int64_t c = 0; c < n; ++c) {
        const C th = cpu::tanh_approx(widen(x[c]) * k.inv_cap);
        out[c] = (ga * cpu::exp_nonpos(C(k.cap * th - lse)) - ge) * (C(1) - th * th);
      }
    }
  } else if (w) {
#pragma omp simd
    for (int64_t c = 0; c < n; ++c) out[c] = ga * cpu::exp_nonpos(C(widen(x[c]) - lse)) - ge * w[c];
  } else {
#pragma omp simd
    for (int64_t c = 0; c < n; ++c) out[c] = ga * cpu::exp_nonpos(C(widen(x[c]) - lse)) - ge;
  }
}

// Backward of one valid row, g = dloss of the row (derivation in the header):
//   dlogits_c = g (p_c a - (e/C) w[c] - (1-e) w[t] [c == t]) * (1 - tanh^2) (softcap)
// dx may alias x (the in-place variant): each block is read before it is written, and the
// target's logit is read before the loop. buf: kBlock scratch (unused when T is C).
template <typename T, typename C>
LLMCORE_ALWAYS_INLINE inline void row_bwd(const Setup<C>& k, const T* x, T* dx, int64_t t, C lse,
                                          C g, C* buf) {
  const int64_t V = k.V;
  const double wt = k.w ? double(k.w[t]) : 1.0;
  const C a = C((1.0 - k.e) * wt + k.e / double(V) * k.W + 2.0 * k.z * double(lse));
  const C ga = g * a;
  const C ge = g * C(k.e / double(V));
  const C x_t = widen(x[t]);
  for (int64_t c0 = 0; c0 < V; c0 += kBlock) {
    const int64_t n = std::min(kBlock, V - c0);
    const C* w = k.w ? k.w + c0 : nullptr;
    if constexpr (std::is_same_v<T, C>) {
      block_bwd(k, x + c0, w, n, lse, ga, ge, dx + c0);
    } else {
      block_bwd(k, x + c0, w, n, lse, ga, ge, buf);
      for (int64_t j = 0; j < n; ++j) dx[c0 + j] = narrow<T>(buf[j]);
    }
  }
  // the target's own term, -g (1-e) w[t], through the same softcap derivative
  const C hot = g * C((1.0 - k.e) * wt);
  const C w_t = k.w ? k.w[t] : C(1);
  if (k.cap > C(0)) {
    const C th = cpu::tanh_approx(x_t * k.inv_cap);
    const C pt = cpu::exp_nonpos(C(k.cap * th - lse));
    dx[t] = narrow<T>((ga * pt - ge * w_t - hot) * (C(1) - th * th));
  } else {
    dx[t] = narrow<T>(ga * cpu::exp_nonpos(C(x_t - lse)) - ge * w_t - hot);
  }
}

// mode: forward (loss, lse), backward (dlogits from lse and dloss), or both in one call
// (loss, lse and dlogits; dlogits may be the logits buffer itself).
enum class Mode { kFwd, kBwd, kFwdBwd };

// Rows [r0, r1) of one call. Inlined into the per-ISA clones below.
template <typename T>
LLMCORE_ALWAYS_INLINE inline void rows(const CrossEntropyParams& p, Mode mode, int64_t r0,
                                       int64_t r1) {
  using C = compute_t<T>;
  const Setup<C> k(p);
  const int64_t V = p.classes;
  const T* logits = static_cast<const T*>(p.logits);
  T* dlogits = static_cast<T*>(p.dlogits);
  C* loss_out = static_cast<C*>(p.loss);
  C* lse_io = static_cast<C*>(p.lse);
  const C* dloss = static_cast<const C*>(p.dloss);
  std::vector<C> buf(std::min(V, kBlock));
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t t = p.target[r];
    const T* x = logits + r * V;
    if (t == p.ignore_index) {
      if (mode != Mode::kBwd) loss_out[r] = lse_io[r] = C(0);
      if (mode != Mode::kFwd) std::fill(dlogits + r * V, dlogits + (r + 1) * V, narrow<T>(C(0)));
      continue;
    }
    C lse;
    if (mode == Mode::kBwd) {
      lse = lse_io[r];
    } else {
      double l;
      lse = C(row_fwd(k, x, t, buf.data(), &l));
      loss_out[r] = C(l);
      lse_io[r] = lse;
    }
    if (mode != Mode::kFwd) row_bwd(k, x, dlogits + r * V, t, lse, dloss[r * p.dloss_stride], buf.data());
  }
}

// One function per element type, compiled for several x86 ISA levels (runtime dispatch).
LLMCORE_CPU_CLONES void rows_f32(const CrossEntropyParams& p, Mode m, int64_t r0, int64_t r1) {
  rows<float>(p, m, r0, r1);
}
LLMCORE_CPU_CLONES void rows_f16(const CrossEntropyParams& p, Mode m, int64_t r0, int64_t r1) {
  rows<Half>(p, m, r0, r1);
}
LLMCORE_CPU_CLONES void rows_bf16(const CrossEntropyParams& p, Mode m, int64_t r0, int64_t r1) {
  rows<BFloat16>(p, m, r0, r1);
}
LLMCORE_CPU_CLONES void rows_f64(const CrossEntropyParams& p, Mode m, int64_t r0, int64_t r1) {
  rows<double>(p, m, r0, r1);
}

void run(const CrossEntropyParams& p, Mode mode) {
  auto* fn = p.dtype == DType::kFloat32 ? rows_f32
             : p.dtype == DType::kFloat16 ? rows_f16
             : p.dtype == DType::kBFloat16 ? rows_bf16 : rows_f64;
  cpu::run_chunks(p.rows, p.classes, p.num_threads,
                  [&](int64_t r0, int64_t r1) { fn(p, mode, r0, r1); });
}

}  // namespace

void cross_entropy_fwd_cpu(const CrossEntropyParams& p) { run(p, Mode::kFwd); }
void cross_entropy_bwd_cpu(const CrossEntropyParams& p) { run(p, Mode::kBwd); }
void cross_entropy_fwd_bwd_cpu(const CrossEntropyParams& p) { run(p, Mode::kFwdBwd); }

}  // namespace llmcore
