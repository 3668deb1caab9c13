// fp32 GEMM on the CPU (llmcore/gemm.h): B is packed, one block of kKC x kNC at a time, into
// panels of kNR = 32 columns (two 16-lane vectors) laid out k-major, so that the micro-kernel
// reads one panel row per k with two vector loads; A is read in place, one broadcast per row and
// k; a block of kMR rows x 32 columns of C stays in registers across the block's k (2 kMR
// vector accumulators: 16 of the 32 AVX-512 registers with kMR = 8). Threads own contiguous
// row ranges of C and pack their own B blocks (packing is k n work against the m k n of the
// products), so no barrier and no shared buffer; each C element is summed by one thread in one
// order. Measured on the CI VM's EPYC (benchmarks/README.md, "the native GEMM"): 95-108 GFLOP/s
// a core on the model's shapes, where MKL's sgemm gave 71-98.
#include "llmcore/gemm.h"

#include <algorithm>
#include <cstring>
#include <memory>

#include "parallel.h"
#include "vmath.h"

namespace llmcore {
namespace {

using Vec = cpu::LanesOf<float, 16>;
using cpu::vload;
using cpu::vstore;

constexpr int64_t kNR = 32;   // columns per panel: two vectors
constexpr int64_t kKC = 256;  // k per packed block
constexpr int64_t kNC = 256;  // columns per packed block: 256 x 256 fp32 = 256 KiB, in L2

// C rows [0, R) x panel columns [0, 32) (+)= A (R, kb) @ panel (kb, 32): `init` says what the
// block's sum is added to, nothing (C = ...), the bias (C = ... + bias) or C (C += ...). Each k
// block is summed from 0 on its own and then added, as MKL's sgemm does: the rounding error
// grows with kKC + k / kKC terms, not with k (at k = 4096 a running sum had 3.9x MKL's mean
// error, this one 1.13x), and a bias is added to the finished sum, as addmm's beta term is.
enum class Init { kZero, kBias, kAddToC };

template <int R>
LLMCORE_ALWAYS_INLINE inline void micro(int64_t kb, const float* a, int64_t a_rs, int64_t a_ks,
                                        const float* panel, float* c, int64_t ldc, Init init,
                                        const float* bias) {
  Vec acc0[R], acc1[R];
  for (int r = 0; r < R; ++r) {
    acc0[r] = Vec{};
    acc1[r] = Vec{};
  }
  for (int64_t p = 0; p < kb; ++p) {
    Vec b0, b1;
    vload(b0, panel + p * kNR);
    vload(b1, panel + p * kNR + 16);
    for (int r = 0; r < R; ++r) {
      const float x = a[r * a_rs + p * a_ks];
      acc0[r] += x * b0;
      acc1[r] += x * b1;
    }
  }
  Vec add0{}, add1{};
  if (init == Init::kBias) {
    vload(add0, bias);
    vload(add1, bias + 16);
  }
  for (int r = 0; r < R; ++r) {
    if (init == Init::kAddToC) {
      vload(add0, c + r * ldc);
      vload(add1, c + r * ldc + 16);
    }
    if (init != Init::kZero) {
      acc0[r] = add0 + acc0[r];
      acc1[r] = add1 + acc1[r];
    }
    vstore(c + r * ldc, acc0[r]);
    vstore(c + r * ldc + 16, acc1[r]);
  }
}

// Rows [0, rows) of C, 0 < rows < kMR, through the micro-kernel of that many rows.
template <int kMR, int R = 1>
LLMCORE_ALWAYS_INLINE inline void micro_tail(int rows, int64_t kb, const float* a, int64_t a_rs,
                                             int64_t a_ks, const float* panel, float* c,
                                             int64_t ldc, Init init, const float* bias) {
  if constexpr (R < kMR) {
    if (rows == R) micro<R>(kb, a, a_rs, a_ks, panel, c, ldc, init, bias);
    else micro_tail<kMR, R + 1>(rows, kb, a, a_rs, a_ks, panel, c, ldc, init, bias);
  }
}

// Rows [i0, i1) x columns [c0, c1) of C (c0 a multiple of 32): for each block of kNC columns
// and kKC of k, pack B's block into panels (zero past c1), then run the micro-kernels over the
// rows. A partial last panel goes through a 32-column scratch tile of C so that no store
// passes c1.
template <int kMR>
LLMCORE_ALWAYS_INLINE inline void gemm_rows(const GemmParams& p, int64_t i0, int64_t i1,
                                            int64_t c0, int64_t c1) {
  const std::unique_ptr<float[]> pack_buf(new float[size_t(kKC * kNC)]);  // uninitialised
  float* const pack_base = pack_buf.get();
  alignas(64) float tile[kMR * kNR];
  alignas(64) float bias_row[kNC];        // the bias of the column block, zero past n
  alignas(64) float a_block[kMR * kKC];   // a transposed A's row block, k-major
  for (int64_t j0 = c0; j0 < c1; j0 += kNC) {
    const int64_t nb = std::min(kNC, c1 - j0);
    for (int64_t k0 = 0; k0 < p.k || (k0 == 0 && p.k == 0); k0 += kKC) {
      const int64_t kb = std::min(kKC, p.k - k0);
      for (int64_t q = 0; q < nb; q += kNR) {
        const int64_t w = std::min(kNR, nb - q);
        float* dst = pack_base + q * kb;
        if (p.b_ks == 1 && p.b_ns != 1) {
          // B's k runs along memory (B = W^T of a row-major W, as in x W^T): read each of the
          // panel's columns as one run and scatter it down the panel (kb x 32, in L1)
          for (int64_t j = 0; j < kNR; ++j) {
            if (j < w) {
              const float* src = p.b + k0 + (j0 + q + j) * p.b_ns;
              for (int64_t t = 0; t < kb; ++t) dst[t * kNR + j] = src[t];
            } else {
              for (int64_t t = 0; t < kb; ++t) dst[t * kNR + j] = 0.f;
            }
          }
          continue;
        }
        for (int64_t t = 0; t < kb; ++t) {
          const float* src = p.b + (k0 + t) * p.b_ks + (j0 + q) * p.b_ns;
          float* row = dst + t * kNR;
          if (p.b_ns == 1) {
            std::memcpy(row, src, size_t(w) * sizeof(float));
          } else {
            for (int64_t j = 0; j < w; ++j) row[j] = src[j * p.b_ns];
          }
          for (int64_t j = w; j < kNR; ++j) row[j] = 0.f;
        }
      }
      // how the block's sums are added in
      const Init init =
          k0 > 0 || p.accumulate ? Init::kAddToC : p.bias ? Init::kBias : Init::kZero;
      if (init == Init::kBias) {
        for (int64_t j = 0; j < nb; ++j) bias_row[j] = p.bias[(j0 + j) * p.bias_stride];
        for (int64_t j = nb; j < kNC; ++j) bias_row[j] = 0.f;
      }
      // row blocks outside, panels inside: a row block's A (kMR x kb) stays in L1 across the
      // panels. A transposed A (rows along memory, as dW = dy^T x) is first copied k-major
      // into that block: read in place, each k would touch another page.
      for (int64_t i = i0; i < i1; i += kMR) {
        const int rows = int(std::min<int64_t>(kMR, i1 - i));
        const float* a = p.a + i * p.a_rs + k0 * p.a_ks;
        int64_t a_rs = p.a_rs, a_ks = p.a_ks;
        if (p.a_rs == 1 && p.a_ks != 1) {
          for (int64_t t = 0; t < kb; ++t) {
            const float* src = a + t * p.a_ks;
            for (int r = 0; r < rows; ++r) a_block[t * kMR + r] = src[r];
          }
          a = a_block;
          a_rs = 1;
          a_ks = kMR;
        }
        for (int64_t q = 0; q < nb; q += kNR) {
          const int64_t w = std::min(kNR, nb - q);
          const float* panel = pack_base + q * kb;
          const float* bias = init == Init::kBias ? bias_row + q : nullptr;
          float* c = p.c + i * p.ldc + j0 + q;
          if (w == kNR) {
            if (rows == kMR) micro<kMR>(kb, a, a_rs, a_ks, panel, c, p.ldc, init, bias);
            else micro_tail<kMR>(rows, kb, a, a_rs, a_ks, panel, c, p.ldc, init, bias);
            continue;
          }
          // a partial panel: through the tile (its first w columns are C's)
          if (init == Init::kAddToC) {
            for (int r = 0; r < rows; ++r) {
              std::memcpy(tile + r * kNR, c + r * p.ldc, size_t(w) * sizeof(float));
              std::fill(tile + r * kNR + w, tile + (r + 1) * kNR, 0.f);
            }
          }
          if (rows == kMR) micro<kMR>(kb, a, a_rs, a_ks, panel, tile, kNR, init, bias);
          else micro_tail<kMR>(rows, kb, a, a_rs, a_ks, panel, tile, kNR, init, bias);
          for (int r = 0; r < rows; ++r)
            std::memcpy(c + r * p.ldc, tile + r * kNR, size_t(w) * sizeof(float));
        }
      }
      if (p.k == 0) break;
    }
  }
}

// One clone per x86 ISA level; 8 rows a block where there are 32 vector registers (AVX-512),
// 4 elsewhere (16 registers: 8 accumulators of two halves each).
LLMCORE_CPU_CLONES void gemm_rows_wide(const GemmParams& p, int64_t i0, int64_t i1, int64_t c0,
                                        int64_t c1) {
  gemm_rows<8>(p, i0, i1, c0, c1);
}
LLMCORE_CPU_CLONES void gemm_rows_narrow(const GemmParams& p, int64_t i0, int64_t i1,
                                          int64_t c0, int64_t c1) {
  gemm_rows<4>(p, i0, i1, c0, c1);
}

bool wide_registers() {
#if defined(__x86_64__) && defined(__GNUC__)
  static const bool avx512 = __builtin_cpu_supports("avx512f");
  return avx512;
#else
  return false;
#endif
}

}  // namespace

bool sgemm_cpu_preferred() { return wide_registers(); }

void sgemm_cpu(const GemmParams& p) {
  if (p.m <= 0 || p.n <= 0) return;
  const bool wide = wide_registers();
  const int64_t mr = wide ? 8 : 4;
  const int64_t blocks = (p.m + mr - 1) / mr, panels = (p.n + kNR - 1) / kNR;
  const int nt = cpu::team_size(blocks * panels, p.k * mr * kNR / 64 + 1, p.num_threads);
  // Threads take contiguous ranges of row blocks, each packing all of B and reading its own rows
  // of A, or, when C is wider than tall (n > m, with two panels a thread at least), ranges of
  // panels, each packing only its part of B and reading all of A: what is done twice is the
  // smaller of the two (on the 2-core VM, the LM head's logits, 512 x 4096: 1.24x -> 1.40x
  // MKL's rate; its dW, 4096 x 128 from a transposed A: 1.12x by rows, 1.05x by columns).
  // Either way a C element has one owner and one summation order.
  const bool by_cols = panels >= 2 * int64_t(nt) && p.n > p.m;
  cpu::run_team(nt, [&] {
    int64_t u0, u1;
    cpu::chunk(by_cols ? panels : blocks, cpu::team_threads(), cpu::thread_id(), &u0, &u1);
    int64_t i0 = 0, i1 = p.m, c0 = 0, c1 = p.n;
    if (by_cols) {
      c0 = u0 * kNR;
      c1 = std::min(p.n, u1 * kNR);
    } else {
      i0 = u0 * mr;
      i1 = std::min(p.m, u1 * mr);
    }
    if (i0 >= i1 || c0 >= c1) return;
    if (wide) gemm_rows_wide(p, i0, i1, c0, c1);
    else gemm_rows_narrow(p, i0, i1, c0, c1);
  });
}

}  // namespace llmcore
