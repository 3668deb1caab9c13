// Helpers shared by the CUDA kernels: element conversions, 16-byte vector packs, warp/block
// reductions. Plain CUDA, no torch headers.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "llmcore/dtype.h"

namespace llmcore {
namespace cuda {

__device__ __forceinline__ float to_f(float v) { return v; }
__device__ __forceinline__ float to_f(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_f(float v);
template <> __device__ __forceinline__ float from_f<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_f<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// 16 bytes of T: one vectorised load/store (ld.global.v4).
template <typename T>
struct alignas(16) Pack {
  static constexpr int N = 16 / sizeof(T);
  T v[N];
};

template <typename T>
__device__ __forceinline__ Pack<T> load_pack(const T* p) {
  return *reinterpret_cast<const Pack<T>*>(p);
}

template <typename T>
__device__ __forceinline__ void store_pack(T* p, const Pack<T>& v) {
  *reinterpret_cast<Pack<T>*>(p) = v;
}

inline bool aligned16(const void* p) { return p == nullptr || (uintptr_t(p) % 16) == 0; }

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// Sum over the block; every thread gets the result. `smem`: 32 floats. The summation order is
// fixed by the launch shape, so results are deterministic.
__device__ __forceinline__ float block_sum(float v, float* smem) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  v = warp_sum(v);
  __syncthreads();  // smem may still be read from a previous reduction
  if (lane == 0) smem[warp] = v;
  __syncthreads();
  const int warps = (blockDim.x + 31) >> 5;
  v = lane < warps ? smem[lane] : 0.f;
  return warp_sum(v);
}

__device__ __forceinline__ float block_max(float v, float* smem) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  v = warp_max(v);
  __syncthreads();
  if (lane == 0) smem[warp] = v;
  __syncthreads();
  const int warps = (blockDim.x + 31) >> 5;
  v = lane < warps ? smem[lane] : -INFINITY;
  return warp_max(v);
}

// The largest block the row kernels launch. The norm kernels say so with
// __launch_bounds__(kMaxBlock), so ptxas keeps their registers within what a block of this many
// threads can be given (a debug build or a longer kernel would otherwise fail at launch).
// ce_kernel does not: under the bound ptxas spills its fp32 fused variant (28 bytes, sm_90,
// nvcc 13.0), while unbounded it takes 46 registers, within the 64 a 1024-thread block allows.
constexpr int kMaxBlock = 1024;

// Threads per block for rows of `cols` elements: enough for one pack per thread, 128..1024.
inline int threads_for(int64_t cols, int pack) {
  int64_t want = (cols + pack - 1) / pack;
  int t = 128;
  while (t < want && t < kMaxBlock) t <<= 1;
  return t;
}

inline void check_launch(const char* what) {
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess)
    throw std::runtime_error(std::string(what) + ": CUDA launch failed: " +
                             cudaGetErrorString(err));
}

// Calls f(T{}) with T the CUDA element type of `dtype` (fp32, fp16, bf16).
template <typename F>
void dispatch(DType dtype, const char* what, F&& f) {
  switch (dtype) {
    case DType::kFloat32: return f(float{});
    case DType::kFloat16: return f(__half{});
    case DType::kBFloat16: return f(__nv_bfloat16{});
    default: throw std::invalid_argument(std::string(what) + ": CUDA kernels take fp32/fp16/bf16");
  }
}

}  // namespace cuda
}  // namespace llmcore
