// SwiGLU on the CPU: see llmcore/swiglu.h for the math. The work is split into units of one
// row's block of kBlock columns, contiguous runs of units per thread (so one long row or many
// short ones both fill the team). Each block is widened into compute-type buffers, computed in
// one `omp simd` loop (the vectorisable exp of vmath.h), and narrowed once at the store.
#include "llmcore/swiglu.h"

#include <algorithm>

#include "parallel.h"
#include "vmath.h"

namespace llmcore {
namespace {

constexpr int64_t kBlock = 256;

// s = sigmoid(g) and 1 - s, from e = exp(-|g|) <= 1 (no overflow, no cancellation in 1 - s)
template <typename C>
LLMCORE_ALWAYS_INLINE inline void sigmoid_pair(C g, C* s, C* one_minus_s) {
  const C e = cpu::exp_nonpos(g < C(0) ? g : -g);
  const C q = C(1) / (C(1) + e);                  // sigmoid(|g|)
  *s = g >= C(0) ? q : e * q;
  *one_minus_s = g >= C(0) ? e * q : q;
}

template <typename T>
LLMCORE_ALWAYS_INLINE inline void swiglu_units(const SwigluParams& p, int64_t u0, int64_t u1) {
  using C = compute_t<T>;
  const int64_t f = p.cols, blocks = (f + kBlock - 1) / kBlock;
  alignas(64) C g[kBlock], u[kBlock], d[kBlock], a[kBlock], b[kBlock];
  const T* x = static_cast<const T*>(p.x);
  const T* dy = static_cast<const T*>(p.dy);
  T* out = static_cast<T*>(p.out);
  for (int64_t unit = u0; unit < u1; ++unit) {
    const int64_t r = unit / blocks, j0 = (unit % blocks) * kBlock;
    const int64_t n = std::min(kBlock, f - j0);
    const T* xg = x + r * p.x_stride + j0;        // gate block; up is F further on
    for (int64_t i = 0; i < n; ++i) {
      g[i] = C(widen(xg[i]));
      u[i] = C(widen(xg[f + i]));
    }
    if (!p.backward) {
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) {
        C s, oms;
        sigmoid_pair(g[i], &s, &oms);
        a[i] = g[i] * s * u[i];
      }
      T* y = out + r * f + j0;
      for (int64_t i = 0; i < n; ++i) y[i] = narrow<T>(a[i]);
      continue;
    }
    const T* dyr = dy + r * p.dy_stride + j0;
    for (int64_t i = 0; i < n; ++i) d[i] = C(widen(dyr[i]));
    // dgate = dy u s (1 + g (1 - s)), dup = dy g s
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) {
      C s, oms;
      sigmoid_pair(g[i], &s, &oms);
      a[i] = d[i] * u[i] * s * (C(1) + g[i] * oms);
      b[i] = d[i] * g[i] * s;
    }
    T* dx = out + r * 2 * f + j0;
    for (int64_t i = 0; i < n; ++i) {
      dx[i] = narrow<T>(a[i]);
      dx[f + i] = narrow<T>(b[i]);
    }
  }
}

#define LLMCORE_SWIGLU_UNITS(name, T)                                          \
  LLMCORE_CPU_CLONES void name(const SwigluParams& p, int64_t u0, int64_t u1) { \
    swiglu_units<T>(p, u0, u1);                                                \
  }
LLMCORE_SWIGLU_UNITS(swiglu_f32, float)
LLMCORE_SWIGLU_UNITS(swiglu_f16, Half)
LLMCORE_SWIGLU_UNITS(swiglu_bf16, BFloat16)
LLMCORE_SWIGLU_UNITS(swiglu_f64, double)
#undef LLMCORE_SWIGLU_UNITS

}  // namespace

void swiglu_cpu(const SwigluParams& p) {
  if (p.rows == 0 || p.cols == 0) return;
  auto* fn = p.dtype == DType::kFloat32 ? swiglu_f32
             : p.dtype == DType::kFloat16 ? swiglu_f16
             : p.dtype == DType::kBFloat16 ? swiglu_bf16 : swiglu_f64;
  const int64_t units = p.rows * ((p.cols + kBlock - 1) / kBlock);
  cpu::run_team(cpu::team_size(units, std::min(p.cols, kBlock), p.num_threads), [&] {
    int64_t u0, u1;
    cpu::chunk(units, cpu::team_threads(), cpu::thread_id(), &u0, &u1);
    fn(p, u0, u1);
  });
}

}  // namespace llmcore
