// Element types the kernels accept, and scalar conversions between them and the compute type for
// the CPU kernels (the CUDA kernels use cuda_fp16.h / cuda_bf16.h instead). No torch types here:
// the kernels see plain pointers, and the element type travels as a DType tag.
//
// Compute type: fp64 for fp64 tensors, fp32 for everything else. widen(T) gives it, narrow<T>
// rounds it back once at the store.
#pragma once

#include <cstdint>
#include <cstring>

namespace llmcore {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2, kFloat64 = 3 };

// Storage types for the two 16-bit formats: raw bits, arithmetic happens in fp32.
struct Half { uint16_t bits; };
struct BFloat16 { uint16_t bits; };

inline uint32_t float_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}

inline float bits_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

// bf16 is the upper half of an fp32: widening is a shift.
inline float to_float(BFloat16 v) { return bits_float(uint32_t(v.bits) << 16); }

// fp32 -> bf16, round to nearest even; NaN stays a (quiet) NaN.
inline BFloat16 to_bfloat16(float f) {
  uint32_t u = float_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return BFloat16{uint16_t((u >> 16) | 0x0040u)};
  u += 0x7fffu + ((u >> 16) & 1u);  // ties go to the even upper half
  return BFloat16{uint16_t(u >> 16)};
}

// fp16 -> fp32. fp16: 1 sign, 5 exponent (bias 15), 10 mantissa bits.
inline float to_float(Half v) {
  const uint32_t sign = uint32_t(v.bits & 0x8000u) << 16;
  const uint32_t exp = (v.bits >> 10) & 0x1fu;
  const uint32_t mant = v.bits & 0x3ffu;
  if (exp == 0x1fu) return bits_float(sign | 0x7f800000u | (mant << 13));  // inf / NaN
  if (exp == 0) {
    // zero or subnormal: mant * 2^-24, exact in fp32
    const float mag = float(mant) * 5.9604644775390625e-8f;
    return sign ? -mag : mag;
  }
  return bits_float(sign | ((exp + (127 - 15)) << 23) | (mant << 13));
}

// fp32 -> fp16, round to nearest even; overflow to inf, NaN stays NaN.
inline Half to_half(float f) {
  uint32_t u = float_bits(f);
  const uint32_t sign = (u >> 16) & 0x8000u;
  u &= 0x7fffffffu;
  uint16_t out;
  if (u >= 0x47800000u) {
    // |f| >= 2^16 (or inf / NaN): beyond fp16's range whatever the rounding
    out = u > 0x7f800000u ? 0x7e00u : 0x7c00u;
  } else if (u < 0x38800000u) {
    // |f| < 2^-14: fp16 subnormal or zero. Adding 0.5f puts the fp16 subnormal step 2^-24 at
    // the last mantissa bit of the sum, so the fp32 adder performs the rounding (to even);
    // the low mantissa bits of the sum are then the fp16 subnormal mantissa.
    const float sum = bits_float(u) + 0.5f;
    out = uint16_t(float_bits(sum) - float_bits(0.5f));
  } else {
    // normal: rebias the exponent and round away the 13 extra mantissa bits (to even)
    const uint32_t odd = (u >> 13) & 1u;
    u += (uint32_t(15 - 127) << 23) + 0xfffu + odd;
    out = uint16_t(u >> 13);  // a carry into exponent 31 is the correct overflow to inf
  }
  return Half{uint16_t(out | sign)};
}

// Widen an element to its compute type.
inline float widen(float v) { return v; }
inline double widen(double v) { return v; }
inline float widen(Half v) { return to_float(v); }
inline float widen(BFloat16 v) { return to_float(v); }

template <typename T>
using compute_t = decltype(widen(T{}));

// Round a compute-type value to the element type T.
template <typename T> inline T narrow(compute_t<T> v);
template <> inline float narrow<float>(float v) { return v; }
template <> inline double narrow<double>(double v) { return v; }
template <> inline Half narrow<Half>(float v) { return to_half(v); }
template <> inline BFloat16 narrow<BFloat16>(float v) { return to_bfloat16(v); }

}  // namespace llmcore
