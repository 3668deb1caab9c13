// llmcore::gemm (csrc/torch/linear_ops.cpp) for the other ops' C++ code, called through the
// dispatcher (so that profilers and dispatch modes see it, as they see at::mm):
// a (m, k) @ b (k, n) [+ bias (n,)] -> (m, n), contiguous; llmcore's GEMM for float32 CPU
// tensors, at::mm / at::addmm otherwise.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <optional>

namespace llmcore {
namespace ops {

inline at::Tensor gemm_call(const at::Tensor& a, const at::Tensor& b,
                            const std::optional<at::Tensor>& bias) {
  static const auto op = c10::Dispatcher::singleton()
      .findSchemaOrThrow("llmcore::gemm", "")
      .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&)>();
  return op.call(a, b, bias);
}

}  // namespace ops
}  // namespace llmcore
