// llmcore._native: the Python module and the schemas of every llmcore op. The CPU/CUDA
// implementations live beside it (norm_ops.cpp, cross_entropy_ops.cpp), registered with
// TORCH_LIBRARY_IMPL; fake (meta) impls and autograd are registered in Python (llmcore/ops/).
#include <pybind11/pybind11.h>
#include <torch/library.h>

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
  // CPU only: ValueError unless every target is in [0, classes) or ignore_index (the public
  // functions' range check, one call instead of several tensor ops)
  m.def("cross_entropy_check_targets(Tensor target, int classes, int ignore_index) -> ()");
}

namespace {

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
}
