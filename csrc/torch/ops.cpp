// llmcore._native: the Python module and the schemas of every llmcore op. The CPU/CUDA
// implementations live beside it (norm_ops.cpp, cross_entropy_ops.cpp, attention_ops.cpp),
// registered with TORCH_LIBRARY_IMPL; fake (meta) impls are registered in Python (llmcore/ops/).
#include <ATen/core/dispatch/Dispatcher.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>
#include <torch/csrc/utils/pybind.h>
#include <torch/library.h>

#include <optional>
#include <tuple>
#include <vector>

#include "eager_entry.h"
#include "op_handles.h"

TORCH_LIBRARY(llmcore, m) {
  // Norms over the rows of a (rows, cols) matrix. h is x + residual (an empty tensor without a
  // residual); mean is empty for rms; mean/rstd are fp32 (fp64 for fp64 inputs).
  m.def("norm_fwd(Tensor x, Tensor? residual, Tensor? weight, Tensor? bias, float eps, bool rms)"
        " -> (Tensor y, Tensor h, Tensor mean, Tensor rstd)");
  // dh: gradient of the returned h, or None. dweight/dbias (fp32, fp64 for fp64 inputs) are
  // empty unless asked for.
  m.def("norm_bwd(Tensor dy, Tensor? dh, Tensor h, Tensor? weight, Tensor mean, Tensor rstd,"
        " bool rms, bool weight_grad, bool bias_grad)"
        " -> (Tensor dx, Tensor dweight, Tensor dbias)");
  // The differentiable norm the eager path calls (autograd in C++, over the two ops above):
  // x (..., d1..dk) normalised over its last norm_ndim dims; weight/bias of those dims.
  // Returns y, and h = x + residual (an empty tensor without a residual), in x's shape.
  m.def("norm(Tensor x, Tensor? residual, Tensor? weight, Tensor? bias, int norm_ndim,"
        " float eps, bool rms) -> (Tensor y, Tensor h)");
  // Cross-entropy over the rows of (rows, classes) logits; target int64 (rows,). Per-row loss
  // (0 on ignored rows) and logsumexp, fp32 (fp64 for fp64 logits); the reduction is the
  // caller's. softcap 0 means no cap. z_ratio: a 0-dim scale of the (unweighted) z-loss term,
  // None for 1 (see llmcore/cross_entropy.h).
  m.def("cross_entropy_fwd(Tensor logits, Tensor target, Tensor? weight, int ignore_index,"
        " float label_smoothing, float z_loss, float softcap, Tensor? z_ratio=None)"
        " -> (Tensor loss, Tensor lse)");
  m.def("cross_entropy_bwd(Tensor dloss, Tensor logits, Tensor target, Tensor? weight,"
        " Tensor lse, int ignore_index, float label_smoothing, float z_loss, float softcap,"
        " Tensor? z_ratio=None) -> Tensor dlogits");
  // Both at once for linear_cross_entropy's chunks: returns the per-row loss and overwrites
  // logits with dloss/dlogits * grad_scale (0-dim or (rows,)).
  m.def("cross_entropy_rows_(Tensor(a!) logits, Tensor target, Tensor? weight, int ignore_index,"
        " float label_smoothing, float z_loss, float softcap, Tensor grad_scale) -> Tensor loss");
  // The whole loss, reduced (reduction: 0 none -> (rows,), 1 mean, 2 sum -> 0-dim; in logits'
  // dtype), differentiable wrt logits by a C++ autograd kernel over the two ops above:
  // llmcore.cross_entropy's one call on the native backend.
  m.def("cross_entropy(Tensor logits, Tensor target, Tensor? weight, int ignore_index,"
        " int reduction, float label_smoothing, float z_loss, float softcap) -> Tensor");
  // cross_entropy(linear(input, weight, bias), target) for (rows, hidden) input and (classes,
  // hidden) weight, the logits in one piece (kept for, and overwritten by, the backward):
  // llmcore.linear_cross_entropy's eager call on the native backend when one chunk holds every
  // row. Differentiable wrt input, weight and bias by a C++ autograd kernel.
  m.def("linear_cross_entropy(Tensor input, Tensor weight, Tensor? bias, Tensor target,"
        " int ignore_index, int reduction, float label_smoothing, float z_loss, float softcap)"
        " -> Tensor");
  // CPU only: ValueError unless every target is in [0, classes) or ignore_index (the public
  // functions' range check, one call instead of several tensor ops)
  m.def("cross_entropy_check_targets(Tensor target, int classes, int ignore_index) -> ()");
}

namespace {

using at::Tensor;
using namespace llmcore::ops;  // typed_op, OptT and the ops' signatures (op_handles.h)

bool has_cuda() {
#ifdef LLMCORE_WITH_CUDA
  return true;
#else
  return false;
#endif
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  // The ops need libtorch's dispatcher: make sure torch is initialised first.
  pybind11::module_::import("torch");
  m.doc() = "llmcore's compiled kernels; the ops are registered under torch.ops.llmcore";
  m.def("has_cuda", &has_cuda, "True when this build contains the CUDA kernels");

  // Eager entry points of the ops the public functions call: the same dispatcher call as
  // torch.ops.llmcore.<op>.default (every dispatch key, mode and subclass applies), without
  // torch.ops' boxed path from Python (arguments parsed into IValues against the schema: ~2 us
  // a call, as much as a small kernel). Dynamo cannot trace these: under torch.compile the
  // wrappers in llmcore/ops call torch.ops instead. Like torch's own bindings, they release the
  // GIL while the op runs.
  m.def("norm", [op = typed_op<NormSig>("llmcore::norm")](
                    const Tensor& x, OptT residual, OptT weight, OptT bias, int64_t norm_ndim,
                    double eps, bool rms) {
    pybind11::gil_scoped_release no_gil;
    return op.call(x, residual, weight, bias, norm_ndim, eps, rms);
  });
  m.def("cross_entropy", [op = typed_op<CrossEntropySig>("llmcore::cross_entropy")](
                             const Tensor& logits, const Tensor& target, OptT weight,
                             int64_t ignore_index, int64_t reduction, double label_smoothing,
                             double z_loss, double softcap) {
    pybind11::gil_scoped_release no_gil;
    return op.call(logits, target, weight, ignore_index, reduction, label_smoothing, z_loss,
                   softcap);
  });
  m.def("linear_cross_entropy",
        [op = typed_op<LinearCrossEntropySig>("llmcore::linear_cross_entropy")](
            const Tensor& input, const Tensor& weight, OptT bias, const Tensor& target,
            int64_t ignore_index, int64_t reduction, double label_smoothing, double z_loss,
            double softcap) {
          pybind11::gil_scoped_release no_gil;
          return op.call(input, weight, bias, target, ignore_index, reduction, label_smoothing,
                         z_loss, softcap);
        });
  using CheckTargetsSig = void(const Tensor&, int64_t, int64_t);
  m.def("cross_entropy_check_targets",
        [op = typed_op<CheckTargetsSig>("llmcore::cross_entropy_check_targets")](
            const Tensor& target, int64_t classes, int64_t ignore_index) {
          pybind11::gil_scoped_release no_gil;
          op.call(target, classes, ignore_index);
        });
  m.def("attention", [op = typed_op<AttentionSig>("llmcore::attention")](
                         const Tensor& q, const Tensor& k, const Tensor& v, OptT attn_mask,
                         OptT alibi_slopes, OptT cu_seqlens_q, OptT cu_seqlens_k, OptT seed,
                         const std::vector<double>& floats, const std::vector<int64_t>& ints) {
    pybind11::gil_scoped_release no_gil;
    return op.call(q, k, v, attn_mask, alibi_slopes, cu_seqlens_q, cu_seqlens_k, seed, floats,
                   ints);
  });
  // swiglu: the differentiable op (autograd in C++, csrc/torch/swiglu_ops.cpp)
  m.def("swiglu", [op = typed_op<SwigluSig>("llmcore::swiglu")](const Tensor& x) {
    pybind11::gil_scoped_release no_gil;
    return op.call(x);
  });
  // gelu: the differentiable op (autograd in C++, csrc/torch/gelu_ops.cpp)
  m.def("gelu", [op = typed_op<GeluSig>("llmcore::gelu")](const Tensor& x, const std::string& a) {
    pybind11::gil_scoped_release no_gil;
    return op.call(x, a);
  });
  // gemm: llmcore.linear's matrix product (csrc/torch/linear_ops.cpp)
  m.def("gemm", [op = typed_op<GemmSig>("llmcore::gemm")](const Tensor& a, const Tensor& b,
                                                          OptT bias) {
    pybind11::gil_scoped_release no_gil;
    return op.call(a, b, bias);
  });
  // The public functions' ordinary calls in one crossing each (eager_entry.cpp): None for any
  // call they do not admit, which then takes the Python path above.
  llmcore::ops::def_eager_entries(m);
}
