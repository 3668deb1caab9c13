// SwiGLU on the CPU: see llmcore/swiglu.h for the math. The work is split into units of one
// row's block of kBlock columns, contiguous runs of units per thread (so one long row or many
// short ones both fill the team). The math runs in `omp simd` loops (the vectorisable exp of
// vmath.h), straight from input to output for fp32/fp64, through compute-type buffers for the
// 16-bit types; one rounding at the store.
#include "llmcore/swiglu.h"

#include <algorithm>
#include <type_traits>

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

// y = g s u; dg = dy u s (1 + g (1 - s)), du = dy g s (llmcore/swiglu.h)
template <typename C>
LLMCORE_ALWAYS_INLINE inline C swiglu_y(C g, C u) {
  C s, oms;
  sigmoid_pair(g, &s, &oms);
  return g * s * u;
}

template <typename C>
LLMCORE_ALWAYS_INLINE inline void swiglu_grads(C g, C u, C d, C* dg, C* du) {
  C s, oms;
  sigmoid_pair(g, &s, &oms);
  *dg = d * u * s * (C(1) + g * oms);
  *du = d * g * s;
}

// fp32 / fp64: one loop from the inputs to the outputs
template <typename T>
LLMCORE_ALWAYS_INLINE inline void block_direct(const T* xg, const T* dyr, T* out, int64_t f,
                                               int64_t n, bool backward) {
  if (!backward) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) out[i] = swiglu_y(xg[i], xg[f + i]);
    return;
  }
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) swiglu_grads(xg[i], xg[f + i], dyr[i], &out[i], &out[f + i]);
}

// fp16 / bf16: widened into compute-type buffers first and narrowed from them afterwards, each
// loop simple enough to vectorise (the conversions do not, fused with the math)
template <typename T>
LLMCORE_ALWAYS_INLINE inline void block_staged(const T* xg, const T* dyr, T* out, int64_t f,
                                               int64_t n, bool backward) {
  using C = compute_t<T>;
  alignas(64) C g[kBlock], u[kBlock], d[kBlock], a[kBlock], b[kBlock];
  for (int64_t i = 0; i < n; ++i) g[i] = widen(xg[i]);
  for (int64_t i = 0; i < n; ++i) u[i] = widen(xg[f + i]);
  if (!backward) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) a[i] = swiglu_y(g[i], u[i]);
    for (int64_t i = 0; i < n; ++i) out[i] = narrow<T>(a[i]);
    return;
  }
  for (int64_t i = 0; i < n; ++i) d[i] = widen(dyr[i]);
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) swiglu_grads(g[i], u[i], d[i], &a[i], &b[i]);
  for (int64_t i = 0; i < n; ++i) out[i] = narrow<T>(a[i]);
  for (int64_t i = 0; i < n; ++i) out[f + i] = narrow<T>(b[i]);
}

template <typename T>
LLMCORE_ALWAYS_INLINE inline void swiglu_units(const SwigluParams& p, int64_t u0, int64_t u1) {
  const int64_t f = p.cols, blocks = (f + kBlock - 1) / kBlock;
  const T* x = static_cast<const T*>(p.x);
  const T* dy = static_cast<const T*>(p.dy);
  T* out = static_cast<T*>(p.out);
  for (int64_t unit = u0; unit < u1; ++unit) {
    const int64_t r = unit / blocks, j0 = (unit % blocks) * kBlock;
    const int64_t n = std::min(kBlock, f - j0);
    const T* xg = x + r * p.x_stride + j0;        // gate block; up is F further on
    const T* dyr = p.backward ? dy + r * p.dy_stride + j0 : nullptr;
    T* o = out + (p.backward ? r * 2 * f : r * f) + j0;   // y (rows, F) or dx (rows, 2F)
    if constexpr (std::is_same_v<T, compute_t<T>>) {
      block_direct(xg, dyr, o, f, n, p.backward);
    } else {
      block_staged(xg, dyr, o, f, n, p.backward);
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
