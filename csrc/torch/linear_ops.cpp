// llmcore::gemm and llmcore::gemm_into, the fp32 CPU matrix product (csrc/cpu/gemm.cpp) as torch
// ops: float32 CPU tensors go through llmcore's GEMM, any other dtype or device through at::mm /
// at::addmm (the ops are total; the speed-up is fp32's). llmcore.linear's autograd is Python's
// (llmcore/ops/linear.py) over gemm: a C++ autograd Function that saves only its inputs is not
// recomputed by torch.utils.checkpoint's non-reentrant mode when it is the region's last op
// (no tensor saved in the recomputation), and the model's blocks end with a projection. The
// fake impls are registered in Python.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/library.h>

#include "checks.h"
#include "output_alloc.h"
#include "shapes.h"
#include "llmcore/gemm.h"

namespace llmcore {
namespace ops {
namespace {

using at::Tensor;
using std::optional;

// Whether llmcore's GEMM takes a (m, k) @ b (k, n): float32 CPU tensors on an AVX-512 CPU (the
// only kind it was measured on; sgemm_cpu_preferred), unless the rows are too few to pay for
// packing B. A transposed B (x W^T, every projection's forward) is transposed
// into panels, which loses to MKL's sgemm below ~48 rows (at 1 row, a decoding step, it ran at
// 0.23-0.43x MKL's speed; measured in benchmarks/results/cpu-gemm-2026-12-01/gemm_small_m.txt);
// a row-major B is copied, which pays from 4 rows.
bool ours(const Tensor& a, const Tensor& b) {
  if (!(a.device().is_cpu() && a.scalar_type() == at::kFloat && b.scalar_type() == at::kFloat))
    return false;
  static const bool preferred = sgemm_cpu_preferred();  // AVX-512: the measured path
  if (!preferred) return false;
  const bool b_transposed = b.stride(0) == 1 && b.stride(1) != 1;
  return a.size(0) >= (b_transposed ? 64 : 4);
}

void check_gemm(const Tensor& a, const Tensor& b, const optional<Tensor>& bias) {
  check_dim("a", a, 2);
  check_dim("b", b, 2);
  check_device("b", b, a, "a");
  check_same_dtype("b", b, a, "a");
  TORCH_CHECK_VALUE(b.size(0) == a.size(1), "b must have a's columns (", a.size(1),
                    ") as rows, got shape ", b.sizes());
  if (given(bias)) {
    check_shape("bias", *bias, {b.size(1)});
    check_device("bias", *bias, a, "a");
    check_same_dtype("bias", *bias, a, "a");
  }
}

// c (m, n), unit column stride, (+)= a @ b [+ bias]: llmcore's GEMM for fp32 CPU tensors
void run_gemm(Tensor& c, const Tensor& a, const Tensor& b, const optional<Tensor>& bias,
              bool accumulate) {
  GemmParams p;
  p.m = a.size(0);
  p.n = b.size(1);
  p.k = a.size(1);
  p.a = a.const_data_ptr<float>();
  p.a_rs = a.stride(0);
  p.a_ks = a.stride(1);
  p.b = b.const_data_ptr<float>();
  p.b_ks = b.stride(0);
  p.b_ns = b.stride(1);
  if (given(bias)) {
    p.bias = bias->const_data_ptr<float>();
    p.bias_stride = bias->stride(0);
  }
  p.c = c.mutable_data_ptr<float>();
  p.ldc = c.stride(0);
  p.accumulate = accumulate;
  p.num_threads = at::get_num_threads();
  sgemm_cpu(p);
}

}  // namespace

// a (m, k) @ b (k, n) [+ bias (n,)] -> (m, n) contiguous, in a's dtype; any strides
// at::mm / at::addmm below compute in the inputs' dtype, as llmcore's GEMM does, whether or not
// an autocast region is active (its dispatch keys are still set under this kernel): one op, one
// dtype, whichever of the two runs a call.
static c10::impl::ExcludeDispatchKeyGuard no_autocast() {
  return c10::impl::ExcludeDispatchKeyGuard(
      c10::DispatchKeySet({c10::DispatchKey::AutocastCPU, c10::DispatchKey::AutocastCUDA}));
}

Tensor gemm(const Tensor& a, const Tensor& b, const optional<Tensor>& bias) {
  check_gemm(a, b, bias);
  if (!ours(a, b)) {
    const auto guard = no_autocast();
    return given(bias) ? at::addmm(*bias, a, b) : at::mm(a, b);
  }
  Tensor c = empty_output({a.size(0), b.size(1)}, a.options());
  run_gemm(c, a, b, bias, false);
  return c;
}

namespace {

// out (m, n) = a @ b [+ bias], or out += a @ b with accumulate (no bias then): into an existing
// matrix with a unit column stride (a row block of a larger one, for linear_cross_entropy's
// chunks)
void gemm_into(Tensor& out, const Tensor& a, const Tensor& b, const optional<Tensor>& bias,
               bool accumulate) {
  check_gemm(a, b, bias);
  check_device("out", out, a, "a");
  check_same_dtype("out", out, a, "a");
  check_shape("out", out, {a.size(0), b.size(1)});
  TORCH_CHECK_VALUE(!(accumulate && given(bias)), "gemm_into adds a bias only when it does not "
                    "accumulate");
  if (!ours(a, b) || (out.numel() > 0 && out.stride(1) != 1)) {
    const auto guard = no_autocast();
    if (accumulate) out.addmm_(a, b);
    else if (given(bias)) at::addmm_out(out, *bias, a, b);
    else at::mm_out(out, a, b);
    return;
  }
  run_gemm(out, a, b, bias, accumulate);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(llmcore, m) {
  // a (m, k) @ b (k, n) [+ bias (n,)] -> (m, n), contiguous, any input strides: llmcore's GEMM
  // for float32 CPU tensors (llmcore/gemm.h), at::mm / at::addmm for any other dtype
  m.def("gemm(Tensor a, Tensor b, Tensor? bias=None) -> Tensor");
  // the same into out (m, n) (a unit column stride; rows may be a block of a larger matrix):
  // out = a @ b [+ bias], or out += a @ b with accumulate
  m.def("gemm_into(Tensor(a!) out, Tensor a, Tensor b, Tensor? bias=None, bool accumulate=False)"
        " -> ()");
}

TORCH_LIBRARY_IMPL(llmcore, CPU, m) {
  m.impl("gemm", &gemm);
  m.impl("gemm_into", &gemm_into);
}

#ifdef LLMCORE_WITH_CUDA
// CUDA tensors: at::mm / at::addmm (cuBLAS), for the native linear_cross_entropy's one-chunk op
TORCH_LIBRARY_IMPL(llmcore, CUDA, m) {
  m.impl("gemm", &gemm);
  m.impl("gemm_into", &gemm_into);
}
#endif

}  // namespace ops
}  // namespace llmcore
