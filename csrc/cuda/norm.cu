// CUDA layer_norm / rms_norm, forward and backward, with the fused residual add (formulas in
// llmcore/norm.h; gradient derivation in csrc/cpu/norm.cpp).
//
// One block per row (grid-stride over rows). Threads walk the row in 16-byte packs when every
// pointer is 16-byte aligned and cols is a multiple of the pack, else element by element; the
// row is re-read from L1/L2 for each pass. Statistics in fp32, block reductions by warp shuffles.
// Weight/bias gradients: each block accumulates its rows into its own fp32 row of the workspace
// (each column owned by one thread, so no atomics), then a second kernel sums the blocks' rows
// in a fixed order: deterministic.
#include "common.cuh"
#include "llmcore/norm.h"

namespace llmcore {
namespace cuda {
namespace {

constexpr int kMaxBlocks = 512;  // row blocks of the backward (rows of the workspace)

inline int grid_rows(int64_t rows) { return int(rows < kMaxBlocks ? rows : kMaxBlocks); }

template <typename T>
struct FwdArgs {
  const T* x;
  const T* residual;
  const float* weight;
  const float* bias;
  T* y;
  T* h;
  float* mean;
  float* rstd;
  int64_t rows, cols;
  float eps;
  bool rms;
};

// The packs of a row this thread owns: N consecutive columns from `base`, N = 16 bytes of T
// when VEC, else 1. The column-to-thread mapping is the same for every row of a launch.
#define LLMCORE_FOR_PACKS(base, cols) \
  for (int64_t base = int64_t(threadIdx.x) * N; base < (cols); base += int64_t(blockDim.x) * N)

// Loads N consecutive elements of row `p` at `base` as floats.
template <typename T, int N>
__device__ __forceinline__ void load_n(const T* p, int64_t base, float* out) {
  if constexpr (N == 1) {
    out[0] = to_f(p[base]);
  } else {
    const Pack<T> v = load_pack(p + base);
#pragma unroll
    for (int k = 0; k < N; ++k) out[k] = to_f(v.v[k]);
  }
}

template <typename T, int N>
__device__ __forceinline__ void store_n(T* p, int64_t base, const float* in) {
  if constexpr (N == 1) {
    p[base] = from_f<T>(in[0]);
  } else {
    Pack<T> v;
#pragma unroll
    for (int k = 0; k < N; ++k) v.v[k] = from_f<T>(in[k]);
    store_pack(p + base, v);
  }
}

template <typename T, bool VEC>
__global__ void norm_fwd_kernel(FwdArgs<T> a) {
  constexpr int N = VEC ? Pack<T>::N : 1;
  __shared__ float smem[32];
  const int64_t n = a.cols;
  for (int64_t row = blockIdx.x; row < a.rows; row += gridDim.x) {
    const int64_t off = row * n;
    const T* x = a.x + off;
    // pass 1: h = x + residual (rounded to T and stored), and its sum
    float sum = 0.f;
    LLMCORE_FOR_PACKS(base, n) {
      float v[N];
      load_n<T, N>(x, base, v);
      if (a.residual) {
        float r[N];
        load_n<T, N>(a.residual + off, base, r);
#pragma unroll
        for (int k = 0; k < N; ++k) v[k] = to_f(from_f<T>(v[k] + r[k]));
        store_n<T, N>(a.h + off, base, v);
      }
#pragma unroll
      for (int k = 0; k < N; ++k) sum += v[k];
    }
    const float mean = a.rms ? 0.f : block_sum(sum, smem) / float(n);
    // pass 2: sum of squared deviations, re-reading h (this thread's own writes, or x)
    const T* h = a.residual ? a.h + off : x;
    float ss = 0.f;
    LLMCORE_FOR_PACKS(base, n) {
      float v[N];
      load_n<T, N>(h, base, v);
#pragma unroll
      for (int k = 0; k < N; ++k) ss += (v[k] - mean) * (v[k] - mean);
    }
    const float rstd = rsqrtf(block_sum(ss, smem) / float(n) + a.eps);
    if (threadIdx.x == 0) {
      if (!a.rms) a.mean[row] = mean;
      a.rstd[row] = rstd;
    }
    // pass 3: y = (h - mean) * rstd * w + b
    LLMCORE_FOR_PACKS(base, n) {
      float v[N];
      load_n<T, N>(h, base, v);
#pragma unroll
      for (int k = 0; k < N; ++k) {
        float o = (v[k] - mean) * rstd;
        if (a.weight) o *= a.weight[base + k];
        if (a.bias) o += a.bias[base + k];
        v[k] = o;
      }
      store_n<T, N>(a.y + off, base, v);
    }
  }
}

template <typename T>
struct BwdArgs {
  const T* dy;
  const T* dh;
  const T* h;
  const float* weight;
  const float* mean;
  const float* rstd;
  T* dx;
  float* part_w;  // (gridDim.x, cols) workspace rows, or null
  float* part_b;  // (gridDim.x, cols), or null
  int64_t rows, cols;
  bool rms;
};

// dh = rstd * (g - mean(g) - xhat * mean(g * xhat)) (+ dh_out), g = dy * w (rms: no mean(g)).
template <typename T, bool VEC>
__global__ void norm_bwd_kernel(BwdArgs<T> a) {
  constexpr int N = VEC ? Pack<T>::N : 1;
  __shared__ float smem[32];
  const int64_t n = a.cols;
  float* pw = a.part_w ? a.part_w + int64_t(blockIdx.x) * n : nullptr;
  float* pb = a.part_b ? a.part_b + int64_t(blockIdx.x) * n : nullptr;
  // this block's workspace row starts at zero (each thread clears the columns it owns)
  LLMCORE_FOR_PACKS(base, n) {
#pragma unroll
    for (int k = 0; k < N; ++k) {
      if (pw) pw[base + k] = 0.f;
      if (pb) pb[base + k] = 0.f;
    }
  }
  for (int64_t row = blockIdx.x; row < a.rows; row += gridDim.x) {
    const int64_t off = row * n;
    const float mu = a.rms ? 0.f : a.mean[row];
    const float rstd = a.rstd[row];
    float sg = 0.f, sgx = 0.f;
    LLMCORE_FOR_PACKS(base, n) {
      float hv[N], d[N];
      load_n<T, N>(a.h + off, base, hv);
      load_n<T, N>(a.dy + off, base, d);
#pragma unroll
      for (int k = 0; k < N; ++k) {
        const float xh = (hv[k] - mu) * rstd;
        const float g = a.weight ? d[k] * a.weight[base + k] : d[k];
        sg += g;
        sgx += g * xh;
        if (pw) pw[base + k] += d[k] * xh;
        if (pb) pb[base + k] += d[k];
      }
    }
    const float mg = a.rms ? 0.f : block_sum(sg, smem) / float(n);
    const float mgx = block_sum(sgx, smem) / float(n);
    LLMCORE_FOR_PACKS(base, n) {
      float hv[N], d[N], extra[N];
      load_n<T, N>(a.h + off, base, hv);
      load_n<T, N>(a.dy + off, base, d);
      if (a.dh) {
        load_n<T, N>(a.dh + off, base, extra);
      } else {
#pragma unroll
        for (int k = 0; k < N; ++k) extra[k] = 0.f;
      }
#pragma unroll
      for (int k = 0; k < N; ++k) {
        const float xh = (hv[k] - mu) * rstd;
        const float g = a.weight ? d[k] * a.weight[base + k] : d[k];
        d[k] = rstd * (g - mg - xh * mgx) + extra[k];
      }
      store_n<T, N>(a.dx + off, base, d);
    }
  }
}

// out[c] = sum over the workspace rows b = 0, 1, ... of part[b][c] (fixed order).
__global__ void column_sum_kernel(const float* part, int blocks, int64_t cols, float* out) {
  const int64_t c = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= cols) return;
  float s = 0.f;
  for (int b = 0; b < blocks; ++b) s += part[int64_t(b) * cols + c];
  out[c] = s;
}

}  // namespace
}  // namespace cuda

int64_t norm_bwd_cuda_workspace_floats(int64_t rows, int64_t cols) {
  return 2 * int64_t(cuda::grid_rows(rows)) * cols;
}

void norm_fwd_cuda(const NormFwdParams& p, CUstream_st* stream) {
  using namespace cuda;
  if (p.rows == 0 || p.cols == 0) return;
  dispatch(p.dtype, "norm_fwd_cuda", [&](auto tag) {
    using T = decltype(tag);
    FwdArgs<T> a{static_cast<const T*>(p.x), static_cast<const T*>(p.residual),
                 static_cast<const float*>(p.weight), static_cast<const float*>(p.bias),
                 static_cast<T*>(p.y), static_cast<T*>(p.h), static_cast<float*>(p.mean),
                 static_cast<float*>(p.rstd), p.rows, p.cols, float(p.eps), p.rms};
    const bool vec = p.cols % Pack<T>::N == 0 && aligned16(p.x) && aligned16(p.residual) &&
                     aligned16(p.y) && aligned16(p.h);
    const int threads = threads_for(p.cols, vec ? Pack<T>::N : 1);
    const int blocks = int(p.rows < 65535 * 8 ? p.rows : 65535 * 8);
    if (vec) norm_fwd_kernel<T, true><<<blocks, threads, 0, stream>>>(a);
    else norm_fwd_kernel<T, false><<<blocks, threads, 0, stream>>>(a);
    check_launch("norm_fwd_cuda");
  });
}

void norm_bwd_cuda(const NormBwdParams& p, CUstream_st* stream) {
  using namespace cuda;
  if (p.cols == 0) return;
  const int blocks = grid_rows(p.rows);
  float* part_w = p.dweight ? p.workspace : nullptr;
  float* part_b = p.dbias ? p.workspace + int64_t(blocks) * p.cols : nullptr;
  if (blocks == 0) {  // no rows: the gradients are zero
    if (p.dweight) cudaMemsetAsync(p.dweight, 0, sizeof(float) * p.cols, stream);
    if (p.dbias) cudaMemsetAsync(p.dbias, 0, sizeof(float) * p.cols, stream);
    return;
  }
  dispatch(p.dtype, "norm_bwd_cuda", [&](auto tag) {
    using T = decltype(tag);
    BwdArgs<T> a{static_cast<const T*>(p.dy), static_cast<const T*>(p.dh),
                 static_cast<const T*>(p.h), static_cast<const float*>(p.weight),
                 static_cast<const float*>(p.mean), static_cast<const float*>(p.rstd),
                 static_cast<T*>(p.dx), part_w, part_b, p.rows, p.cols, p.rms};
    const bool vec = p.cols % Pack<T>::N == 0 && aligned16(p.dy) && aligned16(p.dh) &&
                     aligned16(p.h) && aligned16(p.dx);
    const int threads = threads_for(p.cols, vec ? Pack<T>::N : 1);
    if (vec) norm_bwd_kernel<T, true><<<blocks, threads, 0, stream>>>(a);
    else norm_bwd_kernel<T, false><<<blocks, threads, 0, stream>>>(a);
    check_launch("norm_bwd_cuda");
  });
  const int t = 256;
  const int g = int((p.cols + t - 1) / t);
  if (p.dweight) column_sum_kernel<<<g, t, 0, stream>>>(part_w, blocks, p.cols,
                                                         static_cast<float*>(p.dweight));
  if (p.dbias) column_sum_kernel<<<g, t, 0, stream>>>(part_b, blocks, p.cols,
                                                       static_cast<float*>(p.dbias));
  check_launch("norm_bwd_cuda (column sums)");
}

}  // namespace llmcore
