// Small helpers shared by the CPU kernels: OpenMP teams and static row partitioning.
#pragma once

#include <algorithm>
#include <cstdint>

#ifdef _OPENMP
#include <omp.h>
#endif

// LLMCORE_CPU_CLONES on a (non-template) function compiles it for baseline x86-64, AVX2
// (x86-64-v3) and AVX-512 (x86-64-v4), picked at load time for the running CPU (GCC/Clang
// function multiversioning): wide vectors without a -march that would tie the build to one
// machine. Off with an explicit LLMCORE_NATIVE_ARCH build (-march already chosen) and off
// x86-64. LLMCORE_ALWAYS_INLINE pulls the templated row code into each clone.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(LLMCORE_NATIVE_ARCH_BUILD) && \
    defined(__linux__)
#define LLMCORE_CPU_CLONES \
  __attribute__((target_clones("default", "arch=x86-64-v3", "arch=x86-64-v4")))
#else
#define LLMCORE_CPU_CLONES
#endif
#define LLMCORE_ALWAYS_INLINE __attribute__((always_inline))

namespace llmcore {
namespace cpu {

// Below this many elements a kernel runs on one thread: waking a team costs more.
constexpr int64_t kMinParallelElems = 1 << 15;

// Threads to use for `rows` rows of `cols` elements with at most `max_threads` threads.
inline int team_size(int64_t rows, int64_t cols, int max_threads) {
  if (max_threads < 1 || rows * cols < kMinParallelElems) return 1;
  return int(std::min<int64_t>(max_threads, rows));
}

// Contiguous chunk k of `parts` near-equal chunks of [0, n): rows [*begin, *end).
inline void chunk(int64_t n, int parts, int k, int64_t* begin, int64_t* end) {
  const int64_t base = n / parts, extra = n % parts;
  *begin = k * base + std::min<int64_t>(k, extra);
  *end = *begin + base + (k < extra ? 1 : 0);
}

inline int thread_id() {
#ifdef _OPENMP
  return omp_get_thread_num();
#else
  return 0;
#endif
}

inline int team_threads() {
#ifdef _OPENMP
  return omp_get_num_threads();
#else
  return 1;
#endif
}

// Runs body() on each thread of a team of `nt` OpenMP threads, or once on this thread when nt is
// 1. A parallel region is not free even with a false `if` clause: it starts a team of one and
// ends on a barrier whose futex wake-up is a system call, microseconds per kernel call. Inside
// body, thread_id() and team_threads() are 0 and 1 on the inline path; worksharing loops
// (`omp for`) and barriers in it run as on a team of one.
template <typename Body>
inline void run_team(int nt, const Body& body) {
  if (nt <= 1) {
    body();
    return;
  }
#pragma omp parallel num_threads(nt)
  body();
}

// Runs fn(begin, end) over [0, n) split into one contiguous chunk per thread of a team sized
// by team_size(n, cols, max_threads): the split of every kernel whose units are independent.
template <typename Fn>
inline void run_chunks(int64_t n, int64_t cols, int max_threads, const Fn& fn) {
  run_team(team_size(n, cols, max_threads), [&] {
    int64_t begin, end;
    chunk(n, team_threads(), thread_id(), &begin, &end);
    fn(begin, end);
  });
}

}  // namespace cpu
}  // namespace llmcore
