// GELU on the CPU: see llmcore/gelu.h for the math. The work is split into row blocks
// (rowwise.h); the math runs in `omp simd` loops over vmath.h's vectorisable exp, sigmoid and
// normal CDF, straight from input to output for fp32/fp64, through compute-type buffers for the
// 16-bit types; one rounding at the store.
#include "llmcore/gelu.h"

#include <type_traits>

#include "rowwise.h"
#include "vmath.h"

namespace llmcore {
namespace {

using cpu::kRowBlock;

template <typename C>
struct Consts {
  static constexpr C kSqrt2OverPi = C(0.79788456080286535588);
  static constexpr C kCubic = C(0.044715);
  static constexpr C kRSqrt2Pi = C(0.39894228040143267794);   // 1 / sqrt(2 pi)
};

template <typename C>
LLMCORE_ALWAYS_INLINE inline C exact_y(C x) {
  C cdf, upper;
  cpu::normal_cdf_pair(x, &cdf, &upper);
  return x * cdf;
}

template <typename C>
LLMCORE_ALWAYS_INLINE inline C exact_dx(C x, C d) {
  C cdf, upper;
  cpu::normal_cdf_pair(x, &cdf, &upper);
  const C pdf = Consts<C>::kRSqrt2Pi * cpu::exp_nonpos(C(-0.5) * x * x);
  return d * (cdf + x * pdf);
}

template <typename C>
LLMCORE_ALWAYS_INLINE inline C tanh_y(C x) {
  C s, oms;
  cpu::sigmoid_pair(C(2) * Consts<C>::kSqrt2OverPi * x * (C(1) + Consts<C>::kCubic * x * x), &s,
                    &oms);
  return x * s;
}

template <typename C>
LLMCORE_ALWAYS_INLINE inline C tanh_dx(C x, C d) {
  const C x2 = x * x;
  C s, oms;
  cpu::sigmoid_pair(C(2) * Consts<C>::kSqrt2OverPi * x * (C(1) + Consts<C>::kCubic * x2), &s,
                    &oms);
  const C dz = Consts<C>::kSqrt2OverPi * (C(1) + C(3) * Consts<C>::kCubic * x2);
  return d * s * (C(1) + C(2) * x * oms * dz);
}

// n elements of one form and direction, compute type in and out
template <typename C>
LLMCORE_ALWAYS_INLINE inline void gelu_block(const C* x, const C* d, C* out, int64_t n,
                                             bool tanh, bool backward) {
  if (tanh && !backward) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) out[i] = tanh_y(x[i]);
  } else if (tanh) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) out[i] = tanh_dx(x[i], d[i]);
  } else if (!backward) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) out[i] = exact_y(x[i]);
  } else {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) out[i] = exact_dx(x[i], d[i]);
  }
}

template <typename T>
LLMCORE_ALWAYS_INLINE inline void gelu_units(const GeluParams& p, int64_t u0, int64_t u1) {
  using C = compute_t<T>;
  const T* x = static_cast<const T*>(p.x);
  const T* dy = static_cast<const T*>(p.dy);
  T* out = static_cast<T*>(p.out);
  cpu::for_row_blocks(p.cols, u0, u1, [&](int64_t r, int64_t j0, int64_t n) LLMCORE_ALWAYS_INLINE {
    const T* xr = x + r * p.x_stride + j0;
    const T* dyr = p.backward ? dy + r * p.dy_stride + j0 : nullptr;
    T* o = out + r * p.cols + j0;
    if constexpr (std::is_same_v<T, C>) {
      gelu_block(xr, dyr, o, n, p.tanh, p.backward);
    } else {
      alignas(64) C xb[kRowBlock], db[kRowBlock], ob[kRowBlock];
      cpu::widen_n(xr, xb, n);
      if (p.backward) cpu::widen_n(dyr, db, n);
      gelu_block(xb, db, ob, n, p.tanh, p.backward);
      cpu::narrow_n(ob, o, n);
    }
  });
}

#define LLMCORE_GELU_UNITS(name, T)                                          \
  LLMCORE_CPU_CLONES void name(const GeluParams& p, int64_t u0, int64_t u1) { \
    gelu_units<T>(p, u0, u1);                                                \
  }
LLMCORE_GELU_UNITS(gelu_f32, float)
LLMCORE_GELU_UNITS(gelu_f16, Half)
LLMCORE_GELU_UNITS(gelu_bf16, BFloat16)
LLMCORE_GELU_UNITS(gelu_f64, double)
#undef LLMCORE_GELU_UNITS

}  // namespace

void gelu_cpu(const GeluParams& p) {
  if (p.rows == 0 || p.cols == 0) return;
  auto* fn = p.dtype == DType::kFloat32 ? gelu_f32
             : p.dtype == DType::kFloat16 ? gelu_f16
             : p.dtype == DType::kBFloat16 ? gelu_bf16 : gelu_f64;
  cpu::run_row_blocks(p.rows, p.cols, p.num_threads,
                      [&](int64_t u0, int64_t u1) { fn(p, u0, u1); });
}

}  // namespace llmcore
