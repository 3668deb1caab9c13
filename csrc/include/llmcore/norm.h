// layer_norm / rms_norm kernels over the rows of a (rows, cols) matrix, with the optional fused
// pre-norm residual add h = x + residual. Plain pointers and sizes; no torch types.
//
// Weight, bias, their gradients and the row statistics are in the compute type C: fp64 for fp64
// inputs, fp32 otherwise (so bf16/fp16 inputs keep fp32 weights and statistics).
//
// Forward, per row:
//   h     = x + residual                      (stored as T when residual is given)
//   layer: mean = sum(h) / cols, rstd = 1 / sqrt(sum((h - mean)^2) / cols + eps)
//          y = (h - mean) * rstd * weight + bias
//   rms:   rstd = 1 / sqrt(sum(h^2) / cols + eps),  y = h * rstd * weight
//
// Backward: see norm_bwd_cpu in csrc/cpu/norm.cpp for the derivation.
#pragma once

#include <cstdint>

#include "llmcore/dtype.h"

struct CUstream_st;  // cudaStream_t without the CUDA headers

namespace llmcore {

struct NormFwdParams {
  DType dtype = DType::kFloat32;  // element type T of x, residual, y, h
  bool rms = false;               // rms_norm when true, layer_norm otherwise
  int64_t rows = 0, cols = 0;     // all tensors are row-major and contiguous
  double eps = 1e-5;
  const void* x = nullptr;        // (rows, cols) T
  const void* residual = nullptr; // (rows, cols) T, or null
  const void* weight = nullptr;   // (cols,) C, or null
  const void* bias = nullptr;     // (cols,) C, or null (always null for rms)
  void* y = nullptr;              // (rows, cols) T, out
  void* h = nullptr;              // (rows, cols) T, out: x + residual (only with residual)
  void* mean = nullptr;           // (rows,) C out; unused (may be null) for rms
  void* rstd = nullptr;           // (rows,) C out
  int num_threads = 1;            // CPU: OpenMP threads (torch.get_num_threads())
};

struct NormBwdParams {
  DType dtype = DType::kFloat32;
  bool rms = false;
  int64_t rows = 0, cols = 0;
  const void* dy = nullptr;       // (rows, cols) T: gradient of y
  const void* dh = nullptr;       // (rows, cols) T: gradient of the returned h, or null
  const void* h = nullptr;        // (rows, cols) T: the normalised input (x + residual, or x)
  const void* weight = nullptr;   // (cols,) C, or null
  const void* mean = nullptr;     // (rows,) C from the forward (layer_norm only)
  const void* rstd = nullptr;     // (rows,) C from the forward
  void* dx = nullptr;             // (rows, cols) T, out: gradient of x (= of residual)
  void* dweight = nullptr;        // (cols,) C out, or null when not needed
  void* dbias = nullptr;          // (cols,) C out, or null when not needed
  int num_threads = 1;
  // CUDA only: fp32 scratch for the deterministic weight-gradient reduction, at least
  // norm_bwd_cuda_workspace_floats(rows, cols) floats; ignored by the CPU kernel.
  float* workspace = nullptr;
};

void norm_fwd_cpu(const NormFwdParams& p);
void norm_bwd_cpu(const NormBwdParams& p);

// CUDA versions (csrc/cuda/norm.cu): launched on `stream`, asynchronous.
void norm_fwd_cuda(const NormFwdParams& p, CUstream_st* stream);
void norm_bwd_cuda(const NormBwdParams& p, CUstream_st* stream);
int64_t norm_bwd_cuda_workspace_floats(int64_t rows, int64_t cols);

}  // namespace llmcore
