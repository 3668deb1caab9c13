// Rotary position embedding of queries and keys (the half-split convention of Llama / Hugging
// Face checkpoints). Plain pointers and strides; no torch types.
//
// Per token t, head h, with x = (x1, x2) the halves of the head's D = 2 * half values and the
// table row r = t % rows, (c1, c2) = cos[r], (s1, s2) = sin[r]:
//   forward:   y1 = x1 c1 - x2 s1,   y2 = x2 c2 + x1 s2      (x cos + rotate_half(x) sin)
//   backward:  y1 = x1 c1 + x2 s2,   y2 = x2 c2 - x1 s1      (its transpose: the gradient)
// in the compute type (fp64 for fp64, fp32 otherwise), rounded once to T at the store.
#pragma once

#include <cstdint>

#include "llmcore/dtype.h"

namespace llmcore {

struct RopeParams {
  DType dtype = DType::kFloat32;  // element type T of q, k and the outputs
  bool backward = false;
  int64_t tokens = 0, rows = 0, half = 0;  // rows of the tables; D = 2 * half
  int64_t heads_q = 0, heads_k = 0;
  const void* q = nullptr;        // (tokens, heads_q, D) T, strides below (unit on D)
  const void* k = nullptr;        // (tokens, heads_k, D) T
  int64_t q_stride_t = 0, q_stride_h = 0, k_stride_t = 0, k_stride_h = 0;
  const void* cos = nullptr;      // (rows, D) contiguous, in the compute type
  const void* sin = nullptr;
  void* out_q = nullptr;          // (tokens, heads_q, D) contiguous T
  void* out_k = nullptr;          // (tokens, heads_k, D) contiguous T
  int num_threads = 1;
};

void rope_cpu(const RopeParams& p);

}  // namespace llmcore
