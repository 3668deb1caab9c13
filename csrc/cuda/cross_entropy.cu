// CUDA cross-entropy forward / backward / fused in-place (formulas in llmcore/cross_entropy.h).
//
// One block per row (grid-stride over rows). Forward: each thread keeps an online logsumexp
// (running max m and sum s of exp(y - m)) over its 16-byte packs of the row, then the block
// merges them: M = max m, S = sum s exp(m - M), lse = M + log S. Only lse is kept. Backward
// recomputes p = exp(y - lse) and writes dlogits in the same packs. The fused mode runs both on
// one read of the row's statistics and may write the gradient over the logits in place.
#include <cassert>

#include "common.cuh"
#include "llmcore/cross_entropy.h"

#ifdef NDEBUG
// <cassert> declares the device-side assertion handler only without NDEBUG; check_target below
// calls it in every build.
extern "C" __host__ __device__ void __assert_fail(const char* assertion, const char* file,
                                                  unsigned int line, const char* function) noexcept
    __attribute__((__noreturn__));
#endif

namespace llmcore {
namespace cuda {
namespace {

enum Mode { kFwd = 0, kBwd = 1, kFwdBwd = 2 };

template <typename T>
struct CeArgs {
  const T* logits;
  const int64_t* target;
  const float* weight;
  float* loss;
  float* lse;
  const float* dloss;
  int64_t dloss_stride;  // 0: one value for every row
  T* dlogits;
  const float* z_ratio;  // scale of the z-term (device scalar), or null for 1
  const float* weight_sum;  // sum of the class weights (device scalar), or null
  int64_t rows, V, ignore_index;
  float e, z_loss, cap;  // cap <= 0: no softcap
};

// A target outside [0, V) that is not ignore_index stops the kernel, as PyTorch's own nll_loss
// does ("Assertion `t >= 0 && t < n_classes` failed"): no extra kernel and no host sync on the
// caller's side, and compiled in whatever NDEBUG says (plain assert() would vanish in release).
__device__ __forceinline__ void check_target(int64_t t, int64_t V) {
  if (t < 0 || t >= V)
    __assert_fail("llmcore cross_entropy: target >= 0 && target < n_classes (or == ignore_index)",
                  __FILE__, __LINE__, __func__);
}

template <typename T, bool VEC, int MODE>
__global__ void ce_kernel(CeArgs<T> a) {
  __shared__ float smem[32];
  const int64_t V = a.V;
  constexpr int P = VEC ? Pack<T>::N : 1;
  const bool smoothing = a.e > 0.f;
  const float inv_cap = a.cap > 0.f ? 1.f / a.cap : 0.f;
  const float z = a.z_loss * (a.z_ratio ? *a.z_ratio : 1.f);  // the z-term is not class-weighted
  // W = sum of class weights (needed with label smoothing only): the caller's, else summed
  // once per block
  float W = float(V);
  if (smoothing && a.weight) {
    if (a.weight_sum) {
      W = *a.weight_sum;
    } else {
      float s = 0.f;
      for (int64_t c = threadIdx.x; c < V; c += blockDim.x) s += a.weight[c];
      W = block_sum(s, smem);
    }
  }
  for (int64_t row = blockIdx.x; row < a.rows; row += gridDim.x) {
    const int64_t t = a.target[row];
    const T* x = a.logits + row * V;
    T* dx = MODE == kFwd ? nullptr : a.dlogits + row * V;
    if (t == a.ignore_index) {
      if (MODE != kBwd && threadIdx.x == 0) a.loss[row] = a.lse[row] = 0.f;
      if (MODE != kFwd)
        for (int64_t c = threadIdx.x; c < V; c += blockDim.x) dx[c] = from_f<T>(0.f);
      continue;
    }
    check_target(t, V);
    // the target's capped logit, read by every thread before anything is written to the row
    float y_t = to_f(x[t]);
    if (a.cap > 0.f) y_t = a.cap * tanhf(y_t * inv_cap);
    float lse;
    if (MODE == kBwd) {
      lse = a.lse[row];
    } else {
      float m = -INFINITY, s = 0.f, swy = 0.f;
      for (int64_t base = int64_t(threadIdx.x) * P; base < V; base += int64_t(blockDim.x) * P) {
        float y[P];
        if constexpr (VEC) {
          const Pack<T> v = load_pack(x + base);
#pragma unroll
          for (int k = 0; k < P; ++k) y[k] = to_f(v.v[k]);
        } else {
          y[0] = to_f(x[base]);
        }
        float pm = -INFINITY;
#pragma unroll
        for (int k = 0; k < P; ++k) {
          if (a.cap > 0.f) y[k] = a.cap * tanhf(y[k] * inv_cap);
          pm = fmaxf(pm, y[k]);
          if (smoothing) swy += (a.weight ? a.weight[base + k] : 1.f) * y[k];
        }
        if (pm > m) {
          s *= expf(m - pm);  // 0 while s is 0 (m = -inf)
          m = pm;
        }
        if (m != -INFINITY) {  // all -inf so far (a masked range): adds 0, and no inf - inf
#pragma unroll
          for (int k = 0; k < P; ++k) s += expf(y[k] - m);
        }
      }
      const float M = block_max(m, smem);
      const float S = block_sum(m == -INFINITY ? 0.f : s * expf(m - M), smem);
      if (smoothing) swy = block_sum(swy, smem);
      lse = M + logf(S);
      if (threadIdx.x == 0) {
        const float wt = a.weight ? a.weight[t] : 1.f;
        float l = (1.f - a.e) * wt * (lse - y_t) + z * lse * lse;
        if (smoothing) l += a.e / float(V) * (W * lse - swy);
        a.loss[row] = l;
        a.lse[row] = lse;
      }
    }
    if constexpr (MODE != kFwd) {
      if (MODE == kFwdBwd) __syncthreads();  // every y_t read happens before any in-place write
      const float g = a.dloss[row * a.dloss_stride];
      const float wt = a.weight ? a.weight[t] : 1.f;
      const float coef = g * ((1.f - a.e) * wt + a.e / float(V) * W + 2.f * z * lse);
      const float ge = g * a.e / float(V);
      const float hot = g * (1.f - a.e) * wt;
      for (int64_t base = int64_t(threadIdx.x) * P; base < V; base += int64_t(blockDim.x) * P) {
        float v[P];
        if constexpr (VEC) {
          const Pack<T> in = load_pack(x + base);
#pragma unroll
          for (int k = 0; k < P; ++k) v[k] = to_f(in.v[k]);
        } else {
          v[0] = to_f(x[base]);
        }
#pragma unroll
        for (int k = 0; k < P; ++k) {
          float deriv = 1.f, y = v[k];
          if (a.cap > 0.f) {
            const float th = tanhf(v[k] * inv_cap);
            y = a.cap * th;
            deriv = 1.f - th * th;
          }
          float d = coef * expf(y - lse) - ge * (a.weight ? a.weight[base + k] : 1.f);
          if (base + k == t) d -= hot;
          v[k] = d * deriv;
        }
        if constexpr (VEC) {
          Pack<T> out;
#pragma unroll
          for (int k = 0; k < P; ++k) out.v[k] = from_f<T>(v[k]);
          store_pack(dx + base, out);
        } else {
          dx[base] = from_f<T>(v[0]);
        }
      }
    }
  }
}

template <int MODE>
void launch(const CrossEntropyParams& p, CUstream_st* stream, const char* what) {
  if (p.rows == 0) return;
  dispatch(p.dtype, what, [&](auto tag) {
    using T = decltype(tag);
    CeArgs<T> a{static_cast<const T*>(p.logits), p.target, static_cast<const float*>(p.weight),
                static_cast<float*>(p.loss), static_cast<float*>(p.lse),
                static_cast<const float*>(p.dloss), p.dloss_stride, static_cast<T*>(p.dlogits),
                static_cast<const float*>(p.z_ratio), static_cast<const float*>(p.weight_sum),
                p.rows,
                p.classes, p.ignore_index, float(p.label_smoothing), float(p.z_loss),
                float(p.softcap)};
    const bool vec = p.classes % Pack<T>::N == 0 && aligned16(p.logits) && aligned16(p.dlogits);
    const int threads = threads_for(p.classes, vec ? Pack<T>::N : 1);
    const int blocks = int(p.rows < (1 << 20) ? p.rows : (1 << 20));
    if (vec) ce_kernel<T, true, MODE><<<blocks, threads, 0, stream>>>(a);
    else ce_kernel<T, false, MODE><<<blocks, threads, 0, stream>>>(a);
    check_launch(what);
  });
}

}  // namespace
}  // namespace cuda

void cross_entropy_fwd_cuda(const CrossEntropyParams& p, CUstream_st* stream) {
  cuda::launch<cuda::kFwd>(p, stream, "cross_entropy_fwd_cuda");
}

void cross_entropy_bwd_cuda(const CrossEntropyParams& p, CUstream_st* stream) {
  cuda::launch<cuda::kBwd>(p, stream, "cross_entropy_bwd_cuda");
}

void cross_entropy_fwd_bwd_cuda(const CrossEntropyParams& p, CUstream_st* stream) {
  cuda::launch<cuda::kFwdBwd>(p, stream, "cross_entropy_fwd_bwd_cuda");
}

}  // namespace llmcore
