// llmcore::swiglu_fwd / llmcore::swiglu_bwd: the CPU SwiGLU kernel (csrc/cpu/swiglu.cpp) as
// torch ops on (rows, 2F) matrices; their fake impls are registered in Python
// (llmcore/ops/swiglu.py).
//
// And llmcore::swiglu, the differentiable op of any shape the eager path calls: its autograd
// lives here in C++ (a torch::autograd::Function over the two kernel ops, saving x alone), as
// gelu's does, so a call costs about what the eager formula's does on the host. Below autograd
// (and for torch.compile's fake tensors) the same forward runs without recording a graph.
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/empty.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include "checks.h"
#include "op_handles.h"
#include "output_alloc.h"
#include "shapes.h"
#include "llmcore/swiglu.h"

namespace llmcore {
namespace ops {
namespace {

using at::Tensor;

// x (rows, 2F) with a unit column stride (rows: any stride): -> F
int64_t check_x(const Tensor& x) {
  check_dim("x", x, 2);
  const int64_t two_f = x.size(1);
  TORCH_CHECK_VALUE(two_f % 2 == 0, "x must be (rows, 2F): [gate | up] halves of an even last "
                    "dim, got ", x.sizes());
  check_unit_col_stride("x", x);
  return two_f / 2;
}

SwigluParams params(const Tensor& x, int64_t f) {
  SwigluParams p;
  p.dtype = kernel_dtype("x", x);
  p.rows = x.size(0);
  p.cols = f;
  p.x = x.const_data_ptr();
  p.x_stride = x.stride(0);
  p.num_threads = at::get_num_threads();
  return p;
}

Tensor swiglu_fwd(const Tensor& x) {
  const int64_t f = check_x(x);
  Tensor y = empty_output({x.size(0), f}, x.options());
  SwigluParams p = params(x, f);
  p.out = y.mutable_data_ptr();
  swiglu_cpu(p);
  return y;
}

Tensor swiglu_bwd(const Tensor& dy, const Tensor& x) {
  const int64_t f = check_x(x);
  check_same_dtype("dy", dy, x, "x");
  check_device("dy", dy, x, "x");
  check_shape("dy", dy, {x.size(0), f});
  check_unit_col_stride("dy", dy);
  Tensor dx = empty_output({x.size(0), 2 * f}, x.options());
  SwigluParams p = params(x, f);
  p.backward = true;
  p.dy = dy.const_data_ptr();
  p.dy_stride = dy.stride(0);
  p.out = dx.mutable_data_ptr();
  swiglu_cpu(p);
  return dx;
}

// ---------------------------------------------------------------------------- llmcore::swiglu

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

const auto& swiglu_fwd_op() {
  static const auto op = typed_op<Tensor(const Tensor&)>("llmcore::swiglu_fwd");
  return op;
}

const auto& swiglu_bwd_op() {
  static const auto op = typed_op<Tensor(const Tensor&, const Tensor&)>("llmcore::swiglu_bwd");
  return op;
}

// y (..., F) from x (..., 2F); the backward gives x's gradient (..., 2F) from dy and x alone.
class SwigluFunction : public torch::autograd::Function<SwigluFunction> {
 public:
  static Tensor forward(AutogradContext* ctx, const Tensor& x) {
    at::AutoDispatchBelowADInplaceOrView guard;
    const Tensor xm = as_rows(x);
    ctx->save_for_backward({xm});                // only x: the backward recomputes the rest
    ctx->set_materialize_grads(false);
    return view_as_leading(swiglu_fwd_op().call(xm), x);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const Tensor& dy = grads[0];
    if (!dy.defined()) return {Tensor()};
    // swiglu_bwd has no autograd of its own: skip the Autograd key
    at::AutoDispatchBelowADInplaceOrView below;
    const Tensor xm = ctx->get_saved_variables()[0];
    return {view_as_leading(swiglu_bwd_op().call(as_rows(dy), xm), dy)};
  }
};

Tensor swiglu_autograd(const Tensor& x) { return SwigluFunction::apply(x); }

Tensor swiglu_no_autograd(const Tensor& x) {
  return view_as_leading(swiglu_fwd_op().call(as_rows(x)), x);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(llmcore, m) {
  // x (rows, 2F) = [gate | up] with a unit stride on the last dim -> silu(gate) * up (rows, F),
  // contiguous, in x's dtype; swiglu_bwd: the gradient of x (rows, 2F), contiguous, from dy
  // (rows, F) and x alone. See llmcore/swiglu.h.
  m.def("swiglu_fwd(Tensor x) -> Tensor");
  m.def("swiglu_bwd(Tensor dy, Tensor x) -> Tensor");
  // silu(gate) * up for x (..., 2F) of any shape, differentiable (autograd in C++ over the two)
  m.def("swiglu(Tensor x) -> Tensor");
}

TORCH_LIBRARY_IMPL(llmcore, Autograd, m) { m.impl("swiglu", &swiglu_autograd); }

TORCH_LIBRARY_IMPL(llmcore, CompositeExplicitAutograd, m) {
  m.impl("swiglu", &swiglu_no_autograd);
}

TORCH_LIBRARY_IMPL(llmcore, CPU, m) {
  m.impl("swiglu_fwd", &swiglu_fwd);
  m.impl("swiglu_bwd", &swiglu_bwd);
}

}  // namespace ops
}  // namespace llmcore
