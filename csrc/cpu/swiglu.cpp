// SwiGLU on the CPU: see llmcore/swiglu.h for the math. The work is split into row blocks
// (rowwise.h). The math runs in `omp simd` loops (the vectorisable exp of
// vmath.h), straight from input to output for fp32/fp64, through compute-type buffers for the
// 16-bit types; one rounding at the store.
#include "llmcore/swiglu.h"

#include <algorithm>
#include <type_traits>

#include "rowwise.h"
#include "vmath.h"

namespace llmcore {
namespace {

using cpu::kRowBlock;

// y = g s u; dg = dy u s (1 + g (1 - s)), du = dy g s (llmcore/swiglu.h)
template <typename C>
LLMCORE_ALWAYS_INLINE inline C swiglu_y(C g, C u) {
  C s, oms;
  cpu::sigmoid_pair(g, &s, &oms);
  return g * s * u;
}

template <typename C>
LLMCORE_ALWAYS_INLINE inline void swiglu_grads(C g, C u, C d, C* dg, C* du) {
  C s, oms;
  cpu::sigmoid_pair(g, &s, &oms);
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
  alignas(64) C g[kRowBlock], u[kRowBlock], d[kRowBlock], a[kRowBlock], b[kRowBlock];
  cpu::widen_n(xg, g, n);
  cpu::widen_n(xg + f, u, n);
  if (!backward) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) a[i] = swiglu_y(g[i], u[i]);
    cpu::narrow_n(a, out, n);
    return;
  }
  cpu::widen_n(dyr, d, n);
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) swiglu_grads(g[i], u[i], d[i], &a[i], &b[i]);
  cpu::narrow_n(a, out, n);
  cpu::narrow_n(b, out + f, n);
}

template <typename T>
LLMCORE_ALWAYS_INLINE inline void swiglu_units(const SwigluParams& p, int64_t u0, int64_t u1) {
  const int64_t f = p.cols;
  const T* x = static_cast<const T*>(p.x);
  const T* dy = static_cast<const T*>(p.dy);
  T* out = static_cast<T*>(p.out);
  cpu::for_row_blocks(f, u0, u1, [&](int64_t r, int64_t j0, int64_t n) LLMCORE_ALWAYS_INLINE {
    const T* xg = x + r * p.x_stride + j0;        // gate block; up is F further on
    const T* dyr = p.backward ? dy + r * p.dy_stride + j0 : nullptr;
    T* o = out + (p.backward ? r * 2 * f : r * f) + j0;   // y (rows, F) or dx (rows, 2F)
    if constexpr (std::is_same_v<T, compute_t<T>>) {
      block_direct(xg, dyr, o, f, n, p.backward);
    } else {
      block_staged(xg, dyr, o, f, n, p.backward);
    }
  });
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
  cpu::run_row_blocks(p.rows, p.cols, p.num_threads,
                      [&](int64_t u0, int64_t u1) { fn(p, u0, u1); });
}

}  // namespace llmcore
