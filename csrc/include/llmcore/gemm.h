// fp32 matrix product on the CPU, C (m, n) = A (m, k) B (k, n) [+ bias] [+ C]: the GEMM of the
// native linear op and of linear_cross_entropy's native chunks. Plain pointers and strides; no
// torch types.
//
// A and B are read through two strides each (a transposed view needs no copy); C has a unit
// column stride. Each element of C is summed by one thread in one fixed order (k ascending, in
// blocks of kKC), so the bits do not depend on the thread count.
#pragma once

#include <cstdint>

namespace llmcore {

struct GemmParams {
  int64_t m = 0, n = 0, k = 0;
  const float* a = nullptr;  // A[i][p] = a[i * a_rs + p * a_ks]
  int64_t a_rs = 0, a_ks = 0;
  const float* b = nullptr;  // B[p][j] = b[p * b_ks + j * b_ns]
  int64_t b_ks = 0, b_ns = 0;
  const float* bias = nullptr;  // (n,) with stride bias_stride, added to every row, or null
  int64_t bias_stride = 1;
  float* c = nullptr;  // C[i][j] = c[i * ldc + j]
  int64_t ldc = 0;
  bool accumulate = false;  // C += A B (else C = A B [+ bias])
  int num_threads = 1;
};

void sgemm_cpu(const GemmParams& p);

// Whether this CPU runs sgemm_cpu's measured path: AVX-512 (32 vector registers for its 8 x 32
// register blocks). Elsewhere the 4-row blocks were never timed and, with 16 registers, hold 20
// vectors live, so callers prefer the BLAS there (llmcore::gemm does).
bool sgemm_cpu_preferred();

}  // namespace llmcore
