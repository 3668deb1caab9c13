// CPU / CUDA implementations of llmcore::norm_fwd and llmcore::norm_bwd (schemas in ops.cpp):
// checks, one params struct, the kernel call. The kernels are in csrc/cpu/norm.cpp and
// csrc/cuda/norm.cu.
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "checks.h"
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
  return t->to(compute_dtype(x)).contiguous();
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
  Tensor y = at::empty_like(x);
  Tensor h = res.defined() ? at::empty_like(x) : at::empty({0}, x.options());
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
  Tensor dx = at::empty_like(h);
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
    Tensor ws = at::empty({norm_bwd_cuda_workspace_floats(rows, cols)}, grad_opts);
    p.workspace = ws.mutable_data_ptr<float>();
    norm_bwd_cuda(p, c10::cuda::getCurrentCUDAStream(h.get_device()).stream());
#endif
  } else {
    norm_bwd_cpu(p);
  }
  return {dx, dw, db};
}

}  // namespace
}  // namespace ops
}  // namespace llmcore

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
