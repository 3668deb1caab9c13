// Rotary position embedding on the CPU: see llmcore/rope.h for the math. Tokens are split
// over the threads; each token's table row is widened once and used for all its heads.
#include "llmcore/rope.h"

#include <vector>

#include "parallel.h"

namespace llmcore {
namespace {

template <typename T, typename Tab>
LLMCORE_ALWAYS_INLINE inline void rope_tokens(const RopeParams& p, int64_t t0, int64_t t1) {
  using C = compute_t<T>;
  const int64_t half = p.half, d = 2 * half;
  std::vector<C> c(d), s(d);
  const Tab* cos = static_cast<const Tab*>(p.cos);
  const Tab* sin = static_cast<const Tab*>(p.sin);
  const C sign = p.backward ? C(-1) : C(1);
  for (int64_t t = t0; t < t1; ++t) {
    const int64_t r = t % p.rows;
    for (int64_t i = 0; i < d; ++i) {
      c[i] = C(widen(cos[r * d + i]));
      s[i] = C(widen(sin[r * d + i]));
    }
    // forward: y1 = x1 c1 - x2 s1, y2 = x2 c2 + x1 s2; backward: the same with s1 <-> -s2,
    // written with the sign so one loop serves both
    const C* sa = p.backward ? s.data() + half : s.data();   // multiplies x2 in y1 (negated)
    const C* sb = p.backward ? s.data() : s.data() + half;   // multiplies x1 in y2
    for (int which = 0; which < 2; ++which) {
      const T* x = static_cast<const T*>(which ? p.k : p.q);
      T* y = static_cast<T*>(which ? p.out_k : p.out_q);
      const int64_t heads = which ? p.heads_k : p.heads_q;
      const int64_t st = which ? p.k_stride_t : p.q_stride_t;
      const int64_t sh = which ? p.k_stride_h : p.q_stride_h;
      for (int64_t h = 0; h < heads; ++h) {
        const T* xr = x + t * st + h * sh;
        T* yr = y + (t * heads + h) * d;
        for (int64_t i = 0; i < half; ++i) {
          const C x1 = C(widen(xr[i])), x2 = C(widen(xr[i + half]));
          yr[i] = narrow<T>(x1 * c[i] - sign * x2 * sa[i]);
          yr[i + half] = narrow<T>(x2 * c[i + half] + sign * x1 * sb[i]);
        }
      }
    }
  }
}

#define LLMCORE_ROPE_TOKENS(name, T, Tab)                                         \
  LLMCORE_CPU_CLONES void name(const RopeParams& p, int64_t t0, int64_t t1) {     \
    rope_tokens<T, Tab>(p, t0, t1);                                               \
  }
LLMCORE_ROPE_TOKENS(rope_f32, float, float)
LLMCORE_ROPE_TOKENS(rope_f16, Half, float)
LLMCORE_ROPE_TOKENS(rope_bf16, BFloat16, float)
LLMCORE_ROPE_TOKENS(rope_f64, double, double)
#undef LLMCORE_ROPE_TOKENS

}  // namespace

void rope_cpu(const RopeParams& p) {
  if (p.tokens == 0 || p.half == 0) return;
  // the tables arrive in the compute type (the binding converts them): float, double for fp64
  auto* fn = p.dtype == DType::kFloat32 ? rope_f32
             : p.dtype == DType::kFloat16 ? rope_f16
             : p.dtype == DType::kBFloat16 ? rope_bf16 : rope_f64;
  cpu::run_chunks(p.tokens, (p.heads_q + p.heads_k) * 2 * p.half, p.num_threads,
                  [&](int64_t t0, int64_t t1) { fn(p, t0, t1); });
}

}  // namespace llmcore
