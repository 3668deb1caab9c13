// Input checks and small helpers shared by the op implementations (torch side only). Errors
// surface in Python as ValueError / TypeError and name the argument and the expected value.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <string>

#include "llmcore/dtype.h"

namespace llmcore {
namespace ops {

// The kernels' element-type tag for a supported floating dtype; TypeError otherwise.
inline DType kernel_dtype(const char* name, const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::kFloat32;
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    case at::kDouble:
      TORCH_CHECK_TYPE(!t.is_cuda(), name, ": the native CUDA kernels support float32, float16 "
                       "and bfloat16, got float64");
      return DType::kFloat64;
    default:
      TORCH_CHECK_TYPE(false, name, " must be float32, float16, bfloat16 or float64 for the "
                       "native kernels, got ", t.scalar_type());
  }
  return DType::kFloat32;  // unreachable
}

// Statistics / weights are kept in the compute type: fp64 for fp64 tensors, fp32 otherwise.
inline at::ScalarType compute_dtype(const at::Tensor& t) {
  return t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// t in dtype, without dispatching aten::to (half a microsecond) when it already is.
inline at::Tensor to_dtype(const at::Tensor& t, at::ScalarType dtype) {
  return t.scalar_type() == dtype ? t : t.to(dtype);
}

inline void check_device(const char* name, const at::Tensor& t, const at::Tensor& ref,
                         const char* ref_name) {
  TORCH_CHECK_VALUE(t.device() == ref.device(), name, " must be on ", ref_name, "'s device ",
                    ref.device(), ", got ", t.device());
}

inline void check_dim(const char* name, const at::Tensor& t, int64_t dim) {
  TORCH_CHECK_VALUE(t.dim() == dim, name, " must be ", dim, "-dimensional, got shape ",
                    t.sizes());
}

inline void check_shape(const char* name, const at::Tensor& t, at::IntArrayRef shape) {
  TORCH_CHECK_VALUE(t.sizes() == shape, name, " must have shape ", shape, ", got ", t.sizes());
}

// A (rows, cols) matrix the kernels read with a unit column stride (rows: any stride).
inline void check_unit_col_stride(const char* name, const at::Tensor& t) {
  TORCH_CHECK_VALUE(t.numel() == 0 || t.stride(1) == 1, name, " needs a unit stride on its "
                    "last dim, got strides ", t.strides());
}

inline void check_same_dtype(const char* name, const at::Tensor& t, const at::Tensor& ref,
                             const char* ref_name) {
  TORCH_CHECK_TYPE(t.scalar_type() == ref.scalar_type(), name, " must have ", ref_name,
                   "'s dtype ", ref.scalar_type(), ", got ", t.scalar_type());
}

inline void check_floating(const char* name, const at::Tensor& t) {
  TORCH_CHECK_TYPE(at::isFloatingType(t.scalar_type()), name,
                   " must be a floating-point tensor, got ", t.scalar_type());
}

}  // namespace ops
}  // namespace llmcore
