// llmcore::rope_rotate: the CPU rotary-embedding kernel (csrc/cpu/rope.cpp) as a torch op. Its
// autograd (the same op with backward=true on the gradients) and fake impl are registered in
// Python (llmcore/ops/rope.py), like the Triton twin.
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <tuple>

#include "checks.h"
#include "output_alloc.h"
#include "llmcore/rope.h"

namespace llmcore {
namespace ops {
namespace {

using at::Tensor;

std::tuple<Tensor, Tensor> rope_rotate(const Tensor& q, const Tensor& k, const Tensor& cos,
                                       const Tensor& sin, bool backward) {
  check_dim("q", q, 3);
  check_dim("k", k, 3);
  check_same_dtype("k", k, q, "q");
  check_device("k", k, q, "q");
  const int64_t tokens = q.size(0), d = q.size(2);
  TORCH_CHECK_VALUE(k.size(0) == tokens && k.size(2) == d, "k must be (", tokens, ", heads, ",
                    d, ") like q, got ", k.sizes());
  TORCH_CHECK_VALUE(d % 2 == 0, "the head dim must be even, got ", d);
  TORCH_CHECK_VALUE(tokens == 0 || (q.stride(2) == 1 && k.stride(2) == 1),
                    "q and k need a unit stride on the head dim");
  auto check_table = [&](const char* name, const Tensor& t) {
    check_floating(name, t);
    check_device(name, t, q, "q");
    TORCH_CHECK_VALUE(t.dim() == 2 && t.size(1) == d &&
                          (tokens == 0 || (t.size(0) > 0 && tokens % t.size(0) == 0)),
                      name, " must be (rows, ", d, ") with rows dividing the ", tokens,
                      " tokens, got ", t.sizes());
  };
  check_table("cos", cos);
  check_table("sin", sin);
  TORCH_CHECK_VALUE(cos.sizes() == sin.sizes(), "sin must have cos's shape ", cos.sizes(),
                    ", got ", sin.sizes());
  RopeParams p;
  p.dtype = kernel_dtype("q", q);
  p.backward = backward;
  p.tokens = tokens;
  p.half = d / 2;
  p.heads_q = q.size(1);
  p.heads_k = k.size(1);
  Tensor out_q = empty_output({tokens, p.heads_q, d}, q.options());
  Tensor out_k = empty_output({tokens, p.heads_k, d}, k.options());
  const auto table_type = compute_dtype(q);
  Tensor c = cos.to(table_type).contiguous(), s = sin.to(table_type).contiguous();
  p.rows = c.size(0);
  p.q = q.const_data_ptr();
  p.k = k.const_data_ptr();
  p.q_stride_t = q.stride(0);
  p.q_stride_h = q.stride(1);
  p.k_stride_t = k.stride(0);
  p.k_stride_h = k.stride(1);
  p.cos = c.const_data_ptr();
  p.sin = s.const_data_ptr();
  p.out_q = out_q.mutable_data_ptr();
  p.out_k = out_k.mutable_data_ptr();
  p.num_threads = at::get_num_threads();
  rope_cpu(p);
  return {out_q, out_k};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(llmcore, m) {
  // q (tokens, Hq, D), k (tokens, Hkv, D) with a unit stride on D; cos, sin (rows, D), token t
  // using row t % rows. Returns the rotated q and k (backward: the transposed rotation, i.e.
  // the gradients), contiguous, in q's dtype. See llmcore/rope.h.
  m.def("rope_rotate(Tensor q, Tensor k, Tensor cos, Tensor sin, bool backward)"
        " -> (Tensor q_out, Tensor k_out)");
}

TORCH_LIBRARY_IMPL(llmcore, CPU, m) { m.impl("rope_rotate", &rope_rotate); }

}  // namespace ops
}  // namespace llmcore
