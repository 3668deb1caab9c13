// GELU of a (rows, cols) matrix, forward and backward, in both forms of F.gelu. Plain pointers
// and strides; no torch types.
//
// Per element x (Phi the standard normal CDF, phi its density):
//   exact (approximate "none"):  y = x Phi(x)              dy/dx = Phi(x) + x phi(x)
//   tanh:  z = sqrt(2/pi) (x + 0.044715 x^3), s = sigmoid(2z) = (1 + tanh z) / 2
//                                y = x s                   dy/dx = s (1 + 2 x (1 - s) z')
//          with z' = sqrt(2/pi) (1 + 3 * 0.044715 x^2)     (1 - tanh^2 z = 4 s (1 - s))
// in the compute type (fp64 for fp64, fp32 otherwise), rounded once to T at the store. Both
// forms are sigmoids: tanh's s from exp(-2|z|) keeps its digits for negative x, where eager's
// 0.5 x (1 + tanh z) cancels to 0; the exact form's Phi is sigmoid(g), g = logit(Phi), a fitted
// odd polynomial in fp32 (erfc in fp64; see vmath.h), accurate in absolute terms, as eager's
// 0.5 x (1 + erf) is. The backward recomputes everything from x: nothing but x is kept between
// the two.
#pragma once

#include <cstdint>

#include "llmcore/dtype.h"

namespace llmcore {

struct GeluParams {
  DType dtype = DType::kFloat32;  // element type T of x, dy and the output
  bool tanh = false;              // the tanh approximation (else the exact form)
  bool backward = false;
  int64_t rows = 0, cols = 0;
  const void* x = nullptr;        // (rows, cols) T, row stride x_stride, unit column stride
  int64_t x_stride = 0;
  const void* dy = nullptr;       // backward: (rows, cols) T, row stride dy_stride, unit columns
  int64_t dy_stride = 0;
  void* out = nullptr;            // forward: y; backward: dx; (rows, cols) contiguous T
  int num_threads = 1;
};

void gelu_cpu(const GeluParams& p);

}  // namespace llmcore
