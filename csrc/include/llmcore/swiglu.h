// SwiGLU of a fused [gate | up] projection: y = silu(gate) * up. Plain pointers and strides; no
// torch types.
//
// Per row r and column j < F, with g = x[r, j] (gate), u = x[r, F + j] (up), s = sigmoid(g):
//   forward:   y[r, j]      = g s u                         (silu(g) = g s)
//   backward:  dx[r, j]     = dy u s (1 + g (1 - s))        (d silu / dg = s + g s (1 - s))
//              dx[r, F + j] = dy g s
// in the compute type (fp64 for fp64, fp32 otherwise), rounded once to T at the store. The
// backward recomputes s from x: nothing but x is kept between the two.
#pragma once

#include <cstdint>

#include "llmcore/dtype.h"

namespace llmcore {

struct SwigluParams {
  DType dtype = DType::kFloat32;  // element type T of x, dy and the output
  bool backward = false;
  int64_t rows = 0, cols = 0;     // cols = F, the width of each half
  const void* x = nullptr;        // (rows, 2F) T, row stride x_stride, unit column stride
  int64_t x_stride = 0;
  const void* dy = nullptr;       // backward: (rows, F) T, row stride dy_stride, unit columns
  int64_t dy_stride = 0;
  void* out = nullptr;            // forward: y (rows, F); backward: dx (rows, 2F); contiguous T
  int num_threads = 1;
};

void swiglu_cpu(const SwigluParams& p);

}  // namespace llmcore
