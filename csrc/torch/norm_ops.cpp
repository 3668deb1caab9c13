// CPU / CUDA implementations of llmcore::norm_fwd and llmcore::norm_bwd (schemas in ops.cpp):
// checks, one params struct, the kernel call. The kernels are in csrc/cpu/norm.cpp and
// csrc/cuda/norm.cu.
//
// And llmcore::norm, the differentiable op the eager path calls: its autograd lives here in C++
// (a torch::autograd::Function over norm_fwd / norm_bwd, called through the dispatcher), so a
// layer_norm fwd+bwd costs about what F.layer_norm's does on the host. Below autograd (and for
// torch.compile's fake tensors) the same forward runs without recording a graph.
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "checks.h"
#include "output_alloc.h"
#include "shapes.h"
#include "llmcore/norm.h"

#ifdef LLMCORE_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

namespace llmcore {
namespace ops {
namespace {

using at::Tensor;
using std::optional;

// weight / bias as contiguous tensors in the compute type, or an undefined tensor.
Tensor param(const char* name, const optional<Tensor>& t, const Tensor& x, int64_t cols) {
  if (!t.has_value() || !t->defined()) return Tensor();
  check_floating(name, *t);
  check_device(name, *t, x, "x");
  check_shape(name, *t, {cols});
  return to_dtype(*t, compute_dtype(x)).contiguous();
}

std::tuple<Tensor, Tensor, Tensor, Tensor> norm_fwd(const Tensor& x_in,
                                                    const optional<Tensor>& residual,
                                                    const optional<Tensor>& weight,
                                                    const optional<Tensor>& bias, double eps,
                                                    bool rms) {
  check_dim("x", x_in, 2);
  const DType dtype = kernel_dtype("x", x_in);
  const int64_t rows = x_in.size(0), cols = x_in.size(1);
  Tensor res;
  if (residual.has_value() && residual->defined()) {
    check_device("residual", *residual, x_in, "x");
    check_same_dtype("residual", *residual, x_in, "x");
    check_shape("residual", *residual, x_in.sizes());
    res = residual->contiguous();
  }
  TORCH_CHECK_VALUE(!(rms && bias.has_value() && bias->defined()),
                    "bias must be None for rms_norm");
  const Tensor w = param("weight", weight, x_in, cols);
  const Tensor b = param("bias", bias, x_in, cols);
  TORCH_CHECK_VALUE(eps >= 0.0, "eps must be >= 0, got ", eps);

  const Tensor x = x_in.contiguous();
  const auto stat_opts = x.options().dtype(compute_dtype(x));
  Tensor y = empty_output_like(x);
  Tensor h = res.defined() ? empty_output_like(x) : at::empty({0}, x.options());
  Tensor mean = at::empty({rms ? 0 : rows}, stat_opts);
  Tensor rstd = at::empty({rows}, stat_opts);

  NormFwdParams p;
  p.dtype = dtype;
  p.rms = rms;
  p.rows = rows;
  p.cols = cols;
  p.eps = eps;
  p.x = x.const_data_ptr();
  p.residual = res.defined() ? res.const_data_ptr() : nullptr;
  p.weight = w.defined() ? w.const_data_ptr() : nullptr;
  p.bias = b.defined() ? b.const_data_ptr() : nullptr;
  p.y = y.mutable_data_ptr();
  p.h = res.defined() ? h.mutable_data_ptr() : nullptr;
  p.mean = rms ? nullptr : mean.mutable_data_ptr();
  p.rstd = rstd.mutable_data_ptr();
  p.num_threads = at::get_num_threads();
  if (x.is_cuda()) {
#ifdef LLMCORE_WITH_CUDA
    const c10::cuda::CUDAGuard guard(x.device());
    if (rows > 0) norm_fwd_cuda(p, c10::cuda::getCurrentCUDAStream(x.get_device()).stream());
#endif
  } else {
    norm_fwd_cpu(p);
  }
  return {y, h, mean, rstd};
}

std::tuple<Tensor, Tensor, Tensor> norm_bwd(const Tensor& dy_in, const optional<Tensor>& dh_in,
                                            const Tensor& h_in, const optional<Tensor>& weight,
                                            const Tensor& mean_in, const Tensor& rstd_in, bool rms,
                                            bool weight_grad, bool bias_grad) {
  check_dim("h", h_in, 2);
  const DType dtype = kernel_dtype("h", h_in);
  const int64_t rows = h_in.size(0), cols = h_in.size(1);
  check_device("dy", dy_in, h_in, "h");
  check_same_dtype("dy", dy_in, h_in, "h");
  check_shape("dy", dy_in, h_in.sizes());
  Tensor dh;
  if (dh_in.has_value() && dh_in->defined()) {
    check_device("dh", *dh_in, h_in, "h");
    check_same_dtype("dh", *dh_in, h_in, "h");
    check_shape("dh", *dh_in, h_in.sizes());
    dh = dh_in->contiguous();
  }
  const auto cdtype = compute_dtype(h_in);
  for (auto [name, t, n] : {std::make_tuple("mean", &mean_in, rms ? int64_t(0) : rows),
                            std::make_tuple("rstd", &rstd_in, rows)}) {
    check_device(name, *t, h_in, "h");
    check_shape(name, *t, {n});
    TORCH_CHECK_TYPE(t->scalar_type() == cdtype, name, " must be ", cdtype, ", got ",
                     t->scalar_type());
  }
  const Tensor w = param("weight", weight, h_in, cols);
  TORCH_CHECK_VALUE(!weight_grad || w.defined(), "weight_grad needs a weight");

  const Tensor dy = dy_in.contiguous(), h = h_in.contiguous();
  const Tensor mean = mean_in.contiguous(), rstd = rstd_in.contiguous();
  const auto grad_opts = h.options().dtype(cdtype);
  Tensor dx = empty_output_like(h);
  Tensor dw = at::empty({weight_grad ? cols : 0}, grad_opts);
  Tensor db = at::empty({bias_grad ? cols : 0}, grad_opts);

  NormBwdParams p;
  p.dtype = dtype;
  p.rms = rms;
  p.rows = rows;
  p.cols = cols;
  p.dy = dy.const_data_ptr();
  p.dh = dh.defined() ? dh.const_data_ptr() : nullptr;
  p.h = h.const_data_ptr();
  p.weight = w.defined() ? w.const_data_ptr() : nullptr;
  p.mean = rms ? nullptr : mean.const_data_ptr();
  p.rstd = rstd.const_data_ptr();
  p.dx = dx.mutable_data_ptr();
  p.dweight = weight_grad ? dw.mutable_data_ptr() : nullptr;
  p.dbias = bias_grad ? db.mutable_data_ptr() : nullptr;
  p.num_threads = at::get_num_threads();
  if (h.is_cuda()) {
#ifdef LLMCORE_WITH_CUDA
    const c10::cuda::CUDAGuard guard(h.device());
    // the partial rows of dweight / dbias: none when neither is asked for (frozen norms)
    Tensor ws = at::empty(
        {weight_grad || bias_grad ? norm_bwd_cuda_workspace_floats(rows, cols) : int64_t(0)},
        grad_opts);
    p.workspace = ws.mutable_data_ptr<float>();
    norm_bwd_cuda(p, c10::cuda::getCurrentCUDAStream(h.get_device()).stream());
#endif
  } else {
    norm_bwd_cpu(p);
  }
  return {dx, dw, db};
}

// ---------------------------------------------------------------------------- llmcore::norm

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using NormFwdOut = std::tuple<Tensor, Tensor, Tensor, Tensor>;
using NormBwdOut = std::tuple<Tensor, Tensor, Tensor>;

const auto& norm_fwd_op() {
  static const auto op = c10::Dispatcher::singleton()
      .findSchemaOrThrow("llmcore::norm_fwd", "")
      .typed<NormFwdOut(const Tensor&, const optional<Tensor>&, const optional<Tensor>&,
                        const optional<Tensor>&, double, bool)>();
  return op;
}

const auto& norm_bwd_op() {
  static const auto op = c10::Dispatcher::singleton()
      .findSchemaOrThrow("llmcore::norm_bwd", "")
      .typed<NormBwdOut(const Tensor&, const optional<Tensor>&, const Tensor&,
                        const optional<Tensor>&, const Tensor&, const Tensor&, bool, bool,
                        bool)>();
  return op;
}

// A (cols,) parameter gradient in the shape of the normalised dims (x's last norm_ndim dims).
Tensor as_param_shape(const Tensor& t, const Tensor& x, int64_t norm_ndim) {
  const int64_t lead = x.dim() - norm_ndim;
  if (norm_ndim == 1) return t;  // already (cols,)
  if (x.unsafeGetTensorImpl()->has_symbolic_sizes_strides()) {
    return t.view_symint(x.sym_sizes().slice(lead));
  }
  return t.view(x.sizes().slice(lead));
}

// (y, h) in x's shape; h is an empty (0,) tensor without a residual.
std::tuple<Tensor, Tensor> norm_forward(const Tensor& x, const optional<Tensor>& residual,
                                        const optional<Tensor>& weight,
                                        const optional<Tensor>& bias, int64_t norm_ndim,
                                        double eps, bool rms, NormFwdOut* full = nullptr) {
  const RowsCols rc(x, norm_ndim);
  NormFwdOut out = norm_fwd_op().call(rc.mat(x), rc.mat(residual), rc.vec(weight),
                                      rc.vec(bias), eps, rms);
  Tensor y = view_as_sizes(std::get<0>(out), x);
  Tensor h = given(residual) ? view_as_sizes(std::get<1>(out), x) : std::get<1>(out);
  if (full != nullptr) *full = std::move(out);
  return {y, h};
}

// What the backward needs besides tensors, packed into one saved int (each saved_data entry is
// a hashed string key: ~0.05 us apiece on every call).
struct NormState {
  int64_t norm_ndim = 1;
  bool rms = false, has_res = false, has_w = false, has_b = false;
  at::ScalarType bias_dtype = at::kFloat;

  int64_t pack() const {
    return norm_ndim << 16 | int64_t(bias_dtype) << 4 | int64_t(rms) << 3 |
           int64_t(has_res) << 2 | int64_t(has_w) << 1 | int64_t(has_b);
  }
  static NormState unpack(int64_t v) {
    NormState s;
    s.norm_ndim = v >> 16;
    s.bias_dtype = static_cast<at::ScalarType>((v >> 4) & 0xfff);
    s.rms = (v >> 3) & 1;
    s.has_res = (v >> 2) & 1;
    s.has_w = (v >> 1) & 1;
    s.has_b = v & 1;
    return s;
  }
};

// Backward (math in csrc/cpu/norm.cpp): dx = dresidual from norm_bwd, plus the gradient of h;
// dweight / dbias in fp32 from the kernels, cast once to the parameters' dtypes.
class NormFunction : public torch::autograd::Function<NormFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const Tensor& x,
                               const optional<Tensor>& residual, const optional<Tensor>& weight,
                               const optional<Tensor>& bias, int64_t norm_ndim, double eps,
                               bool rms) {
    at::AutoDispatchBelowADInplaceOrView guard;
    NormFwdOut full;
    auto [y, h] = norm_forward(x, residual, weight, bias, norm_ndim, eps, rms, &full);
    const bool has_res = given(residual);
    // the normalised input: h with a residual, else x itself (no copy)
    ctx->save_for_backward({has_res ? h : x, given(weight) ? *weight : Tensor(),
                            std::get<2>(full), std::get<3>(full)});
    NormState st;
    st.norm_ndim = norm_ndim;
    st.rms = rms;
    st.has_res = has_res;
    st.has_w = given(weight);
    st.has_b = given(bias);
    if (st.has_b) st.bias_dtype = bias->scalar_type();
    ctx->saved_data["state"] = st.pack();
    if (!has_res) ctx->mark_non_differentiable({h});
    ctx->set_materialize_grads(false);
    return {y, h};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const Tensor &hx = saved[0], &w = saved[1], &mean = saved[2], &rstd = saved[3];
    const NormState st = NormState::unpack(ctx->saved_data["state"].toInt());
    const bool rms = st.rms, has_res = st.has_res;
    // needs_input_grad counts only the tensors given: x, then residual, weight, bias if present
    int edge = 0;
    const int ix = edge++;
    const int ir = has_res ? edge++ : -1;
    const int iw = st.has_w ? edge++ : -1;
    const int ib = st.has_b ? edge++ : -1;
    const auto needs = [&](int i) { return i >= 0 && ctx->needs_input_grad(i); };
    const Tensor& dy = grads[0];
    const Tensor dh = has_res ? grads[1] : Tensor();
    const bool dw_needed = needs(iw) && dy.defined();
    const bool db_needed = needs(ib) && dy.defined();
    Tensor dx, dw, db;
    if (dy.defined()) {
      // norm_bwd has no autograd of its own: skip the Autograd key (its boxed not-implemented
      // fallback costs microseconds per call)
      at::AutoDispatchBelowADInplaceOrView below;
      const int64_t norm_ndim = st.norm_ndim;
      const RowsCols rc(hx, norm_ndim);
      auto out = norm_bwd_op().call(rc.mat(dy), rc.mat(optional<Tensor>(dh)), rc.mat(hx),
                                    w.defined() ? optional<Tensor>(rc.vec(w)) : std::nullopt,
                                    mean, rstd, rms, dw_needed, db_needed);
      dx = view_as_sizes(std::get<0>(out), hx);
      // the kernels' fp32 sums, rounded once to the parameters' dtypes (no op when they match)
      if (dw_needed) {
        dw = as_param_shape(to_dtype(std::get<1>(out), w.scalar_type()), hx, norm_ndim);
      }
      if (db_needed) {
        db = as_param_shape(to_dtype(std::get<2>(out), st.bias_dtype), hx, norm_ndim);
      }
    } else {
      dx = dh;  // only h was used: its gradient passes straight to x and residual
    }
    return {needs(ix) ? dx : Tensor(), needs(ir) ? dx : Tensor(), dw, db, Tensor(), Tensor(),
            Tensor()};
  }
};

std::tuple<Tensor, Tensor> norm_autograd(const Tensor& x, const optional<Tensor>& residual,
                                         const optional<Tensor>& weight,
                                         const optional<Tensor>& bias, int64_t norm_ndim,
                                         double eps, bool rms) {
  auto out = NormFunction::apply(x, residual, weight, bias, norm_ndim, eps, rms);
  return {out[0], out[1]};
}

std::tuple<Tensor, Tensor> norm_no_autograd(const Tensor& x, const optional<Tensor>& residual,
                                            const optional<Tensor>& weight,
                                            const optional<Tensor>& bias, int64_t norm_ndim,
                                            double eps, bool rms) {
  return norm_forward(x, residual, weight, bias, norm_ndim, eps, rms);
}

}  // namespace
}  // namespace ops
}  // namespace llmcore

TORCH_LIBRARY_IMPL(llmcore, Autograd, m) { m.impl("norm", &llmcore::ops::norm_autograd); }

TORCH_LIBRARY_IMPL(llmcore, CompositeExplicitAutograd, m) {
  m.impl("norm", &llmcore::ops::norm_no_autograd);
}

TORCH_LIBRARY_IMPL(llmcore, CPU, m) {
  m.impl("norm_fwd", &llmcore::ops::norm_fwd);
  m.impl("norm_bwd", &llmcore::ops::norm_bwd);
}

#ifdef LLMCORE_WITH_CUDA
TORCH_LIBRARY_IMPL(llmcore, CUDA, m) {
  m.impl("norm_fwd", &llmcore::ops::norm_fwd);
  m.impl("norm_bwd", &llmcore::ops::norm_bwd);
}
#endif
