// llmcore::swiglu_fwd / llmcore::swiglu_bwd: the CPU SwiGLU kernel (csrc/cpu/swiglu.cpp) as
// torch ops. The autograd of swiglu_fwd (swiglu_bwd on the saved x) and both fake impls are
// registered in Python (llmcore/ops/swiglu.py), like the Triton twins.
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "checks.h"
#include "output_alloc.h"
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

}  // namespace

TORCH_LIBRARY_FRAGMENT(llmcore, m) {
  // x (rows, 2F) = [gate | up] with a unit stride on the last dim -> silu(gate) * up (rows, F),
  // contiguous, in x's dtype; swiglu_bwd: the gradient of x (rows, 2F), contiguous, from dy
  // (rows, F) and x alone. See llmcore/swiglu.h.
  m.def("swiglu_fwd(Tensor x) -> Tensor");
  m.def("swiglu_bwd(Tensor dy, Tensor x) -> Tensor");
}

TORCH_LIBRARY_IMPL(llmcore, CPU, m) {
  m.impl("swiglu_fwd", &swiglu_fwd);
  m.impl("swiglu_bwd", &swiglu_bwd);
}

}  // namespace ops
}  // namespace llmcore
