// The work split of the row-wise elementwise kernels (swiglu, gelu): units of one row's block
// of kRowBlock columns, contiguous runs of units per thread, so one long row or many short
// ones both fill the team; and the widening / narrowing copies of their 16-bit paths (each
// loop simple enough to vectorise, which the conversions fused with the math are not).
#pragma once

#include <algorithm>
#include <cstdint>

#include "llmcore/dtype.h"
#include "parallel.h"

namespace llmcore {
namespace cpu {

constexpr int64_t kRowBlock = 256;

// Runs fn(u0, u1) on each team thread over its run of the rows x column-blocks units.
template <typename Fn>
inline void run_row_blocks(int64_t rows, int64_t cols, int max_threads, const Fn& fn) {
  const int64_t units = rows * ((cols + kRowBlock - 1) / kRowBlock);
  run_chunks(units, std::min(cols, kRowBlock), max_threads, fn);
}

// Calls block(r, j0, n) for units [u0, u1): row r, columns [j0, j0 + n).
template <typename Block>
LLMCORE_ALWAYS_INLINE inline void for_row_blocks(int64_t cols, int64_t u0, int64_t u1,
                                                 const Block& block) {
  const int64_t blocks = (cols + kRowBlock - 1) / kRowBlock;
  for (int64_t unit = u0; unit < u1; ++unit) {
    const int64_t r = unit / blocks, j0 = (unit % blocks) * kRowBlock;
    block(r, j0, std::min(kRowBlock, cols - j0));
  }
}

template <typename T>
LLMCORE_ALWAYS_INLINE inline void widen_n(const T* x, compute_t<T>* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = widen(x[i]);
}

template <typename T>
LLMCORE_ALWAYS_INLINE inline void narrow_n(const compute_t<T>* x, T* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = narrow<T>(x[i]);
}

}  // namespace cpu
}  // namespace llmcore
