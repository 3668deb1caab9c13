// Branch-free fp32 exp and tanh that the compiler vectorises inside `#pragma omp simd` loops
// (libm's expf/tanhf are scalar calls unless -ffast-math, which the build does not use). fp64
// overloads call libm: fp64 is the exactness path, not the fast one.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

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

}  // namespace cpu
}  // namespace llmcore
