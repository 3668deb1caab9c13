// Cross-entropy kernels over the rows of a (rows, classes) logits matrix. No torch types.
//
// Per row i with target t (C classes, w the class weight, w = 1 without one, e the label
// smoothing, W = sum_c w[c]; softcap s > 0 caps the logits first):
//   y_c   = s * tanh(x_c / s)                      (y = x without softcap)
//   lse   = log sum_c exp(y_c)                      (online: one pass over the row)
//   loss  = (1-e) w[t] (lse - y_t) + (e/C) sum_c w[c] (lse - y_c) + z r lse^2
//         = (1-e) w[t] (lse - y_t) + (e/C) (W lse - sum_c w[c] y_c) + z r lse^2
// and loss = 0 for rows whose target is ignore_index. Only lse is kept for the backward.
// The z-loss term is not class-weighted. r (z_ratio, 1 when absent) lets a class-weighted "mean"
// average it over the valid tokens while the rest is averaged over sum of w[t]: with
// r = sum_valid w[t] / n_valid, sum_i loss_i / sum_valid w[t] is exactly that mean.
// The reduction over rows ("mean": divide by sum of w[t] over valid rows) is the caller's.
// A target outside [0, C) that is not ignore_index is a caller error: the callers check it
// (CPU), the CUDA kernels stop with a device-side assert.
#pragma once

#include <cstdint>

#include "llmcore/dtype.h"

struct CUstream_st;  // cudaStream_t without the CUDA headers

namespace llmcore {

struct CrossEntropyParams {
  DType dtype = DType::kFloat32;  // element type T of logits and dlogits
  int64_t rows = 0, classes = 0;  // logits are row-major and contiguous
  const void* logits = nullptr;   // (rows, classes) T
  const int64_t* target = nullptr;  // (rows,) class indices or ignore_index
  const void* weight = nullptr;   // (classes,) compute type C (fp64 for fp64, else fp32), or null
  int64_t ignore_index = -100;
  double label_smoothing = 0.0;
  double z_loss = 0.0;
  double softcap = 0.0;           // <= 0: no cap
  const void* z_ratio = nullptr;  // (1,) compute type C, r above (device memory on CUDA); null: 1
  // (1,) C, sum_c w[c] when there is a weight and label smoothing, or null: the CUDA kernels
  // then read it instead of summing the weights once per block (an extra (blocks, V) read)
  const void* weight_sum = nullptr;
  // forward outputs / backward inputs, all (rows,) in the compute type C
  void* loss = nullptr;           // forward out: per-row loss (0 for ignored rows)
  void* lse = nullptr;            // forward out, backward in: logsumexp of the capped logits
  const void* dloss = nullptr;    // backward in: gradient of each row's loss, compute type C
  int64_t dloss_stride = 1;       // 0: one dloss for every row (the gradient of a sum or mean)
  void* dlogits = nullptr;        // backward out: (rows, classes) T; 0 on ignored rows
  int num_threads = 1;            // CPU: OpenMP threads (torch.get_num_threads())
};

// Forward: loss and lse. Backward (given lse and dloss):
//   dloss/dy_c = dloss * (p_c a - (e/C) w[c]) - dloss (1-e) w[t] [c == t],
//   with p = softmax(y) = exp(y - lse) and a = (1-e) w[t] + (e/C) W + 2 z r lse;
//   dlogits_c = dloss/dy_c * (1 - tanh^2(x_c / s)) with softcap, else dloss/dy_c.
void cross_entropy_fwd_cpu(const CrossEntropyParams& p);
void cross_entropy_bwd_cpu(const CrossEntropyParams& p);
// Both in one call: loss, lse and dlogits (dloss given up front, e.g. 1/n_valid for "mean").
// dlogits may point at the logits themselves: the gradient then overwrites them in place.
void cross_entropy_fwd_bwd_cpu(const CrossEntropyParams& p);

// CUDA versions (csrc/cuda/cross_entropy.cu), launched on `stream`. fp32/fp16/bf16 only.
void cross_entropy_fwd_cuda(const CrossEntropyParams& p, CUstream_st* stream);
void cross_entropy_bwd_cuda(const CrossEntropyParams& p, CUstream_st* stream);
void cross_entropy_fwd_bwd_cuda(const CrossEntropyParams& p, CUstream_st* stream);

}  // namespace llmcore
