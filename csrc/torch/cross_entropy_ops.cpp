// CPU / CUDA implementations of llmcore::cross_entropy_fwd / cross_entropy_bwd (schemas in
// ops.cpp): checks, one params struct, the kernel call. Kernels: csrc/cpu/cross_entropy.cpp and
// csrc/cuda/cross_entropy.cu.
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "checks.h"
#include "llmcore/cross_entropy.h"

#ifdef LLMCORE_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

namespace llmcore {
namespace ops {
namespace {

using at::Tensor;
using std::optional;

// Checks shared by forward and backward; fills everything but the outputs. Returns the
// contiguous tensors the params point into (they must outlive the kernel call).
std::tuple<Tensor, Tensor, Tensor> prepare(CrossEntropyParams* p, const Tensor& logits_in,
                                           const Tensor& target_in,
                                           const optional<Tensor>& weight_in,
                                           int64_t ignore_index, double label_smoothing,
                                           double z_loss, double softcap) {
  check_dim("logits", logits_in, 2);
  p->dtype = kernel_dtype("logits", logits_in);
  const int64_t rows = logits_in.size(0), classes = logits_in.size(1);
  TORCH_CHECK_VALUE(classes > 0, "logits must have at least one class, got shape ",
                    logits_in.sizes());
  check_device("target", target_in, logits_in, "logits");
  check_shape("target", target_in, {rows});
  TORCH_CHECK_TYPE(target_in.scalar_type() == at::kLong, "target must be int64, got ",
                   target_in.scalar_type());
  Tensor weight;
  if (weight_in.has_value() && weight_in->defined()) {
    check_floating("weight", *weight_in);
    check_device("weight", *weight_in, logits_in, "logits");
    check_shape("weight", *weight_in, {classes});
    weight = weight_in->to(compute_dtype(logits_in)).contiguous();
  }
  TORCH_CHECK_VALUE(label_smoothing >= 0.0 && label_smoothing <= 1.0,
                    "label_smoothing must be in [0, 1], got ", label_smoothing);
  TORCH_CHECK_VALUE(z_loss >= 0.0, "z_loss must be >= 0, got ", z_loss);
  TORCH_CHECK_VALUE(softcap >= 0.0, "softcap must be >= 0 (0: no cap), got ", softcap);
  const Tensor logits = logits_in.contiguous(), target = target_in.contiguous();
  p->rows = rows;
  p->classes = classes;
  p->logits = logits.const_data_ptr();
  p->target = target.const_data_ptr<int64_t>();
  p->weight = weight.defined() ? weight.const_data_ptr() : nullptr;
  p->ignore_index = ignore_index;
  p->label_smoothing = label_smoothing;
  p->z_loss = z_loss;
  p->softcap = softcap;
  p->num_threads = at::get_num_threads();
  return {logits, target, weight};
}

std::tuple<Tensor, Tensor> cross_entropy_fwd(const Tensor& logits_in, const Tensor& target_in,
                                             const optional<Tensor>& weight_in,
                                             int64_t ignore_index, double label_smoothing,
                                             double z_loss, double softcap) {
  CrossEntropyParams p;
  auto keep = prepare(&p, logits_in, target_in, weight_in, ignore_index, label_smoothing, z_loss,
                      softcap);
  const auto stat_opts = logits_in.options().dtype(compute_dtype(logits_in));
  Tensor loss = at::empty({p.rows}, stat_opts);
  Tensor lse = at::empty({p.rows}, stat_opts);
  p.loss = loss.mutable_data_ptr();
  p.lse = lse.mutable_data_ptr();
  if (logits_in.is_cuda()) {
#ifdef LLMCORE_WITH_CUDA
    const c10::cuda::CUDAGuard guard(logits_in.device());
    if (p.rows > 0)
      cross_entropy_fwd_cuda(p, c10::cuda::getCurrentCUDAStream(logits_in.get_device()).stream());
#endif
  } else {
    cross_entropy_fwd_cpu(p);
  }
  return {loss, lse};
}

Tensor cross_entropy_bwd(const Tensor& dloss_in, const Tensor& logits_in, const Tensor& target_in,
                         const optional<Tensor>& weight_in, const Tensor& lse_in,
                         int64_t ignore_index, double label_smoothing, double z_loss,
                         double softcap) {
  CrossEntropyParams p;
  auto keep = prepare(&p, logits_in, target_in, weight_in, ignore_index, label_smoothing, z_loss,
                      softcap);
  const auto cdtype = compute_dtype(logits_in);
  for (auto [name, t] : {std::make_pair("dloss", &dloss_in), std::make_pair("lse", &lse_in)}) {
    check_device(name, *t, logits_in, "logits");
    check_shape(name, *t, {p.rows});
    check_floating(name, *t);
  }
  const Tensor dloss = dloss_in.to(cdtype).contiguous(), lse = lse_in.to(cdtype).contiguous();
  Tensor dlogits = at::empty_like(std::get<0>(keep));
  p.dloss = dloss.const_data_ptr();
  p.lse = const_cast<void*>(lse.const_data_ptr());  // read-only in the backward
  p.dlogits = dlogits.mutable_data_ptr();
  if (logits_in.is_cuda()) {
#ifdef LLMCORE_WITH_CUDA
    const c10::cuda::CUDAGuard guard(logits_in.device());
    if (p.rows > 0)
      cross_entropy_bwd_cuda(p, c10::cuda::getCurrentCUDAStream(logits_in.get_device()).stream());
#endif
  } else {
    cross_entropy_bwd_cpu(p);
  }
  return dlogits;
}

// Forward and backward in one call; the gradient (dloss/dlogits * grad_scale) overwrites
// `logits`. grad_scale: 0-dim or (rows,).
Tensor cross_entropy_rows_(Tensor& logits, const Tensor& target_in,
                           const optional<Tensor>& weight_in, int64_t ignore_index,
                           double label_smoothing, double z_loss, double softcap,
                           const Tensor& grad_scale) {
  TORCH_CHECK_VALUE(logits.is_contiguous(), "logits must be contiguous: its gradient is written "
                    "over it in place");
  CrossEntropyParams p;
  auto keep = prepare(&p, logits, target_in, weight_in, ignore_index, label_smoothing, z_loss,
                      softcap);
  const auto cdtype = compute_dtype(logits);
  check_device("grad_scale", grad_scale, logits, "logits");
  check_floating("grad_scale", grad_scale);
  TORCH_CHECK_VALUE(grad_scale.dim() == 0 || grad_scale.sizes() == at::IntArrayRef{p.rows},
                    "grad_scale must be 0-dimensional or have shape [", p.rows, "], got ",
                    grad_scale.sizes());
  const Tensor dloss = grad_scale.to(cdtype).expand({p.rows}).contiguous();
  const auto stat_opts = logits.options().dtype(cdtype);
  Tensor loss = at::empty({p.rows}, stat_opts);
  Tensor lse = at::empty({p.rows}, stat_opts);
  p.loss = loss.mutable_data_ptr();
  p.lse = lse.mutable_data_ptr();
  p.dloss = dloss.const_data_ptr();
  p.dlogits = logits.mutable_data_ptr();
  if (logits.is_cuda()) {
#ifdef LLMCORE_WITH_CUDA
    const c10::cuda::CUDAGuard guard(logits.device());
    if (p.rows > 0)
      cross_entropy_fwd_bwd_cuda(p, c10::cuda::getCurrentCUDAStream(logits.get_device()).stream());
#endif
  } else {
    cross_entropy_fwd_bwd_cpu(p);
  }
  return loss;
}

}  // namespace
}  // namespace ops
}  // namespace llmcore

TORCH_LIBRARY_IMPL(llmcore, CPU, m) {
  m.impl("cross_entropy_fwd", &llmcore::ops::cross_entropy_fwd);
  m.impl("cross_entropy_bwd", &llmcore::ops::cross_entropy_bwd);
  m.impl("cross_entropy_rows_", &llmcore::ops::cross_entropy_rows_);
}

#ifdef LLMCORE_WITH_CUDA
TORCH_LIBRARY_IMPL(llmcore, CUDA, m) {
  m.impl("cross_entropy_fwd", &llmcore::ops::cross_entropy_fwd);
  m.impl("cross_entropy_bwd", &llmcore::ops::cross_entropy_bwd);
  m.impl("cross_entropy_rows_", &llmcore::ops::cross_entropy_rows_);
}
#endif
