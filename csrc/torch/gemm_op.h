// llmcore::gemm (csrc/torch/linear_ops.cpp) for the other ops' C++ code, called through the
// dispatcher (so that profilers and dispatch modes see it, as they see at::mm):
// a (m, k) @ b (k, n) [+ bias (n,)] -> (m, n), contiguous; llmcore's GEMM for float32 CPU
// tensors, at::mm / at::addmm otherwise.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

#include "op_handles.h"

namespace llmcore {
namespace ops {

inline at::Tensor gemm_call(const at::Tensor& a, const at::Tensor& b,
                            const std::optional<at::Tensor>& bias) {
  static const auto op = typed_op<GemmSig>("llmcore::gemm");
  return op.call(a, b, bias);
}

}  // namespace ops
}  // namespace llmcore
