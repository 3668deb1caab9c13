// llmcore::gelu_fwd / llmcore::gelu_bwd: the CPU GELU kernel (csrc/cpu/gelu.cpp) as torch ops
// on (rows, cols) matrices; their fake impls are registered in Python (llmcore/ops/gelu.py).
//
// And llmcore::gelu, the differentiable op of any shape the eager path calls: its autograd lives
// here in C++ (a torch::autograd::Function over the two, called through the dispatcher, saving
// x alone), so a call costs about what F.gelu's does on the host. Below autograd (and for
// torch.compile's fake tensors) the same forward runs without recording a graph.
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <c10/util/string_view.h>

#include "checks.h"
#include "output_alloc.h"
#include "shapes.h"
#include "llmcore/gelu.h"

namespace llmcore {
namespace ops {
namespace {

using at::Tensor;

void check_approximate(c10::string_view approximate) {
  TORCH_CHECK_VALUE(approximate == "none" || approximate == "tanh",
                    "approximate must be 'none' or 'tanh', got '", approximate, "'");
}

// x (rows, cols) with a unit column stride (rows: any stride); approximate "none" or "tanh"
GeluParams params(const Tensor& x, c10::string_view approximate) {
  check_dim("x", x, 2);
  check_unit_col_stride("x", x);
  check_approximate(approximate);
  GeluParams p;
  p.dtype = kernel_dtype("x", x);
  p.tanh = approximate == "tanh";
  p.rows = x.size(0);
  p.cols = x.size(1);
  p.x = x.const_data_ptr();
  p.x_stride = x.stride(0);
  p.num_threads = at::get_num_threads();
  return p;
}

Tensor gelu_fwd(const Tensor& x, c10::string_view approximate) {
  GeluParams p = params(x, approximate);
  Tensor y = empty_output(x.sizes(), x.options());
  p.out = y.mutable_data_ptr();
  gelu_cpu(p);
  return y;
}

Tensor gelu_bwd(const Tensor& dy, const Tensor& x, c10::string_view approximate) {
  GeluParams p = params(x, approximate);
  check_same_dtype("dy", dy, x, "x");
  check_device("dy", dy, x, "x");
  check_shape("dy", dy, x.sizes());
  check_unit_col_stride("dy", dy);
  Tensor dx = empty_output(x.sizes(), x.options());
  p.backward = true;
  p.dy = dy.const_data_ptr();
  p.dy_stride = dy.stride(0);
  p.out = dx.mutable_data_ptr();
  gelu_cpu(p);
  return dx;
}

// ---------------------------------------------------------------------------- llmcore::gelu

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

const auto& gelu_fwd_op() {
  static const auto op = c10::Dispatcher::singleton()
      .findSchemaOrThrow("llmcore::gelu_fwd", "")
      .typed<Tensor(const Tensor&, c10::string_view)>();
  return op;
}

const auto& gelu_bwd_op() {
  static const auto op = c10::Dispatcher::singleton()
      .findSchemaOrThrow("llmcore::gelu_bwd", "")
      .typed<Tensor(const Tensor&, const Tensor&, c10::string_view)>();
  return op;
}

// One class per form, so that the backward knows it without a saved_data entry (a hashed
// string key per call).
template <bool kTanh>
class GeluFunction : public torch::autograd::Function<GeluFunction<kTanh>> {
 public:
  static constexpr const char* kForm = kTanh ? "tanh" : "none";

  static Tensor forward(AutogradContext* ctx, const Tensor& x) {
    at::AutoDispatchBelowADInplaceOrView guard;
    const Tensor xm = as_rows(x);
    ctx->save_for_backward({xm});                // only x: the backward recomputes the rest
    ctx->set_materialize_grads(false);
    return view_as_sizes(gelu_fwd_op().call(xm, kForm), x);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const Tensor& dy = grads[0];
    if (!dy.defined()) return {Tensor()};
    // gelu_bwd has no autograd of its own: skip the Autograd key
    at::AutoDispatchBelowADInplaceOrView below;
    const Tensor xm = ctx->get_saved_variables()[0];
    return {view_as_sizes(gelu_bwd_op().call(as_rows(dy), xm, kForm), dy)};
  }
};

Tensor gelu_autograd(const Tensor& x, c10::string_view approximate) {
  check_approximate(approximate);
  return approximate == "tanh" ? GeluFunction<true>::apply(x) : GeluFunction<false>::apply(x);
}

Tensor gelu_no_autograd(const Tensor& x, c10::string_view approximate) {
  return view_as_sizes(gelu_fwd_op().call(as_rows(x), approximate), x);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(llmcore, m) {
  // x (rows, cols) with a unit stride on the last dim -> F.gelu(x, approximate) (rows, cols),
  // contiguous, in x's dtype; gelu_bwd: the gradient of x from dy (rows, cols) and x alone.
  // See llmcore/gelu.h.
  m.def("gelu_fwd(Tensor x, str approximate) -> Tensor");
  m.def("gelu_bwd(Tensor dy, Tensor x, str approximate) -> Tensor");
  // F.gelu(x, approximate) for x of any shape, differentiable (autograd in C++ over the two)
  m.def("gelu(Tensor x, str approximate) -> Tensor");
}

TORCH_LIBRARY_IMPL(llmcore, Autograd, m) { m.impl("gelu", &gelu_autograd); }

TORCH_LIBRARY_IMPL(llmcore, CompositeExplicitAutograd, m) { m.impl("gelu", &gelu_no_autograd); }

TORCH_LIBRARY_IMPL(llmcore, CPU, m) {
  m.impl("gelu_fwd", &gelu_fwd);
  m.impl("gelu_bwd", &gelu_bwd);
}

}  // namespace ops
}  // namespace llmcore
