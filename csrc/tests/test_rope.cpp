// rope_cpu against a double-precision reference of the rotation (llmcore/rope.h), forward and
// backward, with GQA, strided inputs (q and k inside one fused QKV row), tables shared by
// several tokens (t % rows) and every element type.
#include <cmath>
#include <vector>

#include "harness.h"
#include "llmcore/rope.h"

namespace {

using llmcore::DType;

using llmcore_test::cast;

template <typename T>
void run(DType dtype, double tol, bool backward) {
  const int64_t tokens = 12, rows = 4, hq = 3, hk = 1, half = 5, d = 2 * half;
  const int64_t width = (hq + 2 * hk) * d;            // one fused QKV row per token
  const auto qkv64 = llmcore_test::randn(size_t(tokens * width), 7);
  const auto cos64 = llmcore_test::randn(size_t(rows * d), 8);
  const auto sin64 = llmcore_test::randn(size_t(rows * d), 9);
  const auto qkv = cast<T>(qkv64);
  using C = llmcore::compute_t<T>;
  std::vector<C> cos(cos64.begin(), cos64.end()), sin(sin64.begin(), sin64.end());
  std::vector<T> out_q(size_t(tokens * hq * d)), out_k(size_t(tokens * hk * d));
  llmcore::RopeParams p;
  p.dtype = dtype;
  p.backward = backward;
  p.tokens = tokens;
  p.rows = rows;
  p.half = half;
  p.heads_q = hq;
  p.heads_k = hk;
  p.q = qkv.data();
  p.k = qkv.data() + hq * d;
  p.q_stride_t = p.k_stride_t = width;
  p.q_stride_h = p.k_stride_h = d;
  p.cos = cos.data();
  p.sin = sin.data();
  p.out_q = out_q.data();
  p.out_k = out_k.data();
  p.num_threads = 2;
  llmcore::rope_cpu(p);
  for (int which = 0; which < 2; ++which) {
    const int64_t heads = which ? hk : hq, off = which ? hq * d : 0;
    const std::vector<T>& out = which ? out_k : out_q;
    for (int64_t t = 0; t < tokens; ++t) {
      const int64_t r = t % rows;
      for (int64_t h = 0; h < heads; ++h) {
        for (int64_t i = 0; i < half; ++i) {
          // the inputs as the kernel sees them (rounded to T)
          const double x1 = double(llmcore::widen(qkv[t * width + off + h * d + i]));
          const double x2 = double(llmcore::widen(qkv[t * width + off + h * d + i + half]));
          const double c1 = cos[r * d + i], c2 = cos[r * d + i + half];
          const double s1 = sin[r * d + i], s2 = sin[r * d + i + half];
          const double y1 = backward ? x1 * c1 + x2 * s2 : x1 * c1 - x2 * s1;
          const double y2 = backward ? x2 * c2 - x1 * s1 : x2 * c2 + x1 * s2;
          const int64_t o = (t * heads + h) * d + i;
          CHECK_NEAR(double(llmcore::widen(out[o])), y1, tol, tol);
          CHECK_NEAR(double(llmcore::widen(out[o + half])), y2, tol, tol);
        }
      }
    }
  }
}

}  // namespace

TEST(rope_fp32) { run<float>(DType::kFloat32, 1e-6, false); run<float>(DType::kFloat32, 1e-6, true); }
TEST(rope_fp64) { run<double>(DType::kFloat64, 1e-13, false); run<double>(DType::kFloat64, 1e-13, true); }
TEST(rope_bf16) {
  run<llmcore::BFloat16>(DType::kBFloat16, 1e-2, false);
  run<llmcore::BFloat16>(DType::kBFloat16, 1e-2, true);
}
TEST(rope_fp16) {
  run<llmcore::Half>(DType::kFloat16, 2e-3, false);
  run<llmcore::Half>(DType::kFloat16, 2e-3, true);
}
