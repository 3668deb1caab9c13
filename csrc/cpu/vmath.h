// Branch-free fp32 exp, tanh, sigmoid and normal CDF that the compiler vectorises inside
// `#pragma omp simd` loops (libm's expf/tanhf are scalar calls unless -ffast-math, which the
// build does not use). fp64 overloads call libm: fp64 is the exactness path, not the fast one.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

namespace llmcore {
namespace cpu {

#pragma omp declare simd
inline float exp_nonpos(float x);

// exp(x) for x <= 0 (larger x is not supported), about 1-2 ulp. x = n ln2 + r with
// |r| <= ln2/2 (Cody-Waite split of ln2 so r is exact), exp(r) by its degree-7 Taylor
// polynomial (truncation error < 1e-8 relative), times 2^n built in the exponent bits.
// Results below 2^-126 (x < -87.33) flush to 0.
#pragma omp declare simd
inline float exp_nonpos(float x) {
  const float lim = -87.33f;
  const float xc = x < lim ? lim : x;
  // nearest integer by the 1.5 * 2^23 trick (exact for |t| < 2^22; the sum is not re-associated
  // without -ffast-math)
  const float t = xc * 1.44269504088896341f;
  const float k = (t + 12582912.0f) - 12582912.0f;
  const float r = (xc - k * 0.693359375f) - k * -2.12194440e-4f;
  float p = 1.0f / 5040.0f;
  p = p * r + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const int32_t n = int32_t(k);
  const uint32_t bits = uint32_t(n + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return x < lim ? 0.0f : p * scale;
}

inline double exp_nonpos(double x) { return std::exp(x); }

// tanh(u), about 2-3 ulp: an odd Taylor polynomial for |u| < 0.25, else
// sign(u) (1 - e) / (1 + e) with e = exp(-2|u|) (no cancellation there: 1 - e >= 0.39).
#pragma omp declare simd
inline float tanh_approx(float u) {
  const float a = u < 0.f ? -u : u;
  const float u2 = u * u;
  float q = 62.0f / 2835.0f;
  q = q * u2 - 17.0f / 315.0f;
  q = q * u2 + 2.0f / 15.0f;
  q = q * u2 - 1.0f / 3.0f;
  const float small = u + u * u2 * q;
  const float e = exp_nonpos(-2.0f * a);
  const float big = (1.0f - e) / (1.0f + e);
  return a < 0.25f ? small : (u < 0.f ? -big : big);
}

inline double tanh_approx(double u) { return std::tanh(u); }

// sigmoid(g) and 1 - sigmoid(g), both without cancellation: from e = exp(-|g|) <= 1,
// q = 1 / (1 + e) = sigmoid(|g|) is one of them and e q the other.
template <typename C>
inline void sigmoid_pair(C g, C* s, C* one_minus_s) {
  const C e = exp_nonpos(g < C(0) ? g : -g);
  const C q = C(1) / (C(1) + e);
  *s = g >= C(0) ? q : e * q;
  *one_minus_s = g >= C(0) ? e * q : q;
}

// Phi(x), the standard normal CDF, and 1 - Phi(x), both without cancellation: Phi = sigmoid(g)
// with g = logit(Phi), odd, evaluated as x P(x^2). P (degree 6) is our own weighted
// least-squares fit to logit(Phi(x)) / x on 8000 Chebyshev nodes of [0, 8], each weighted by
// max(1, x) Phi (1 - Phi), the error of x Phi per unit error of g: in exact arithmetic
// |x (sigmoid(x P(x^2)) - Phi(x))| <= 8.2e-8 max(1, |x|) for all x (beyond 8 the fitted g keeps
// growing, faster than the true one, so Phi goes to 0 and 1 as it should; past |x| ~ 4000 g
// overflows to +-inf, which sigmoid_pair maps to exactly 0 and 1). About the cost of the tanh
// form: seven fmas more than its cubic.
#pragma omp declare simd
inline void normal_cdf_pair(float x, float* cdf, float* one_minus_cdf) {
  const float s = x * x;
  float p = 3.68851744e-09f;
  p = p * s - 2.70453543e-07f;
  p = p * s + 7.99848542e-06f;
  p = p * s - 0.000110950699f;
  p = p * s - 6.45198798e-05f;
  p = p * s + 0.0726657747f;
  p = p * s + 1.59576988f;
  sigmoid_pair(x * p, cdf, one_minus_cdf);
}

inline void normal_cdf_pair(double x, double* cdf, double* one_minus_cdf) {
  *cdf = 0.5 * std::erfc(-x * 0.70710678118654752440);
  *one_minus_cdf = 0.5 * std::erfc(x * 0.70710678118654752440);
}

// max_j y[j] (-inf for n = 0), with lane accumulators like sum_exp_shifted below.
template <typename C>
inline C max_of(const C* y, int64_t n) {
  constexpr int kLanes = 16;
  C acc[kLanes];
  for (int l = 0; l < kLanes; ++l) acc[l] = -std::numeric_limits<C>::infinity();
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes)
    for (int l = 0; l < kLanes; ++l) acc[l] = acc[l] > y[j + l] ? acc[l] : y[j + l];
  C m = -std::numeric_limits<C>::infinity();
  for (; j < n; ++j) m = m > y[j] ? m : y[j];
  for (int l = 0; l < kLanes; ++l) m = m > acc[l] ? m : acc[l];
  return m;
}

// N values of C as one GCC vector type: each x86 ISA clone splits it into its own registers
// (xmm, ymm or zmm), so the same code runs everywhere. vload / vstore are unaligned and take
// the vector by reference (no vector-typed argument crossing an ABI).
template <typename C, int N>
struct Lanes {
  typedef C type __attribute__((vector_size(N * sizeof(C))));
};
template <typename C, int N>
using LanesOf = typename Lanes<C, N>::type;

template <typename V, typename C>
__attribute__((always_inline)) inline void vload(V& v, const C* p) {
  std::memcpy(&v, p, sizeof v);
}

template <typename V, typename C>
__attribute__((always_inline)) inline void vstore(C* p, const V& v) {
  std::memcpy(p, &v, sizeof v);
}

// Row sums in the compute type's vector lanes, each lane's partial folded into an fp64 lane
// every kFoldLen terms (and the lanes summed in fp64, pairwise in a fixed order): nearly the
// speed of a plain C sum, with an error close to an fp64 sum's however long the row. The
// fixed-width lane loops are what GCC vectorises reliably.
constexpr int kSumLanes = 16;
constexpr int64_t kFoldLen = 16;  // terms per lane between folds

// kSumLanes lane sums added pairwise in a fixed order (lane l with lane l + 8, then l + 4,
// ...): 4 dependent additions of whole vectors instead of a chain of 16 scalar ones, which
// bound a short row's reduction (a 128-wide norm row; an attention score row of one tile).
template <typename T>
__attribute__((always_inline)) inline T sum_lanes(const T* acc) {
  T t[kSumLanes];
  for (int l = 0; l < kSumLanes; ++l) t[l] = acc[l];
  for (int w = kSumLanes / 2; w > 0; w /= 2)
    for (int l = 0; l < w; ++l) t[l] += t[l + w];
  return t[0];
}

// sum_j a[j] (b == nullptr) or sum_j a[j] * b[j]
template <typename C>
__attribute__((always_inline)) inline double dot_lanes(const C* a, const C* b, int64_t n) {
  constexpr int kL = kSumLanes;
  const int64_t whole = n - n % kL;
  double acc[kL] = {};
  for (int64_t j = 0; j < whole; j += kFoldLen * kL) {
    const int64_t end = std::min<int64_t>(j + kFoldLen * kL, whole);
    C part[kL] = {};
    if (b == nullptr) {
      for (int64_t t = j; t < end; t += kL)
        for (int l = 0; l < kL; ++l) part[l] += a[t + l];
    } else {
      for (int64_t t = j; t < end; t += kL)
        for (int l = 0; l < kL; ++l) part[l] += a[t + l] * b[t + l];
    }
    for (int l = 0; l < kL; ++l) acc[l] += double(part[l]);
  }
  double s = 0.0;
  for (int64_t j = whole; j < n; ++j) s += b == nullptr ? double(a[j]) : double(a[j]) * double(b[j]);
  return s + sum_lanes(acc);
}

// sum_j (a[j] - mean)^2
template <typename C>
__attribute__((always_inline)) inline double sum_sq_dev_lanes(const C* a, int64_t n, C mean) {
  constexpr int kL = kSumLanes;
  const int64_t whole = n - n % kL;
  double acc[kL] = {};
  for (int64_t j = 0; j < whole; j += kFoldLen * kL) {
    const int64_t end = std::min<int64_t>(j + kFoldLen * kL, whole);
    C part[kL] = {};
    for (int64_t t = j; t < end; t += kL)
      for (int l = 0; l < kL; ++l) {
        const C d = a[t + l] - mean;
        part[l] += d * d;
      }
    for (int l = 0; l < kL; ++l) acc[l] += double(part[l]);
  }
  double s = 0.0;
  for (int64_t j = whole; j < n; ++j) s += double(a[j] - mean) * double(a[j] - mean);
  return s + sum_lanes(acc);
}

// sum_j exp(y[j] - m) for y[j] <= m. Explicit lane accumulators: GCC lowers an `omp simd`
// reduction around the inlined exp into a scalar loop here, while this fixed-width inner loop
// is vectorised reliably. The order of the additions is fixed (deterministic).
template <typename C>
inline C sum_exp_shifted(const C* y, int64_t n, C m) {
  constexpr int kLanes = 16;
  C acc[kLanes] = {};
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes)
    for (int l = 0; l < kLanes; ++l) acc[l] += exp_nonpos(C(y[j + l] - m));
  C s = C(0);
  for (; j < n; ++j) s += exp_nonpos(C(y[j] - m));
  for (int l = 0; l < kLanes; ++l) s += acc[l];
  return s;
}

}  // namespace cpu
}  // namespace llmcore
