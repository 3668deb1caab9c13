// The public functions' eager entries on the native backend: <op>_eager(...) takes the Python
// arguments of llmcore.<op> as they came, admits only the ordinary call, runs the op through
// the dispatcher and returns its result. Anything else returns None, and the Python function
// (llmcore/ops/<family>.py) takes its full path, whose checks raise the errors: the messages
// live in one place, and the ordinary call costs one crossing into C++ instead of a microsecond
// or more of Python checks per argument.
//
// "Ordinary" is conservative by construction: every tensor is a CPU tensor with concrete sizes
// in a dtype the kernels take, shapes, dtypes and devices match as the Python checks require,
// and every option is a Python object of the usual type (a float for eps, an int for
// ignore_index, ...) with a value in range. Whatever the Python checks would refuse, these
// refuse too; some calls they would pass (a multi-dim normalized_shape, an int eps, a
// non-int64 target, a mask) go to the full path, which handles them as before.
//
// Once admitted, a call can fail only where the full path would fail at the same point with
// the same error: a cross-entropy target out of range (the op's own CPU check, in the Python
// check's words).
#include "eager_entry.h"

#include <ATen/core/grad_mode.h>
#include <torch/csrc/autograd/python_variable.h>

#include <cmath>
#include <limits>
#include <optional>
#include <string_view>
#include <tuple>
#include <vector>

#include "op_handles.h"

namespace llmcore {
namespace ops {
namespace {

namespace py = pybind11;
using at::Tensor;
using OptTensor = std::optional<Tensor>;

bool is_kernel_dtype(at::ScalarType s) {
  return s == at::kFloat || s == at::kBFloat16 || s == at::kHalf || s == at::kDouble;
}

// `obj` as a CPU tensor with concrete sizes, or null.
const Tensor* cpu_tensor(py::handle obj) {
  if (!THPVariable_Check(obj.ptr())) return nullptr;
  const Tensor& t = THPVariable_Unpack(obj.ptr());
  if (!t.defined() || !t.is_cpu() || t.unsafeGetTensorImpl()->has_symbolic_sizes_strides()) {
    return nullptr;
  }
  return &t;
}

// ... in a floating dtype the kernels take.
const Tensor* cpu_float(py::handle obj) {
  const Tensor* t = cpu_tensor(obj);
  return t != nullptr && is_kernel_dtype(t->scalar_type()) ? t : nullptr;
}

// An optional (n,) parameter in x's dtype or float32: true with `out` set (or left empty for
// None) when admitted.
bool param(py::handle obj, const Tensor& x, int64_t n, OptTensor& out) {
  if (obj.is_none()) return true;
  const Tensor* t = cpu_float(obj);
  if (t == nullptr || t->dim() != 1 || t->size(0) != n) return false;
  if (t->scalar_type() != x.scalar_type() && t->scalar_type() != at::kFloat) return false;
  out = *t;
  return true;
}

// A Python float (not an int, not a subclass), or nullopt.
std::optional<double> py_float(py::handle obj) {
  if (!PyFloat_CheckExact(obj.ptr())) return std::nullopt;
  return PyFloat_AS_DOUBLE(obj.ptr());
}

// A Python int (not a bool) that fits in int64, or nullopt.
std::optional<int64_t> py_int(py::handle obj) {
  if (!PyLong_CheckExact(obj.ptr())) return std::nullopt;
  int overflow = 0;
  const long long v = PyLong_AsLongLongAndOverflow(obj.ptr(), &overflow);
  if (overflow != 0 || (v == -1 && PyErr_Occurred())) {
    PyErr_Clear();
    return std::nullopt;
  }
  return int64_t(v);
}

// A Python bool, or nullopt.
std::optional<bool> py_bool(py::handle obj) {
  if (obj.ptr() == Py_True) return true;
  if (obj.ptr() == Py_False) return false;
  return std::nullopt;
}

// A Python str, or nullopt.
std::optional<std::string_view> py_str(py::handle obj) {
  if (!PyUnicode_CheckExact(obj.ptr())) return std::nullopt;
  Py_ssize_t size = 0;
  const char* s = PyUnicode_AsUTF8AndSize(obj.ptr(), &size);
  if (s == nullptr) {
    PyErr_Clear();
    return std::nullopt;
  }
  return std::string_view(s, size_t(size));
}

py::object wrap(Tensor t) { return py::reinterpret_steal<py::object>(THPVariable_Wrap(std::move(t))); }

// ---------------------------------------------------------------------------- norms
// llmcore.layer_norm / rms_norm(input, normalized_shape, weight, bias, eps, residual=...):
// normalized_shape an int or a 1-tuple (or torch.Size) equal to input's last dim; eps a float
// >= 0, or None for rms_norm (torch.finfo(dtype).eps).

bool last_dim_shape(py::handle obj, int64_t d) {
  PyObject* o = obj.ptr();
  if (PyTuple_Check(o)) {  // a tuple or a torch.Size
    if (PyTuple_GET_SIZE(o) != 1) return false;
    o = PyTuple_GET_ITEM(o, 0);
  }
  const auto v = py_int(o);
  return v.has_value() && *v == d;
}

double finfo_eps(at::ScalarType s) {
  switch (s) {
    case at::kHalf: return 0.0009765625;       // 2^-10
    case at::kBFloat16: return 0.0078125;      // 2^-7
    case at::kDouble: return std::numeric_limits<double>::epsilon();
    default: return double(std::numeric_limits<float>::epsilon());
  }
}

py::object norm_eager(py::handle input, py::handle normalized_shape, py::handle weight,
                      py::handle bias, py::handle eps, py::handle residual, bool rms) {
  static const auto op = typed_op<NormSig>("llmcore::norm");
  const Tensor* x = cpu_float(input);
  if (x == nullptr || x->dim() < 1) return py::none();
  const int64_t d = x->size(-1);
  OptTensor w, b, r;
  if (!last_dim_shape(normalized_shape, d) || !param(weight, *x, d, w) ||
      !param(bias, *x, d, b)) {
    return py::none();
  }
  double e = 0.0;
  if (rms && eps.is_none()) {
    e = finfo_eps(x->scalar_type());
  } else {
    const auto v = py_float(eps);
    if (!v.has_value() || !(*v >= 0.0)) return py::none();
    e = *v;
  }
  if (!residual.is_none()) {
    const Tensor* t = cpu_tensor(residual);
    if (t == nullptr || t->scalar_type() != x->scalar_type() || t->sizes() != x->sizes()) {
      return py::none();
    }
    r = *t;
  }
  std::tuple<Tensor, Tensor> out;
  {
    py::gil_scoped_release no_gil;
    out = op.call(*x, r, w, b, 1, e, rms);
  }
  if (!r.has_value()) return wrap(std::move(std::get<0>(out)));
  return py::make_tuple(wrap(std::move(std::get<0>(out))), wrap(std::move(std::get<1>(out))));
}

// ---------------------------------------------------------------------------- cross-entropy
// The options of both losses: ignore_index an int; reduction "mean", "sum" or "none";
// label_smoothing a float in [0, 1]; z_loss a float >= 0; softcap None or a float > 0.

struct LossOptions {
  int64_t ignore_index = -100;
  int64_t reduction = 1;  // at::Reduction: 0 none, 1 mean, 2 sum
  double label_smoothing = 0.0, z_loss = 0.0, softcap = 0.0;
};

std::optional<LossOptions> loss_options(py::handle ignore_index, py::handle reduction,
                                        py::handle label_smoothing, py::handle z_loss,
                                        py::handle softcap) {
  LossOptions o;
  const auto ii = py_int(ignore_index);
  const auto red = py_str(reduction);
  const auto ls = py_float(label_smoothing);
  const auto z = py_float(z_loss);
  if (!ii || !red || !ls || !z || !(*ls >= 0.0 && *ls <= 1.0) || !(*z >= 0.0)) {
    return std::nullopt;
  }
  if (*red == "mean") o.reduction = 1;
  else if (*red == "sum") o.reduction = 2;
  else if (*red == "none") o.reduction = 0;
  else return std::nullopt;
  if (!softcap.is_none()) {
    const auto c = py_float(softcap);
    if (!c || !(*c > 0.0)) return std::nullopt;
    o.softcap = *c;
  }
  o.ignore_index = *ii;
  o.label_smoothing = *ls;
  o.z_loss = *z;
  return o;
}

// (N,) int64 class indices on the CPU.
const Tensor* row_targets(py::handle target, int64_t n) {
  const Tensor* t = cpu_tensor(target);
  if (t == nullptr || t->scalar_type() != at::kLong || t->dim() != 1 || t->size(0) != n) {
    return nullptr;
  }
  return t;
}

// llmcore.cross_entropy: (N, C) logits with C >= 1, (N,) int64 targets, an optional (C,) class
// weight that needs no gradient (the native kernels do not differentiate it).
py::object cross_entropy_eager(py::handle input, py::handle target, py::handle weight,
                               py::handle ignore_index, py::handle reduction,
                               py::handle label_smoothing, py::handle z_loss,
                               py::handle softcap) {
  static const auto op = typed_op<CrossEntropySig>("llmcore::cross_entropy");
  const Tensor* logits = cpu_float(input);
  if (logits == nullptr || logits->dim() != 2 || logits->size(1) < 1) return py::none();
  const Tensor* t = row_targets(target, logits->size(0));
  OptTensor w;
  if (t == nullptr || !param(weight, *logits, logits->size(1), w)) return py::none();
  if (w.has_value() && w->requires_grad() && at::GradMode::is_enabled()) return py::none();
  const auto o = loss_options(ignore_index, reduction, label_smoothing, z_loss, softcap);
  if (!o) return py::none();
  Tensor out;
  {
    py::gil_scoped_release no_gil;
    out = op.call(*logits, *t, w, o->ignore_index, o->reduction, o->label_smoothing, o->z_loss,
                  o->softcap);
  }
  return wrap(std::move(out));
}

// linear_cross_entropy's rows per chunk when none is given: llmcore.ops.cross_entropy's
// default_chunk_size for CPU tensors (64 MiB of fp32/fp64 logits, at most 512 rows; 256 MiB of
// bf16/fp16 ones; a multiple of 8 when that allows).
int64_t default_cpu_chunk_rows(int64_t classes, int64_t element_size) {
  const int64_t budget = element_size >= 4 ? (int64_t(64) << 20) : (int64_t(256) << 20);
  int64_t rows = std::max<int64_t>(1, budget / (element_size * std::max<int64_t>(classes, 1)));
  if (element_size >= 4) rows = std::min<int64_t>(rows, 512);
  if (rows >= 8) rows -= rows % 8;
  return rows;
}

// llmcore.linear_cross_entropy: (N, H) hidden states, a (V, H) weight and optional (V,) bias of
// their dtype, (N,) int64 targets, N >= 1 rows that fit one chunk (the C++ one-chunk op; more
// rows run the Python chunk loop).
py::object linear_cross_entropy_eager(py::handle input, py::handle weight, py::handle target,
                                      py::handle bias, py::handle ignore_index,
                                      py::handle reduction, py::handle label_smoothing,
                                      py::handle z_loss, py::handle softcap,
                                      py::handle chunk_size) {
  static const auto op = typed_op<LinearCrossEntropySig>("llmcore::linear_cross_entropy");
  const Tensor* x = cpu_float(input);
  const Tensor* w = cpu_tensor(weight);
  if (x == nullptr || w == nullptr || x->dim() != 2 || w->dim() != 2 ||
      w->scalar_type() != x->scalar_type() || w->size(1) != x->size(1) || w->size(0) < 1) {
    return py::none();
  }
  const int64_t rows = x->size(0), classes = w->size(0);
  const Tensor* t = row_targets(target, rows);
  if (t == nullptr) return py::none();
  OptTensor b;
  if (!bias.is_none()) {
    const Tensor* bt = cpu_tensor(bias);
    if (bt == nullptr || bt->scalar_type() != x->scalar_type() || bt->dim() != 1 ||
        bt->size(0) != classes) {
      return py::none();
    }
    b = *bt;
  }
  int64_t chunk = 0;
  if (chunk_size.is_none()) {
    chunk = default_cpu_chunk_rows(classes, x->element_size());
  } else {
    const auto c = py_int(chunk_size);
    if (!c || *c < 1) return py::none();
    chunk = *c;
  }
  if (rows < 1 || rows > chunk) return py::none();
  const auto o = loss_options(ignore_index, reduction, label_smoothing, z_loss, softcap);
  if (!o) return py::none();
  Tensor out;
  {
    py::gil_scoped_release no_gil;
    out = op.call(*x, *w, b, *t, o->ignore_index, o->reduction, o->label_smoothing, o->z_loss,
                  o->softcap);
  }
  return wrap(std::move(out));
}

// ---------------------------------------------------------------------------- attention
// A window bound: an int >= -1.
std::optional<int64_t> window_bound(PyObject* obj) {
  const auto v = py_int(obj);
  return v.has_value() && *v >= -1 ? v : std::nullopt;
}

// llmcore.attention: 4-D q (B, Hq, Nq, D), k (B, Hkv, Nk, D), v (B, Hkv, Nk, Dv) of one dtype,
// D >= 1, Hq == Hkv (or a multiple with enable_gqa=True); no mask, no dropout; is_causal and
// enable_gqa bools; scale None or a float; window_size a tuple of two ints >= -1; softcap a
// float (or int) >= 0.
py::object attention_eager(py::handle query, py::handle key, py::handle value,
                           py::handle attn_mask, py::handle dropout_p, py::handle is_causal,
                           py::handle scale, py::handle enable_gqa, py::handle window_size,
                           py::handle softcap) {
  static const auto op = typed_op<AttentionSig>("llmcore::attention");
  const Tensor* q = cpu_float(query);
  const Tensor* k = cpu_tensor(key);
  const Tensor* v = cpu_tensor(value);
  if (q == nullptr || k == nullptr || v == nullptr || !attn_mask.is_none()) return py::none();
  if (q->dim() != 4 || k->dim() != 4 || v->dim() != 4 ||
      k->scalar_type() != q->scalar_type() || v->scalar_type() != q->scalar_type()) {
    return py::none();
  }
  const int64_t d = q->size(3), hq = q->size(1), hk = k->size(1);
  if (k->size(0) != q->size(0) || v->size(0) != q->size(0) || k->size(3) != d || d < 1 ||
      v->size(2) != k->size(2) || v->size(1) != hk) {
    return py::none();
  }
  const auto causal = py_bool(is_causal);
  const auto gqa = py_bool(enable_gqa);
  const auto drop = py_float(dropout_p);
  if (!causal || !gqa || !drop || *drop != 0.0) return py::none();
  if (hq != hk && (!*gqa || hk == 0 || hq % hk != 0)) return py::none();
  double sc = 1.0 / std::sqrt(double(d));
  if (!scale.is_none()) {
    const auto s = py_float(scale);
    if (!s) return py::none();
    sc = *s;
  }
  double cap = 0.0;
  if (const auto c = py_float(softcap)) {
    cap = *c;
  } else if (const auto ci = py_int(softcap)) {
    cap = double(*ci);
  } else {
    return py::none();
  }
  if (!(cap >= 0.0)) return py::none();
  PyObject* win = window_size.ptr();
  if (!PyTuple_CheckExact(win) || PyTuple_GET_SIZE(win) != 2) return py::none();
  const auto left = window_bound(PyTuple_GET_ITEM(win, 0));
  const auto right = window_bound(PyTuple_GET_ITEM(win, 1));
  if (!left || !right) return py::none();
  const double floats[3] = {sc, cap, 0.0};
  const int64_t ints[5] = {*left, *causal ? 0 : *right, 0, 0, 0};
  std::tuple<Tensor, Tensor> out;
  {
    py::gil_scoped_release no_gil;
    out = op.call(*q, *k, *v, std::nullopt, std::nullopt, std::nullopt, std::nullopt,
                  std::nullopt, floats, ints);
  }
  return wrap(std::move(std::get<0>(out)));
}

// ---------------------------------------------------------------------------- gelu
py::object gelu_eager(py::handle input, py::handle approximate) {
  static const auto op = typed_op<GeluSig>("llmcore::gelu");
  const Tensor* x = cpu_float(input);
  const auto a = py_str(approximate);
  if (x == nullptr || !a || (*a != "none" && *a != "tanh")) return py::none();
  const c10::string_view mode(a->data(), a->size());
  Tensor out;
  {
    py::gil_scoped_release no_gil;
    out = op.call(*x, mode);
  }
  return wrap(std::move(out));
}

// ---------------------------------------------------------------------------- swiglu
py::object swiglu_eager(py::handle input) {
  static const auto op = typed_op<SwigluSig>("llmcore::swiglu");
  const Tensor* x = cpu_float(input);
  if (x == nullptr || x->dim() < 1 || x->size(-1) % 2 != 0) return py::none();
  Tensor out;
  {
    py::gil_scoped_release no_gil;
    out = op.call(*x);
  }
  return wrap(std::move(out));
}

}  // namespace

void def_eager_entries(pybind11::module_& m) {
  m.def("norm_eager", &norm_eager);
  m.def("cross_entropy_eager", &cross_entropy_eager);
  m.def("linear_cross_entropy_eager", &linear_cross_entropy_eager);
  m.def("attention_eager", &attention_eager);
  m.def("gelu_eager", &gelu_eager);
  m.def("swiglu_eager", &swiglu_eager);
}

}  // namespace ops
}  // namespace llmcore
