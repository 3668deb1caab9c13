// llmcore::attention_fwd / llmcore::attention_bwd: schemas and CPU implementations (checks, one
// params struct, the kernel call). The kernels are in csrc/cpu/attention.cpp; fake impls and
// autograd are registered in llmcore/ops/attention.py. fp16/bf16 inputs run in fp32 (upcast
// here, results cast back once); fp32 and fp64 run as they are.
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <ATen/ops/where.h>
#include <ATen/ops/zeros.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <optional>
#include <tuple>
#include <vector>

#include "checks.h"
#include "output_alloc.h"
#include "shapes.h"
#include "llmcore/attention.h"

namespace llmcore {
namespace ops {
namespace {

using at::Tensor;
using std::optional;

// A (B, H, N, D) tensor as the kernel reads it: compute dtype, last dim contiguous.
Tensor as_kernel(const Tensor& t, at::ScalarType cdtype) {
  Tensor r = t.scalar_type() == cdtype ? t : t.to(cdtype);
  return r.stride(3) == 1 || r.size(3) <= 1 ? r : r.contiguous();
}

void set_strides(int64_t* dst, const Tensor& t) {
  for (int i = 0; i < 3; ++i) dst[i] = t.stride(i);
}

// The gradient of a (B, H, N, D) input: dense, (B, N, H, D) in memory when the input's heads
// are inner to its rows (the (B, N, H, D) views flash_attn_func and the model's fused QKV
// projection hand over), else contiguous. The gradient of such a view then transposes back to
// a contiguous (B, N, H, D) tensor without the copy a (B, H, N, D) gradient costs there. Not
// zeroed: the kernel writes every element (the fake impl in llmcore/ops/attention.py follows
// the same layout rule).
Tensor grad_like(const Tensor& t, const at::TensorOptions& opts) {
  const bool heads_inner = t.stride(1) < t.stride(2);
  const std::vector<int64_t> sizes =
      heads_inner ? std::vector<int64_t>{t.size(0), t.size(2), t.size(1), t.size(3)}
                  : t.sizes().vec();
  Tensor g = empty_output(sizes, opts);
  return heads_inner ? g.transpose(1, 2) : g;
}

// Everything but the tensors' data: shapes, options, varlen offsets, mask and slopes.
struct Prepared {
  AttentionParams p;
  Tensor q, k, v, mask, alibi, cu_q, cu_k;
  at::ScalarType cdtype;
};

Prepared prepare(const Tensor& q_in, const Tensor& k_in, const Tensor& v_in,
                 const optional<Tensor>& attn_mask, const optional<Tensor>& alibi_slopes,
                 const optional<Tensor>& cu_seqlens_q, const optional<Tensor>& cu_seqlens_k,
                 const optional<Tensor>& seed, at::ArrayRef<double> floats,
                 at::IntArrayRef ints) {
  TORCH_CHECK_VALUE(floats.size() == 3, "floats must be [scale, softcap, dropout_p], got ",
                    floats.size(), " values");
  TORCH_CHECK_VALUE(ints.size() == 5, "ints must be [window_left, window_right, bottom_right, "
                    "max_seqlen_q, max_seqlen_k], got ", ints.size(), " values");
  for (auto [name, t] : {std::make_pair("q", &q_in), std::make_pair("k", &k_in),
                         std::make_pair("v", &v_in)}) {
    TORCH_CHECK_VALUE(t->device().is_cpu(), name, " must be a CPU tensor for the native "
                      "attention kernel (CUDA attention is not built), got ", t->device());
    check_dim(name, *t, 4);
    kernel_dtype(name, *t);
    if (t != &q_in) check_same_dtype(name, *t, q_in, "q");
  }
  const int64_t B = q_in.size(0), Hq = q_in.size(1), Nq = q_in.size(2), D = q_in.size(3);
  const int64_t Hkv = k_in.size(1), Nk = k_in.size(2), Dv = v_in.size(3);
  TORCH_CHECK_VALUE(k_in.size(0) == B && v_in.size(0) == B, "k and v must have q's batch ", B);
  TORCH_CHECK_VALUE(k_in.size(3) == D, "k's head dim must be q's ", D, ", got ", k_in.size(3));
  TORCH_CHECK_VALUE(v_in.size(1) == Hkv && v_in.size(2) == Nk, "v must have k's heads and "
                    "length (", Hkv, ", ", Nk, "), got ", v_in.sizes());
  TORCH_CHECK_VALUE(Hkv > 0 ? Hq % Hkv == 0 : Hq == 0, "q's heads (", Hq,
                    ") must be a multiple of k's (", Hkv, ")");
  const double dropout_p = floats[2];
  TORCH_CHECK_VALUE(dropout_p >= 0.0 && dropout_p < 1.0, "dropout_p must be in [0, 1), got ",
                    dropout_p);
  TORCH_CHECK_VALUE(floats[1] >= 0.0, "softcap must be >= 0, got ", floats[1]);
  TORCH_CHECK_VALUE(ints[0] >= -1 && ints[1] >= -1, "window must be ints >= -1, got (", ints[0],
                    ", ", ints[1], ")");

  Prepared r;
  r.cdtype = compute_dtype(q_in);
  r.q = as_kernel(q_in, r.cdtype);
  r.k = as_kernel(k_in, r.cdtype);
  r.v = as_kernel(v_in, r.cdtype);
  AttentionParams& p = r.p;
  p.dtype = r.cdtype == at::kDouble ? DType::kFloat64 : DType::kFloat32;
  p.batch = B;
  p.heads_q = Hq;
  p.heads_kv = Hkv;
  p.seqlen_q = Nq;
  p.seqlen_k = Nk;
  p.head_dim = D;
  p.head_dim_v = Dv;
  p.q = r.q.const_data_ptr();
  p.k = r.k.const_data_ptr();
  p.v = r.v.const_data_ptr();
  set_strides(p.q_stride, r.q);
  set_strides(p.k_stride, r.k);
  set_strides(p.v_stride, r.v);
  p.scale = floats[0];
  p.softcap = floats[1];
  p.dropout_p = dropout_p;
  p.window_left = ints[0];
  p.window_right = ints[1];
  p.bottom_right = ints[2] != 0;
  p.num_threads = at::get_num_threads();

  if (given(cu_seqlens_q) || given(cu_seqlens_k)) {
    TORCH_CHECK_VALUE(given(cu_seqlens_q) && given(cu_seqlens_k),
                      "cu_seqlens_q and cu_seqlens_k must be given together");
    TORCH_CHECK_VALUE(B == 1, "varlen attention takes q with batch 1, got ", B);
    TORCH_CHECK_VALUE(!given(attn_mask), "attn_mask cannot be combined with cu_seqlens");
    r.cu_q = cu_seqlens_q->to(at::kLong).contiguous();
    r.cu_k = cu_seqlens_k->to(at::kLong).contiguous();
    TORCH_CHECK_VALUE(r.cu_q.dim() == 1 && r.cu_q.numel() >= 1 &&
                      r.cu_k.sizes() == r.cu_q.sizes(), "cu_seqlens_q and cu_seqlens_k must be "
                      "1-D of the same length batch + 1, got ", r.cu_q.sizes(), " and ",
                      r.cu_k.sizes());
    // offsets are host memory here: validate them, the kernel indexes with them
    for (auto [name, cu, total, max_len] :
         {std::make_tuple("cu_seqlens_q", &r.cu_q, Nq, &p.max_len_q),
          std::make_tuple("cu_seqlens_k", &r.cu_k, Nk, &p.max_len_k)}) {
      const int64_t* o = cu->const_data_ptr<int64_t>();
      bool ok = o[0] == 0 && o[cu->numel() - 1] == total;
      for (int64_t s = 1; s < cu->numel(); ++s) {
        ok = ok && o[s] >= o[s - 1];
        *max_len = std::max(*max_len, o[s] - o[s - 1]);
      }
      TORCH_CHECK_VALUE(ok, name, " must start at 0, be non-decreasing and end at ", total);
    }
    p.cu_seqlens_q = r.cu_q.const_data_ptr<int64_t>();
    p.cu_seqlens_k = r.cu_k.const_data_ptr<int64_t>();
    p.num_seqs = r.cu_q.numel() - 1;
  }
  const int64_t rows_alibi = p.cu_seqlens_q ? p.num_seqs : B;
  if (given(alibi_slopes)) {
    check_floating("alibi_slopes", *alibi_slopes);
    check_shape("alibi_slopes", *alibi_slopes, {rows_alibi, Hq});
    r.alibi = alibi_slopes->to(r.cdtype).contiguous();
    p.alibi = r.alibi.const_data_ptr();
  }
  if (given(attn_mask)) {
    const Tensor& m = *attn_mask;
    check_dim("attn_mask", m, 4);
    const int64_t want[4] = {B, Hq, Nq, Nk};
    for (int i = 0; i < 4; ++i)
      TORCH_CHECK_VALUE(m.size(i) == want[i] || m.size(i) == 1, "attn_mask must broadcast to (",
                        B, ", ", Hq, ", ", Nq, ", ", Nk, "), got ", m.sizes());
    if (m.scalar_type() == at::kBool) {  // True = attend -> 0, False -> -inf, same shape
      r.mask = at::where(m, at::zeros({}, m.options().dtype(r.cdtype)),
                         at::full({}, -std::numeric_limits<double>::infinity(),
                                  m.options().dtype(r.cdtype)));
    } else {
      check_floating("attn_mask", m);
      r.mask = m.to(r.cdtype);
    }
    p.mask = r.mask.const_data_ptr();
    for (int i = 0; i < 4; ++i) p.mask_stride[i] = r.mask.size(i) == 1 ? 0 : r.mask.stride(i);
  }
  if (dropout_p > 0) {
    TORCH_CHECK_VALUE(given(seed) && seed->numel() == 1 && seed->scalar_type() == at::kLong,
                      "seed must be an int64 tensor of one element when dropout_p > 0");
    p.seed = uint64_t(seed->to(at::kCPU).const_data_ptr<int64_t>()[0]);
  }
  return r;
}

std::tuple<Tensor, Tensor> attention_fwd(const Tensor& q, const Tensor& k, const Tensor& v,
                                         const optional<Tensor>& attn_mask,
                                         const optional<Tensor>& alibi_slopes,
                                         const optional<Tensor>& cu_seqlens_q,
                                         const optional<Tensor>& cu_seqlens_k,
                                         const optional<Tensor>& seed,
                                         at::ArrayRef<double> floats, at::IntArrayRef ints) {
  Prepared r = prepare(q, k, v, attn_mask, alibi_slopes, cu_seqlens_q, cu_seqlens_k, seed,
                       floats, ints);
  AttentionParams& p = r.p;
  // out in (B, Nq, Hq, Dv) memory, returned as a (B, Hq, Nq, Dv) view: the flash layouts'
  // final .contiguous() is then free
  Tensor out = empty_output({p.batch, p.seqlen_q, p.heads_q, p.head_dim_v},
                            q.options().dtype(r.cdtype)).transpose(1, 2);
  Tensor lse = at::empty({p.batch, p.heads_q, p.seqlen_q}, q.options().dtype(r.cdtype));
  p.out = out.mutable_data_ptr();
  set_strides(p.out_stride, out);
  p.lse = lse.mutable_data_ptr();
  attention_fwd_cpu(p);
  return {out.scalar_type() == q.scalar_type() ? out : out.to(q.scalar_type()), lse};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> attention_bwd(
    const Tensor& grad_out, const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& out,
    const Tensor& lse, const optional<Tensor>& attn_mask, const optional<Tensor>& alibi_slopes,
    const optional<Tensor>& cu_seqlens_q, const optional<Tensor>& cu_seqlens_k,
    const optional<Tensor>& seed, at::ArrayRef<double> floats, at::IntArrayRef ints,
    bool mask_grad) {
  Prepared r = prepare(q, k, v, attn_mask, alibi_slopes, cu_seqlens_q, cu_seqlens_k, seed,
                       floats, ints);
  AttentionParams& p = r.p;
  const std::vector<int64_t> out_shape = {p.batch, p.heads_q, p.seqlen_q, p.head_dim_v};
  check_shape("grad_out", grad_out, out_shape);
  check_shape("out", out, out_shape);
  check_shape("lse", lse, {p.batch, p.heads_q, p.seqlen_q});
  TORCH_CHECK_TYPE(lse.scalar_type() == r.cdtype, "lse must be ", r.cdtype, ", got ",
                   lse.scalar_type());
  TORCH_CHECK_VALUE(!mask_grad || given(attn_mask), "mask_grad needs an attn_mask");
  TORCH_CHECK_TYPE(!mask_grad || attn_mask->scalar_type() != at::kBool,
                   "a bool attn_mask has no gradient");
  const Tensor go = as_kernel(grad_out, r.cdtype), o = as_kernel(out, r.cdtype);
  const Tensor lse_c = lse.contiguous();
  const auto opts = q.options().dtype(r.cdtype);
  Tensor dq = grad_like(q, opts), dk = grad_like(k, opts), dv = grad_like(v, opts);
  Tensor dscores = mask_grad ? zeros_output({p.batch, p.heads_q, p.seqlen_q, p.seqlen_k}, opts)
                             : at::empty({0}, opts);
  p.out = const_cast<void*>(o.const_data_ptr());  // read only in the backward
  set_strides(p.out_stride, o);
  p.lse = const_cast<void*>(lse_c.const_data_ptr());
  p.dout = go.const_data_ptr();
  set_strides(p.dout_stride, go);
  p.dq = dq.mutable_data_ptr();
  p.dk = dk.mutable_data_ptr();
  p.dv = dv.mutable_data_ptr();
  set_strides(p.dq_stride, dq);
  set_strides(p.dk_stride, dk);
  set_strides(p.dv_stride, dv);
  p.dscores = mask_grad ? dscores.mutable_data_ptr() : nullptr;
  attention_bwd_cpu(p);
  const auto dt = q.scalar_type();
  Tensor dmask = mask_grad ? dscores.sum_to_size(attn_mask->sizes()).to(attn_mask->scalar_type())
                           : at::empty({0}, q.options());
  return {to_dtype(dq, dt), to_dtype(dk, dt), to_dtype(dv, dt), dmask};
}

// ---------------------------------------------------------------------------- llmcore::attention
// The differentiable op the eager path calls: a C++ autograd node over attention_fwd /
// attention_bwd (called through the dispatcher, so torch.compile traces down to their fake
// impls). Saved: q, k, v, out, lse and the optional tensors; lse has no gradient; the mask gets
// one only when it is a float mask that requires it.

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using AttnFwdOut = std::tuple<Tensor, Tensor>;
using AttnBwdOut = std::tuple<Tensor, Tensor, Tensor, Tensor>;
using OptT = const optional<Tensor>&;

const auto& attention_fwd_op() {
  static const auto op = c10::Dispatcher::singleton()
      .findSchemaOrThrow("llmcore::attention_fwd", "")
      .typed<AttnFwdOut(const Tensor&, const Tensor&, const Tensor&, OptT, OptT, OptT, OptT, OptT,
                        at::ArrayRef<double>, at::IntArrayRef)>();
  return op;
}

const auto& attention_bwd_op() {
  static const auto op = c10::Dispatcher::singleton()
      .findSchemaOrThrow("llmcore::attention_bwd", "")
      .typed<AttnBwdOut(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                        const Tensor&, OptT, OptT, OptT, OptT, OptT, at::ArrayRef<double>,
                        at::IntArrayRef, bool)>();
  return op;
}

optional<Tensor> opt(const Tensor& t) { return t.defined() ? optional<Tensor>(t) : std::nullopt; }

class AttentionFunction : public torch::autograd::Function<AttentionFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const Tensor& q, const Tensor& k,
                               const Tensor& v, OptT attn_mask, OptT alibi_slopes,
                               OptT cu_seqlens_q, OptT cu_seqlens_k, OptT seed,
                               at::ArrayRef<double> floats, at::IntArrayRef ints) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [out, lse] = attention_fwd_op().call(q, k, v, attn_mask, alibi_slopes, cu_seqlens_q,
                                              cu_seqlens_k, seed, floats, ints);
    const auto or_none = [](OptT t) { return given(t) ? *t : Tensor(); };
    ctx->save_for_backward({q, k, v, out, lse, or_none(attn_mask), or_none(alibi_slopes),
                            or_none(cu_seqlens_q), or_none(cu_seqlens_k), or_none(seed)});
    ctx->saved_data["floats"] = floats.vec();
    ctx->saved_data["ints"] = ints.vec();
    ctx->saved_data["float_mask"] = given(attn_mask) && attn_mask->is_floating_point();
    ctx->mark_non_differentiable({lse});
    ctx->set_materialize_grads(false);
    return {out, lse};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto s = ctx->get_saved_variables();
    // needs_input_grad counts the given tensors: q, k, v, then the mask when there is one
    const bool mask_grad = ctx->saved_data["float_mask"].toBool() && ctx->needs_input_grad(3);
    const Tensor& grad_out = grads[0];
    if (!grad_out.defined()) return variable_list(10);
    // attention_bwd has no autograd of its own: skip the Autograd key (its boxed
    // not-implemented fallback costs microseconds per call)
    at::AutoDispatchBelowADInplaceOrView below;
    const auto floats = ctx->saved_data["floats"].toDoubleVector();
    const auto ints = ctx->saved_data["ints"].toIntVector();
    auto [dq, dk, dv, dmask] = attention_bwd_op().call(
        grad_out, s[0], s[1], s[2], s[3], s[4], opt(s[5]), opt(s[6]), opt(s[7]), opt(s[8]),
        opt(s[9]), floats, ints, mask_grad);
    return {dq, dk, dv, mask_grad ? dmask : Tensor(), Tensor(), Tensor(), Tensor(), Tensor(),
            Tensor(), Tensor()};
  }
};

std::tuple<Tensor, Tensor> attention_autograd(const Tensor& q, const Tensor& k, const Tensor& v,
                                              OptT attn_mask, OptT alibi_slopes,
                                              OptT cu_seqlens_q, OptT cu_seqlens_k, OptT seed,
                                              at::ArrayRef<double> floats,
                                              at::IntArrayRef ints) {
  auto out = AttentionFunction::apply(q, k, v, attn_mask, alibi_slopes, cu_seqlens_q,
                                      cu_seqlens_k, seed, floats, ints);
  return {out[0], out[1]};
}

std::tuple<Tensor, Tensor> attention_no_autograd(const Tensor& q, const Tensor& k,
                                                 const Tensor& v, OptT attn_mask,
                                                 OptT alibi_slopes, OptT cu_seqlens_q,
                                                 OptT cu_seqlens_k, OptT seed,
                                                 at::ArrayRef<double> floats,
                                                 at::IntArrayRef ints) {
  return attention_fwd_op().call(q, k, v, attn_mask, alibi_slopes, cu_seqlens_q, cu_seqlens_k,
                                 seed, floats, ints);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(llmcore, m) {
  // Flash attention core (the contract of llmcore.ops.attention._attention_core): q (B, Hq, Nq,
  // D), k (B, Hkv, Nk, D), v (B, Hkv, Nk, Dv); floats = [scale, softcap, dropout_p]; ints =
  // [window_left, window_right, bottom_right, max_seqlen_q, max_seqlen_k]; seed: int64 (1,) when
  // dropout_p > 0. Returns out (B, Hq, Nq, Dv) (memory in (B, Nq, Hq, Dv) order) and lse
  // (B, Hq, Nq) in the compute type, fp32 or fp64 for fp64 inputs (+inf on rows with no visible
  // key); the backward recomputes the probabilities from it, so fp64 keeps it exact.
  m.def("attention_fwd(Tensor q, Tensor k, Tensor v, Tensor? attn_mask, Tensor? alibi_slopes,"
        " Tensor? cu_seqlens_q, Tensor? cu_seqlens_k, Tensor? seed, float[] floats, int[] ints)"
        " -> (Tensor out, Tensor lse)");
  // -> (dq, dk, dv, d attn_mask): contiguous, in the inputs' dtypes; the last is empty (0,)
  // unless mask_grad.
  m.def("attention_bwd(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse,"
        " Tensor? attn_mask, Tensor? alibi_slopes, Tensor? cu_seqlens_q, Tensor? cu_seqlens_k,"
        " Tensor? seed, float[] floats, int[] ints, bool mask_grad)"
        " -> (Tensor dq, Tensor dk, Tensor dv, Tensor dmask)");
  // The differentiable op over the two above (autograd in C++): attention_fwd's arguments and
  // results; lse has no gradient.
  m.def("attention(Tensor q, Tensor k, Tensor v, Tensor? attn_mask, Tensor? alibi_slopes,"
        " Tensor? cu_seqlens_q, Tensor? cu_seqlens_k, Tensor? seed, float[] floats, int[] ints)"
        " -> (Tensor out, Tensor lse)");
}

TORCH_LIBRARY_IMPL(llmcore, Autograd, m) { m.impl("attention", &attention_autograd); }

TORCH_LIBRARY_IMPL(llmcore, CompositeExplicitAutograd, m) {
  m.impl("attention", &attention_no_autograd);
}

TORCH_LIBRARY_IMPL(llmcore, CPU, m) {
  m.impl("attention_fwd", &attention_fwd);
  m.impl("attention_bwd", &attention_bwd);
}

}  // namespace ops
}  // namespace llmcore
