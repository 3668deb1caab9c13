// CUDA layer_norm / rms_norm, forward and backward, with the fused residual add (formulas in
// llmcore/norm.h; gradient derivation in csrc/cpu/norm.cpp).
//
// One block per row (grid-stride over rows). Threads walk the row in 16-byte packs when every
// pointer is 16-byte aligned and cols is a multiple of the pack, else element by element.
// Statistics in fp32, block reductions by warp shuffles. Weight/bias gradients: each block
// accumulates its rows for the columns each thread owns, then writes them as its own fp32 row of
// the workspace; a second kernel sums the blocks' rows in a fixed order: deterministic.
//
// Two kernel shapes. The register kernels (norm_{fwd,bwd}_reg_kernel), used whenever a thread
// owns at most kMaxValues values of the row (hidden <= 8192 at 1024 threads), hold the thread's
// part of the row in registers: the forward reads x (and residual) from memory once, the
// backward reads h and dy once, and the weight/bias-gradient sums stay in registers across the
// block's rows (one workspace write per block). That is the bandwidth-bound minimum: fwd
// (2 + 2r) and bwd (3 + r) row-sized transfers. The loop kernels below them walk the row again
// for each pass (re-reads from L1/L2) and accumulate the gradient sums in the workspace: the
// general fallback for longer rows.
#include <type_traits>

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
__global__ void __launch_bounds__(kMaxBlock) norm_fwd_kernel(FwdArgs<T> a) {
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
__global__ void __launch_bounds__(kMaxBlock) norm_bwd_kernel(BwdArgs<T> a) {
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

// ---------------------------------------------------------------------------- register kernels
// Packs of a row: pack j of thread t covers columns (j * blockDim.x + t) * N .. + N - 1; with
// N | cols (VEC) or N == 1 a pack lies wholly inside the row or wholly outside it.
// At most 8 values per thread keeps a 1024-thread block within the 64 registers per thread an
// SM can give it (sm_80/sm_90: 65536 registers); __launch_bounds__ makes ptxas hold to that.
constexpr int kMaxValues = 8;

#define LLMCORE_REG_PACKS(j, base)                                                   \
  _Pragma("unroll") for (int j = 0; j < P; ++j)                                      \
    if (const int64_t base = (int64_t(j) * blockDim.x + threadIdx.x) * N; base < n)

template <typename T, int N, int P>
__global__ void __launch_bounds__(kMaxBlock) norm_fwd_reg_kernel(FwdArgs<T> a) {
  __shared__ float smem[32];
  const int64_t n = a.cols;
  for (int64_t row = blockIdx.x; row < a.rows; row += gridDim.x) {
    const int64_t off = row * n;
    float v[P][N];
    float sum = 0.f;
    LLMCORE_REG_PACKS(j, base) {
      load_n<T, N>(a.x + off, base, v[j]);
      if (a.residual) {
        float r[N];
        load_n<T, N>(a.residual + off, base, r);
#pragma unroll
        for (int k = 0; k < N; ++k) v[j][k] = to_f(from_f<T>(v[j][k] + r[k]));  // h, rounded
        store_n<T, N>(a.h + off, base, v[j]);
      }
#pragma unroll
      for (int k = 0; k < N; ++k) sum += v[j][k];
    }
    const float mean = a.rms ? 0.f : block_sum(sum, smem) / float(n);
    float ss = 0.f;  // the centred second pass runs over registers: exact, no cancellation
    LLMCORE_REG_PACKS(j, base) {
#pragma unroll
      for (int k = 0; k < N; ++k) ss += (v[j][k] - mean) * (v[j][k] - mean);
    }
    const float rstd = rsqrtf(block_sum(ss, smem) / float(n) + a.eps);
    if (threadIdx.x == 0) {
      if (!a.rms) a.mean[row] = mean;
      a.rstd[row] = rstd;
    }
    LLMCORE_REG_PACKS(j, base) {
#pragma unroll
      for (int k = 0; k < N; ++k) {
        float o = (v[j][k] - mean) * rstd;
        if (a.weight) o *= a.weight[base + k];
        if (a.bias) o += a.bias[base + k];
        v[j][k] = o;
      }
      store_n<T, N>(a.y + off, base, v[j]);
    }
  }
}

// dh = rstd * (g - mean(g) - xhat * mean(g * xhat)) (+ dh_out), g = dy * w (rms: no mean(g));
// dweight += dy * xhat, dbias += dy summed in registers over this block's rows.
template <typename T, int N, int P>
__global__ void __launch_bounds__(kMaxBlock) norm_bwd_reg_kernel(BwdArgs<T> a) {
  __shared__ float smem[32];
  const int64_t n = a.cols;
  float dw[P][N], db[P][N];
#pragma unroll
  for (int j = 0; j < P; ++j) {
#pragma unroll
    for (int k = 0; k < N; ++k) dw[j][k] = db[j][k] = 0.f;
  }
  for (int64_t row = blockIdx.x; row < a.rows; row += gridDim.x) {
    const int64_t off = row * n;
    const float mu = a.rms ? 0.f : a.mean[row];
    const float rstd = a.rstd[row];
    float xh[P][N], g[P][N];
    float sg = 0.f, sgx = 0.f;
    LLMCORE_REG_PACKS(j, base) {
      float d[N];
      load_n<T, N>(a.h + off, base, xh[j]);
      load_n<T, N>(a.dy + off, base, d);
#pragma unroll
      for (int k = 0; k < N; ++k) {
        xh[j][k] = (xh[j][k] - mu) * rstd;
        g[j][k] = a.weight ? d[k] * a.weight[base + k] : d[k];
        sg += g[j][k];
        sgx += g[j][k] * xh[j][k];
        dw[j][k] += d[k] * xh[j][k];
        db[j][k] += d[k];
      }
    }
    const float mg = a.rms ? 0.f : block_sum(sg, smem) / float(n);
    const float mgx = block_sum(sgx, smem) / float(n);
    LLMCORE_REG_PACKS(j, base) {
      float o[N];
      if (a.dh) {
        load_n<T, N>(a.dh + off, base, o);
      } else {
#pragma unroll
        for (int k = 0; k < N; ++k) o[k] = 0.f;
      }
#pragma unroll
      for (int k = 0; k < N; ++k) o[k] += rstd * (g[j][k] - mg - xh[j][k] * mgx);
      store_n<T, N>(a.dx + off, base, o);
    }
  }
  float* pw = a.part_w ? a.part_w + int64_t(blockIdx.x) * n : nullptr;
  float* pb = a.part_b ? a.part_b + int64_t(blockIdx.x) * n : nullptr;
  LLMCORE_REG_PACKS(j, base) {
#pragma unroll
    for (int k = 0; k < N; ++k) {
      if (pw) pw[base + k] = dw[j][k];
      if (pb) pb[base + k] = db[j][k];
    }
  }
}

// Packs per thread for the register kernels (1, 2, 4 or 8 with packs * pack <= kMaxValues),
// or 0 when the row is too long for them.
inline int reg_packs(int64_t cols, int threads, int pack) {
  const int64_t per = (cols + int64_t(threads) * pack - 1) / (int64_t(threads) * pack);
  for (int p = 1; p * pack <= kMaxValues; p *= 2)
    if (per <= p) return p;
  return 0;
}

// Calls f(std::integral_constant<int, P>{}) for P = packs; only the (N, P) pairs with
// N * P <= kMaxValues are instantiated.
template <int N, typename F>
void with_packs(int packs, F&& f) {
  const auto run = [&](auto P) {
    if constexpr (N * decltype(P)::value <= kMaxValues) {
      f(P);
    } else {  // reg_packs never asks for this; launching nothing would leave the outputs unset
      throw std::logic_error("llmcore norm (CUDA): " + std::to_string(packs) + " packs of " +
                             std::to_string(N) + " values exceed a thread's register budget");
    }
  };
  switch (packs) {
    case 1: return run(std::integral_constant<int, 1>{});
    case 2: return run(std::integral_constant<int, 2>{});
    case 4: return run(std::integral_constant<int, 4>{});
    default: return run(std::integral_constant<int, 8>{});
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
    const int packs = reg_packs(p.cols, threads, vec ? Pack<T>::N : 1);
    if (packs > 0) {
      if (vec) {
        with_packs<Pack<T>::N>(packs, [&](auto P) {
          norm_fwd_reg_kernel<T, Pack<T>::N, P()><<<blocks, threads, 0, stream>>>(a);
        });
      } else {
        with_packs<1>(packs, [&](auto P) {
          norm_fwd_reg_kernel<T, 1, P()><<<blocks, threads, 0, stream>>>(a);
        });
      }
    } else if (vec) {
      norm_fwd_kernel<T, true><<<blocks, threads, 0, stream>>>(a);
    } else {
      norm_fwd_kernel<T, false><<<blocks, threads, 0, stream>>>(a);
    }
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
    const int packs = reg_packs(p.cols, threads, vec ? Pack<T>::N : 1);
    if (packs > 0) {
      if (vec) {
        with_packs<Pack<T>::N>(packs, [&](auto P) {
          norm_bwd_reg_kernel<T, Pack<T>::N, P()><<<blocks, threads, 0, stream>>>(a);
        });
      } else {
        with_packs<1>(packs, [&](auto P) {
          norm_bwd_reg_kernel<T, 1, P()><<<blocks, threads, 0, stream>>>(a);
        });
      }
    } else if (vec) {
      norm_bwd_kernel<T, true><<<blocks, threads, 0, stream>>>(a);
    } else {
      norm_bwd_kernel<T, false><<<blocks, threads, 0, stream>>>(a);
    }
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
