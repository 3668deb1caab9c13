// The C++ signatures of llmcore's differentiable ops (schemas in ops.cpp) and their typed
// dispatcher handles: one place for the Python module's entry points (ops.cpp) and the public
// functions' eager entries (eager_entry.cpp), which call the same ops.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/string_view.h>

#include <optional>
#include <tuple>

namespace llmcore {
namespace ops {

// The typed dispatcher handle of a registered op (the schemas are registered when the library
// loads, before the Python module is initialised).
template <typename Sig>
c10::TypedOperatorHandle<Sig> typed_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}

using OptT = const std::optional<at::Tensor>&;
using NormSig = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, OptT, OptT, OptT, int64_t,
                                                   double, bool);
using CrossEntropySig = at::Tensor(const at::Tensor&, const at::Tensor&, OptT, int64_t, int64_t,
                                   double, double, double);
using LinearCrossEntropySig = at::Tensor(const at::Tensor&, const at::Tensor&, OptT,
                                         const at::Tensor&, int64_t, int64_t, double, double,
                                         double);
using AttentionSig = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                        const at::Tensor&, OptT, OptT, OptT, OptT,
                                                        OptT, at::ArrayRef<double>,
                                                        at::IntArrayRef);
using GeluSig = at::Tensor(const at::Tensor&, c10::string_view);
using SwigluSig = at::Tensor(const at::Tensor&);
using GemmSig = at::Tensor(const at::Tensor&, const at::Tensor&, OptT);

}  // namespace ops
}  // namespace llmcore
