// CPU / CUDA implementations of llmcore::cross_entropy_fwd / _bwd / _rows_ (schemas in ops.cpp):
// checks, one params struct, the kernel call; and llmcore::cross_entropy, the reduced loss with a
// C++ autograd kernel over fwd / bwd. Kernels: csrc/cpu/cross_entropy.cpp and
// csrc/cuda/cross_entropy.cu.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/where.h>
#include <c10/core/impl/TorchDispatchModeTLS.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "checks.h"
#include "gemm_op.h"
#include "output_alloc.h"
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

// The tensors a params struct points into: they must outlive the kernel call.
struct Keep {
  Tensor logits, target, weight, z_ratio, weight_sum;
};

// Every target is in [0, classes) or ignore_index. On the CPU a ValueError in the words of the
// Python-side check (llmcore.ops.cross_entropy); on CUDA the kernels assert it on the device.
void check_targets_cpu(const Tensor& target, int64_t classes, int64_t ignore_index) {
  const int64_t* t = target.const_data_ptr<int64_t>();
  for (int64_t i = 0, n = target.numel(); i < n; ++i)
    TORCH_CHECK_VALUE(t[i] == ignore_index || (t[i] >= 0 && t[i] < classes),
                      "target values must be in [0, ", classes, ") or equal ignore_index=",
                      ignore_index, ", got ", t[i]);
}

// llmcore::cross_entropy_check_targets: any integer dtype, any strides.
void cross_entropy_check_targets(const Tensor& target, int64_t classes, int64_t ignore_index) {
  TORCH_CHECK_TYPE(at::isIntegralType(target.scalar_type(), /*includeBool=*/false),
                   "target must be an integer tensor, got ", target.scalar_type());
  const Tensor t = target.scalar_type() == at::kLong ? target : target.to(at::kLong);
  check_targets_cpu(t.contiguous(), classes, ignore_index);
}

// Checks shared by forward and backward; fills everything but the outputs.
Keep prepare(CrossEntropyParams* p, const Tensor& logits_in, const Tensor& target_in,
             const optional<Tensor>& weight_in, int64_t ignore_index, double label_smoothing,
             double z_loss, double softcap, const optional<Tensor>& z_ratio_in) {
  check_dim("logits", logits_in, 2);
  p->dtype = kernel_dtype("logits", logits_in);
  const int64_t rows = logits_in.size(0), classes = logits_in.size(1);
  TORCH_CHECK_VALUE(classes > 0, "logits must have at least one class, got shape ",
                    logits_in.sizes());
  check_device("target", target_in, logits_in, "logits");
  check_shape("target", target_in, {rows});
  TORCH_CHECK_TYPE(target_in.scalar_type() == at::kLong, "target must be int64, got ",
                   target_in.scalar_type());
  const auto cdtype = compute_dtype(logits_in);
  Keep keep;
  if (weight_in.has_value() && weight_in->defined()) {
    check_floating("weight", *weight_in);
    check_device("weight", *weight_in, logits_in, "logits");
    check_shape("weight", *weight_in, {classes});
    // a float32 weight on half logits is fine
    keep.weight = to_dtype(*weight_in, cdtype).contiguous();
  }
  if (z_ratio_in.has_value() && z_ratio_in->defined()) {
    check_floating("z_ratio", *z_ratio_in);
    check_device("z_ratio", *z_ratio_in, logits_in, "logits");
    TORCH_CHECK_VALUE(z_ratio_in->numel() == 1, "z_ratio must hold one value, got shape ",
                      z_ratio_in->sizes());
    keep.z_ratio = to_dtype(*z_ratio_in, cdtype).contiguous();
  }
  TORCH_CHECK_VALUE(label_smoothing >= 0.0 && label_smoothing <= 1.0,
                    "label_smoothing must be in [0, 1], got ", label_smoothing);
  TORCH_CHECK_VALUE(z_loss >= 0.0, "z_loss must be >= 0, got ", z_loss);
  TORCH_CHECK_VALUE(softcap >= 0.0, "softcap must be >= 0 (0: no cap), got ", softcap);
  keep.logits = logits_in.contiguous();
  keep.target = target_in.contiguous();
  if (!logits_in.is_cuda()) check_targets_cpu(keep.target, classes, ignore_index);
  p->rows = rows;
  p->classes = classes;
  p->logits = keep.logits.const_data_ptr();
  p->target = keep.target.const_data_ptr<int64_t>();
  p->weight = keep.weight.defined() ? keep.weight.const_data_ptr() : nullptr;
  p->z_ratio = keep.z_ratio.defined() ? keep.z_ratio.const_data_ptr() : nullptr;
  if (keep.weight.defined() && label_smoothing > 0.0 && logits_in.is_cuda()) {
    keep.weight_sum = keep.weight.sum();  // one small kernel instead of a sum per CUDA block
    p->weight_sum = keep.weight_sum.const_data_ptr();
  }
  p->ignore_index = ignore_index;
  p->label_smoothing = label_smoothing;
  p->z_loss = z_loss;
  p->softcap = softcap;
  p->num_threads = at::get_num_threads();
  return keep;
}

std::tuple<Tensor, Tensor> cross_entropy_fwd(const Tensor& logits_in, const Tensor& target_in,
                                             const optional<Tensor>& weight_in,
                                             int64_t ignore_index, double label_smoothing,
                                             double z_loss, double softcap,
                                             const optional<Tensor>& z_ratio) {
  CrossEntropyParams p;
  const Keep keep = prepare(&p, logits_in, target_in, weight_in, ignore_index, label_smoothing,
                            z_loss, softcap, z_ratio);
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
                         double softcap, const optional<Tensor>& z_ratio) {
  CrossEntropyParams p;
  const Keep keep = prepare(&p, logits_in, target_in, weight_in, ignore_index, label_smoothing,
                            z_loss, softcap, z_ratio);
  const auto cdtype = compute_dtype(logits_in);
  for (auto [name, t] : {std::make_pair("dloss", &dloss_in), std::make_pair("lse", &lse_in)}) {
    check_device(name, *t, logits_in, "logits");
    check_floating(name, *t);
  }
  check_shape("lse", lse_in, {p.rows});
  // dloss: (rows,), or 0-dim / a stride-0 expand (the gradient of a sum or mean), read in place
  const bool one = dloss_in.dim() == 0 || (dloss_in.dim() == 1 && dloss_in.stride(0) == 0);
  TORCH_CHECK_VALUE(dloss_in.dim() == 0 || dloss_in.sizes() == at::IntArrayRef{p.rows},
                    "dloss must be 0-dimensional or have shape [", p.rows, "], got ",
                    dloss_in.sizes());
  const Tensor dloss_c = to_dtype(dloss_in, cdtype);
  const Tensor dloss = one ? dloss_c : dloss_c.contiguous();
  const Tensor lse = to_dtype(lse_in, cdtype).contiguous();
  Tensor dlogits = empty_output_like(keep.logits);
  p.dloss = dloss.const_data_ptr();
  p.dloss_stride = one ? 0 : 1;
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
  const Keep keep = prepare(&p, logits, target_in, weight_in, ignore_index, label_smoothing,
                            z_loss, softcap, std::nullopt);
  const auto cdtype = compute_dtype(logits);
  check_device("grad_scale", grad_scale, logits, "logits");
  check_floating("grad_scale", grad_scale);
  TORCH_CHECK_VALUE(grad_scale.dim() == 0 || grad_scale.sizes() == at::IntArrayRef{p.rows},
                    "grad_scale must be 0-dimensional or have shape [", p.rows, "], got ",
                    grad_scale.sizes());
  const Tensor dloss = to_dtype(grad_scale, cdtype).contiguous();
  const auto stat_opts = logits.options().dtype(cdtype);
  Tensor loss = at::empty({p.rows}, stat_opts);
  Tensor lse = at::empty({p.rows}, stat_opts);
  p.loss = loss.mutable_data_ptr();
  p.lse = lse.mutable_data_ptr();
  p.dloss = dloss.const_data_ptr();
  p.dloss_stride = grad_scale.dim() == 0 ? 0 : 1;
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

// ---------------------------------------------------------------- llmcore::cross_entropy
// The reduced loss with its autograd in C++: llmcore.cross_entropy's single call on the native
// backend. The autograd kernel runs the cross_entropy_fwd / _bwd ops through the dispatcher, so
// torch.compile (AOTAutograd) traces through it onto those ops and their fake impls.

enum Reduction : int64_t { kNone = 0, kMean = 1, kSum = 2 };  // at::Reduction's values

struct Denominator {
  Tensor den;    // sum over valid rows of w[t] (their count without a weight), 0-dim, compute type
  Tensor count;  // the count of valid rows, when asked for
};

// An ordinary CPU tensor whose data the host may read and write in place of a small ATen op:
// not a fake or functional tensor that torch.compile traces, no dispatch mode watching.
bool host_readable(const Tensor& t) {
  constexpr c10::DispatchKeySet kTraced({c10::DispatchKey::Python, c10::DispatchKey::Functionalize,
                                         c10::DispatchKey::FuncTorchBatched,
                                         c10::DispatchKey::FuncTorchGradWrapper});
  return t.is_cpu() && !t.key_set().has_any(kTraced) &&
         !t.unsafeGetTensorImpl()->has_symbolic_sizes_strides() &&
         !c10::impl::TorchDispatchModeTLS::any_modes_set();
}

// The number of valid rows, counted on the host, for an ordinary CPU target with at most 2^24
// rows, so that it equals the floating-point sum of the valid mask exactly. nullopt otherwise.
std::optional<int64_t> host_valid_count(const Tensor& target, int64_t ignore_index) {
  if (!host_readable(target)) return std::nullopt;
  const int64_t n = target.numel();
  if (n > (int64_t(1) << 24)) return std::nullopt;
  const int64_t* t = target.const_data_ptr<int64_t>();
  const int64_t stride = n > 1 ? target.stride(0) : 1;
  int64_t count = 0;
  for (int64_t i = 0; i < n; ++i) count += t[i * stride] != ignore_index;
  return count;
}

// ATen ops only (they must trace under fake tensors and functionalization): 2 small ones
// without a class weight, or one allocation when the count can be read on the host (the same
// value: a float sum of at most 2^24 ones is exact). A target out of range is clamped here;
// the fwd op rejects it.
Denominator mean_denominator(const Tensor& target, const Tensor& weight, int64_t ignore_index,
                             at::ScalarType cdtype, bool want_count) {
  Denominator d;
  if (!weight.defined()) {
    if (const auto count = host_valid_count(target, ignore_index)) {
      d.count = at::empty({}, target.options().dtype(cdtype));
      if (cdtype == at::kDouble) *d.count.mutable_data_ptr<double>() = double(*count);
      else *d.count.mutable_data_ptr<float>() = float(*count);
      d.den = d.count;
      return d;
    }
  }
  const Tensor valid = target.ne(ignore_index);
  if (!weight.defined() || want_count) d.count = valid.sum(cdtype);
  if (!weight.defined()) {
    d.den = d.count;
  } else {
    const Tensor w_t = weight.index_select(0, target.clamp(0, weight.size(0) - 1));
    d.den = at::where(valid, w_t, 0).sum();
  }
  return d;
}

// sum / den for 0-dim tensors of the compute type, in place in `sum`: for ordinary CPU tensors
// one IEEE division on the host (div_'s result, without its dispatch and TensorIterator).
Tensor mean_of_sum(Tensor sum, const Tensor& den) {
  if (!host_readable(sum) || !host_readable(den) || den.scalar_type() != sum.scalar_type()) {
    return sum.div_(den);
  }
  if (sum.scalar_type() == at::kDouble) {
    *sum.mutable_data_ptr<double>() /= *den.const_data_ptr<double>();
  } else {
    *sum.mutable_data_ptr<float>() /= *den.const_data_ptr<float>();
  }
  return sum;
}

struct CeForward {
  Tensor out;      // the op's result, in logits' dtype
  Tensor lse;      // (rows,) for the backward
  Tensor weight;   // the class weight in the compute type, or undefined
  Tensor den;      // "mean": the denominator, else undefined
  Tensor z_ratio;  // class-weighted "mean" with z_loss: den / n_valid, else undefined
};

CeForward ce_forward(const Tensor& logits, const Tensor& target, const optional<Tensor>& weight,
                     int64_t ignore_index, int64_t reduction, double label_smoothing,
                     double z_loss, double softcap) {
  TORCH_CHECK_VALUE(reduction == kNone || reduction == kMean || reduction == kSum,
                    "reduction must be 0 (none), 1 (mean) or 2 (sum), got ", reduction);
  check_dim("logits", logits, 2);
  check_shape("target", target, {logits.size(0)});
  check_device("target", target, logits, "logits");
  TORCH_CHECK_TYPE(target.scalar_type() == at::kLong, "target must be int64, got ",
                   target.scalar_type());
  const auto cdtype = compute_dtype(logits);
  CeForward f;
  if (weight.has_value() && weight->defined()) {
    check_floating("weight", *weight);
    check_device("weight", *weight, logits, "logits");
    check_shape("weight", *weight, {logits.size(1)});
    f.weight = to_dtype(*weight, cdtype).contiguous();
  }
  if (reduction == kMean) {
    // the z-term is averaged over the valid rows, the rest over sum w[t]: with a class weight
    // the kernels scale the z-term by den / n_valid so that sum(loss) / den is that mean
    const bool ratio = f.weight.defined() && z_loss > 0.0;
    Denominator d = mean_denominator(target, f.weight, ignore_index, cdtype, ratio);
    f.den = d.den;
    if (ratio) f.z_ratio = d.den.div(d.count.clamp_min(1));
  }
  static auto fwd = c10::Dispatcher::singleton()
                        .findSchemaOrThrow("llmcore::cross_entropy_fwd", "")
                        .typed<decltype(cross_entropy_fwd)>();
  auto [loss, lse] = fwd.call(logits, target, f.weight, ignore_index, label_smoothing, z_loss,
                              softcap, f.z_ratio);
  f.lse = lse;
  if (reduction == kNone) f.out = to_dtype(loss, logits.scalar_type());
  else if (reduction == kSum) f.out = to_dtype(loss.sum(), logits.scalar_type());
  else f.out = to_dtype(mean_of_sum(loss.sum(), f.den), logits.scalar_type());
  return f;
}

// What the autograd Functions below keep for their backward besides tensors: the options, as
// doubles (ignore_index and the reduction code are exact in them); and no zero-filled gradient
// is made up when the loss is unused.
void save_options(torch::autograd::AutogradContext* ctx, int64_t ignore_index, int64_t reduction,
                  double label_smoothing, double z_loss, double softcap) {
  ctx->saved_data["options"] = c10::List<double>({double(ignore_index), double(reduction),
                                                   label_smoothing, z_loss, softcap});
  ctx->set_materialize_grads(false);
}

class CrossEntropyFunction : public torch::autograd::Function<CrossEntropyFunction> {
 public:
  static Tensor forward(torch::autograd::AutogradContext* ctx, const Tensor& logits,
                        const Tensor& target, const optional<Tensor>& weight,
                        int64_t ignore_index, int64_t reduction, double label_smoothing,
                        double z_loss, double softcap) {
    at::AutoDispatchBelowADInplaceOrView below;
    CeForward f = ce_forward(logits, target, weight, ignore_index, reduction, label_smoothing,
                             z_loss, softcap);
    ctx->save_for_backward({logits, target, f.weight, f.lse, f.den, f.z_ratio});
    save_options(ctx, ignore_index, reduction, label_smoothing, z_loss, softcap);
    return f.out;
  }

  // dlogits = (dloss_i / dlogits) * g_i with g_i = grad (none), grad (sum), grad / den (mean)
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    torch::autograd::variable_list out(8);
    const Tensor& grad = grads[0];
    if (!grad.defined() || !ctx->needs_input_grad(0)) return out;
    const auto saved = ctx->get_saved_variables();
    const Tensor &logits = saved[0], &target = saved[1], &weight = saved[2], &lse = saved[3],
                 &den = saved[4], &z_ratio = saved[5];
    const auto o = ctx->saved_data["options"].toDoubleList();
    const auto reduction = int64_t(o[1]);
    // the kernel ops below have no autograd of their own: skip the Autograd key (its boxed
    // not-implemented fallback costs microseconds per call)
    at::AutoDispatchBelowADInplaceOrView below;
    const Tensor dloss = reduction == kMean ? grad.div(den) : grad;  // (rows,) or 0-dim
    static auto bwd = c10::Dispatcher::singleton()
                          .findSchemaOrThrow("llmcore::cross_entropy_bwd", "")
                          .typed<decltype(cross_entropy_bwd)>();
    out[0] = bwd.call(dloss, logits, target, weight, lse, int64_t(o[0]), o[2], o[3], o[4],
                      z_ratio);
    return out;
  }
};

Tensor cross_entropy_autograd(const Tensor& logits, const Tensor& target,
                              const optional<Tensor>& weight, int64_t ignore_index,
                              int64_t reduction, double label_smoothing, double z_loss,
                              double softcap) {
  return CrossEntropyFunction::apply(logits, target, weight, ignore_index, reduction,
                                     label_smoothing, z_loss, softcap);
}

// Below autograd (inference mode, or a caller that has already differentiated): forward only.
Tensor cross_entropy_forward_only(const Tensor& logits, const Tensor& target,
                                  const optional<Tensor>& weight, int64_t ignore_index,
                                  int64_t reduction, double label_smoothing, double z_loss,
                                  double softcap) {
  return ce_forward(logits, target, weight, ignore_index, reduction, label_smoothing, z_loss,
                    softcap).out;
}


// ---------------------------------------------------------------- llmcore::linear_cross_entropy
// cross_entropy(linear(input, weight, bias), target) with the whole (rows, classes) logits in
// one piece, autograd in C++: linear_cross_entropy's eager call on the native backend when every
// row fits one chunk (the small calls, where host overhead is most of the cost; larger calls take
// the Python chunk loop of llmcore/ops/cross_entropy.py). It does what that loop's one-chunk
// schedule does, in the same order, so both give bit-identical results:
//   forward:  logits = input W^T + b (rows, classes), per-row loss and lse, reduced;
//   backward: dlogits = dloss/dlogits * g written over the kept logits (g = 1/count * grad for
//             "mean", grad for "sum", grad_i for "none"), then dx = dlogits W,
//             dW = dlogits^T input, db = sum_rows dlogits (fp32, rounded once).
// The logits are this op's own buffer: the backward overwrites them (no second (rows, classes)
// buffer). A second backward (retain_graph) finds them spent and recomputes them.

// linear(input, weight, bias) for a 2-D input through llmcore::gemm (llmcore's GEMM for fp32,
// at::addmm / at::mm otherwise: what the chunk loop's native mm_into calls, the same bits) into
// an empty_output buffer: the logits are the op's largest tensor.
Tensor linear_logits(const Tensor& input, const Tensor& weight, const optional<Tensor>& bias) {
  return gemm_call(input, weight.t(),
                   bias.has_value() && bias->defined() ? bias : std::nullopt);
}

using RowsSig = Tensor(Tensor&, const Tensor&, const optional<Tensor>&, int64_t, double, double,
                       double, const Tensor&);

class LinearCrossEntropyFunction
    : public torch::autograd::Function<LinearCrossEntropyFunction> {
 public:
  static Tensor forward(torch::autograd::AutogradContext* ctx, const Tensor& input,
                        const Tensor& weight, const optional<Tensor>& bias, const Tensor& target,
                        int64_t ignore_index, int64_t reduction, double label_smoothing,
                        double z_loss, double softcap) {
    at::AutoDispatchBelowADInplaceOrView below;
    Tensor logits = linear_logits(input, weight, bias);  // (rows, classes)
    CeForward f = ce_forward(logits, target, std::nullopt, ignore_index, reduction,
                             label_smoothing, z_loss, softcap);
    // the gradient scale of "mean" is 1/count times grad (the chunk loop's order of operations)
    const Tensor base = reduction == kMean ? f.den.reciprocal() : Tensor();
    ctx->save_for_backward({input, weight, bias.value_or(Tensor()), target, base});
    ctx->saved_data["logits"] = logits;
    save_options(ctx, ignore_index, reduction, label_smoothing, z_loss, softcap);
    return f.out;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    torch::autograd::variable_list out(9);
    const Tensor& grad = grads[0];
    const bool want_x = ctx->needs_input_grad(0), want_w = ctx->needs_input_grad(1);
    const auto saved = ctx->get_saved_variables();
    const Tensor &input = saved[0], &weight = saved[1], &bias = saved[2], &target = saved[3],
                 &base = saved[4];
    const bool want_b = bias.defined() && ctx->needs_input_grad(2);
    if (!grad.defined() || !(want_x || want_w || want_b)) return out;
    const auto o = ctx->saved_data["options"].toDoubleList();
    const auto cdtype = compute_dtype(input);
    at::AutoDispatchBelowADInplaceOrView below;
    Tensor logits;
    if (ctx->saved_data["logits"].isTensor()) {
      logits = ctx->saved_data["logits"].toTensor();
      ctx->saved_data["logits"] = c10::IValue();  // overwritten below: spent
    } else {
      logits = linear_logits(input, weight, bias.defined() ? optional<Tensor>(bias) : std::nullopt);
    }
    const Tensor g = to_dtype(grad, cdtype);
    const Tensor scale = base.defined() ? base.mul(g) : g;  // 0-dim, or (rows,) for "none"
    static auto rows = c10::Dispatcher::singleton()
                           .findSchemaOrThrow("llmcore::cross_entropy_rows_", "")
                           .typed<RowsSig>();
    rows.call(logits, target, std::nullopt, int64_t(o[0]), o[2], o[3], o[4], scale);
    const Tensor& dlogits = logits;  // (rows, classes), in the input's dtype
    if (want_x) out[0] = gemm_call(dlogits, weight, std::nullopt);
    if (want_w) out[1] = gemm_call(dlogits.t(), input, std::nullopt);
    if (want_b) out[2] = to_dtype(dlogits.sum(0, /*keepdim=*/false, cdtype), bias.scalar_type());
    return out;
  }
};

void check_linear_cross_entropy(const Tensor& input, const Tensor& weight,
                                const optional<Tensor>& bias, const Tensor& target) {
  check_dim("input", input, 2);
  check_dim("weight", weight, 2);
  TORCH_CHECK_VALUE(weight.size(1) == input.size(1), "weight must have shape (V, ",
                    input.size(1), "), got ", weight.sizes());
  check_device("weight", weight, input, "input");
  check_same_dtype("weight", weight, input, "input");
  if (bias.has_value() && bias->defined()) {
    check_shape("bias", *bias, {weight.size(0)});
    check_device("bias", *bias, input, "input");
    check_same_dtype("bias", *bias, input, "input");
  }
  TORCH_CHECK_VALUE(input.size(0) > 0, "input must have at least one row, got shape ",
                    input.sizes());
}

Tensor linear_cross_entropy_autograd(const Tensor& input, const Tensor& weight,
                                     const optional<Tensor>& bias, const Tensor& target,
                                     int64_t ignore_index, int64_t reduction,
                                     double label_smoothing, double z_loss, double softcap) {
  check_linear_cross_entropy(input, weight, bias, target);
  return LinearCrossEntropyFunction::apply(input, weight, bias, target, ignore_index, reduction,
                                           label_smoothing, z_loss, softcap);
}

// Below autograd: forward only, nothing kept.
Tensor linear_cross_entropy_forward_only(const Tensor& input, const Tensor& weight,
                                         const optional<Tensor>& bias, const Tensor& target,
                                         int64_t ignore_index, int64_t reduction,
                                         double label_smoothing, double z_loss, double softcap) {
  check_linear_cross_entropy(input, weight, bias, target);
  return ce_forward(linear_logits(input, weight, bias), target, std::nullopt, ignore_index,
                    reduction, label_smoothing, z_loss, softcap).out;
}

}  // namespace
}  // namespace ops
}  // namespace llmcore

TORCH_LIBRARY_IMPL(llmcore, CPU, m) {
  m.impl("cross_entropy_fwd", &llmcore::ops::cross_entropy_fwd);
  m.impl("cross_entropy_bwd", &llmcore::ops::cross_entropy_bwd);
  m.impl("cross_entropy_rows_", &llmcore::ops::cross_entropy_rows_);
  m.impl("cross_entropy_check_targets", &llmcore::ops::cross_entropy_check_targets);
}

#ifdef LLMCORE_WITH_CUDA
TORCH_LIBRARY_IMPL(llmcore, CUDA, m) {
  m.impl("cross_entropy_fwd", &llmcore::ops::cross_entropy_fwd);
  m.impl("cross_entropy_bwd", &llmcore::ops::cross_entropy_bwd);
  m.impl("cross_entropy_rows_", &llmcore::ops::cross_entropy_rows_);
}
#endif

TORCH_LIBRARY_IMPL(llmcore, Autograd, m) {
  m.impl("cross_entropy", &llmcore::ops::cross_entropy_autograd);
  m.impl("linear_cross_entropy", &llmcore::ops::linear_cross_entropy_autograd);
}

TORCH_LIBRARY_IMPL(llmcore, CompositeExplicitAutograd, m) {
  m.impl("cross_entropy", &llmcore::ops::cross_entropy_forward_only);
  m.impl("linear_cross_entropy", &llmcore::ops::linear_cross_entropy_forward_only);
}
