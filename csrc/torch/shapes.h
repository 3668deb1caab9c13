// Shape helpers of the differentiable ops' C++ autograd (norm, gelu): views and (rows, cols)
// matrices that take the plain-int path for ordinary tensors and the SymInt path for
// torch.compile's fake tensors with symbolic shapes.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/SymInt.h>
#include <c10/util/Exception.h>

#include <optional>
#include <vector>

namespace llmcore {
namespace ops {

inline bool given(const std::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }

// Views without a detour through symbolic sizes for ordinary tensors (view_symint on concrete
// sizes costs microseconds per call); fake tensors with symbolic shapes take the SymInt path, so
// torch.compile's dynamic shapes trace through.
inline at::Tensor view_as_sizes(const at::Tensor& t, const at::Tensor& like) {
  if (t.unsafeGetTensorImpl()->has_symbolic_sizes_strides() ||
      like.unsafeGetTensorImpl()->has_symbolic_sizes_strides()) {
    return t.sym_sizes() == like.sym_sizes() ? t : t.view_symint(like.sym_sizes());
  }
  return t.sizes() == like.sizes() ? t : t.view(like.sizes());
}

// x (..., d1..dk) as the kernels' (rows, cols) matrix: the last `norm_ndim` dims are the
// columns (normalised, for the norms).
struct RowsCols {
  bool symbolic = false;
  int64_t rows = 1, cols = 1;
  c10::SymInt sym_rows = 1, sym_cols = 1;
  RowsCols(const at::Tensor& x, int64_t norm_ndim) {
    TORCH_CHECK_VALUE(norm_ndim >= 1 && norm_ndim <= x.dim(), "norm_ndim must be in [1, ",
                      x.dim(), "], got ", norm_ndim);
    const int64_t lead = x.dim() - norm_ndim;
    symbolic = x.unsafeGetTensorImpl()->has_symbolic_sizes_strides();
    if (symbolic) {
      const auto sizes = x.sym_sizes();
      for (int64_t i = 0; i < x.dim(); ++i) (i < lead ? sym_rows : sym_cols) *= sizes[i];
    } else {
      const auto sizes = x.sizes();
      for (int64_t i = 0; i < x.dim(); ++i) (i < lead ? rows : cols) *= sizes[i];
    }
  }
  at::Tensor mat(const at::Tensor& t) const {
    if (symbolic) return t.reshape_symint({sym_rows, sym_cols});
    return t.dim() == 2 && t.size(0) == rows ? t : t.reshape({rows, cols});
  }
  std::optional<at::Tensor> mat(const std::optional<at::Tensor>& t) const {
    return given(t) ? std::optional<at::Tensor>(mat(*t)) : std::nullopt;
  }
  at::Tensor vec(const at::Tensor& t) const {
    if (symbolic) return t.reshape_symint({sym_cols});
    return t.dim() == 1 ? t : t.reshape({cols});
  }
  std::optional<at::Tensor> vec(const std::optional<at::Tensor>& t) const {
    return given(t) ? std::optional<at::Tensor>(vec(*t)) : std::nullopt;
  }
};

// t (...) as the row-wise kernels' (rows, cols) matrix with a unit column stride: a view when
// the leading dims merge and the last is unit-strided (a 0-dim t is one row of one). Only the
// stride is asked (an empty t is copied at no cost): a test of numel would guard on the
// data-dependent row count of torch.compile's packed batches.
inline at::Tensor as_rows(const at::Tensor& t) {
  const at::Tensor m = t.dim() == 0 ? t.reshape({1, 1}) : RowsCols(t, 1).mat(t);
  return m.sym_stride(1) == 1 ? m : m.contiguous();
}

// A (rows, c) matrix t viewed in like's leading shape: (..., c) for like (..., c'), where the
// row-wise kernels' output has another last dim than their input (swiglu: c = c' / 2).
inline at::Tensor view_as_leading(const at::Tensor& t, const at::Tensor& like) {
  if (like.dim() == 2) return t;
  if (t.unsafeGetTensorImpl()->has_symbolic_sizes_strides() ||
      like.unsafeGetTensorImpl()->has_symbolic_sizes_strides()) {
    std::vector<c10::SymInt> sizes = like.sym_sizes().vec();
    sizes.back() = t.sym_size(1);
    return t.view_symint(sizes);
  }
  std::vector<int64_t> sizes = like.sizes().vec();
  sizes.back() = t.size(1);
  return t.view(sizes);
}

}  // namespace ops
}  // namespace llmcore
