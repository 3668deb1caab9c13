// attention_fwd_cpu / attention_bwd_cpu against a naive fp64 reference that materialises the
// (Nq, Nk) scores and applies the backward formulas directly (no tiles, no online softmax).
#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "harness.h"
#include "llmcore/attention.h"

namespace {

using llmcore::AttentionParams;
using llmcore::DType;

struct Case {
  int64_t B, Hq, Hkv, Nq, Nk, D, Dv;
  int64_t left, right;
  bool bottom_right;
  double softcap, alibi, dropout;
  bool mask;  // an additive (Nq, Nk) mask, broadcast over batch and heads, with -inf entries
};

struct Ref {
  std::vector<double> out, lse, dq, dk, dv, dmask;
};

// Naive reference: per (b, h), the full score matrix, softmax, dropout, and the gradients.
Ref reference(const Case& c, const std::vector<double>& q, const std::vector<double>& k,
              const std::vector<double>& v, const std::vector<double>& mask,
              const std::vector<double>& dout, double scale, uint64_t seed) {
  const double inf = std::numeric_limits<double>::infinity();
  Ref r;
  r.out.assign(c.B * c.Hq * c.Nq * c.Dv, 0.0);
  r.lse.assign(c.B * c.Hq * c.Nq, inf);
  r.dq.assign(q.size(), 0.0);
  r.dk.assign(k.size(), 0.0);
  r.dv.assign(v.size(), 0.0);
  r.dmask.assign(c.Nq * c.Nk, 0.0);
  const int64_t off = c.bottom_right ? c.Nk - c.Nq : 0;
  for (int64_t b = 0; b < c.B; ++b)
    for (int64_t h = 0; h < c.Hq; ++h) {
      const int64_t hk = h / (c.Hq / c.Hkv);
      auto Q = [&](int64_t i, int64_t d) { return q[((b * c.Hq + h) * c.Nq + i) * c.D + d]; };
      auto K = [&](int64_t j, int64_t d) { return k[((b * c.Hkv + hk) * c.Nk + j) * c.D + d]; };
      auto V = [&](int64_t j, int64_t d) { return v[((b * c.Hkv + hk) * c.Nk + j) * c.Dv + d]; };
      std::vector<double> s(c.Nq * c.Nk), t(c.Nq * c.Nk, 0.0), p(c.Nq * c.Nk, 0.0);
      std::vector<double> z(c.Nq * c.Nk, 1.0);
      for (int64_t i = 0; i < c.Nq; ++i)
        for (int64_t j = 0; j < c.Nk; ++j) {
          double x = 0;
          for (int64_t d = 0; d < c.D; ++d) x += Q(i, d) * K(j, d);
          x *= scale;
          if (c.softcap > 0) {
            t[i * c.Nk + j] = std::tanh(x / c.softcap);
            x = c.softcap * t[i * c.Nk + j];
          }
          const int64_t rel = j - (i + off);
          x -= c.alibi * std::abs(double(rel));
          if (c.mask) x += mask[i * c.Nk + j];
          if ((c.left >= 0 && rel < -c.left) || (c.right >= 0 && rel > c.right)) x = -inf;
          s[i * c.Nk + j] = x;
          if (c.dropout > 0)
            z[i * c.Nk + j] = llmcore::attention_dropout_keep(seed, b, h, c.Hq, i, j, c.dropout)
                                  ? 1.0 / (1.0 - c.dropout) : 0.0;
        }
      for (int64_t i = 0; i < c.Nq; ++i) {
        double m = -inf;
        for (int64_t j = 0; j < c.Nk; ++j) m = std::max(m, s[i * c.Nk + j]);
        if (m == -inf) continue;
        double l = 0;
        for (int64_t j = 0; j < c.Nk; ++j) l += std::exp(s[i * c.Nk + j] - m);
        r.lse[(b * c.Hq + h) * c.Nq + i] = m + std::log(l);
        for (int64_t j = 0; j < c.Nk; ++j) p[i * c.Nk + j] = std::exp(s[i * c.Nk + j] - m) / l;
      }
      for (int64_t i = 0; i < c.Nq; ++i)
        for (int64_t j = 0; j < c.Nk; ++j)
          for (int64_t d = 0; d < c.Dv; ++d)
            r.out[((b * c.Hq + h) * c.Nq + i) * c.Dv + d] += p[i * c.Nk + j] * z[i * c.Nk + j] * V(j, d);
      // backward: dP_ij = Z_ij dO_i . v_j; dS_ij = P_ij (dP_ij - sum_l P_il dP_il)
      for (int64_t i = 0; i < c.Nq; ++i) {
        const double* go = &dout[((b * c.Hq + h) * c.Nq + i) * c.Dv];
        std::vector<double> dp(c.Nk);
        double rowsum = 0;
        for (int64_t j = 0; j < c.Nk; ++j) {
          double x = 0;
          for (int64_t d = 0; d < c.Dv; ++d) x += go[d] * V(j, d);
          dp[j] = x * z[i * c.Nk + j];
          rowsum += p[i * c.Nk + j] * dp[j];
          for (int64_t d = 0; d < c.Dv; ++d)
            r.dv[((b * c.Hkv + hk) * c.Nk + j) * c.Dv + d] += p[i * c.Nk + j] * z[i * c.Nk + j] * go[d];
        }
        for (int64_t j = 0; j < c.Nk; ++j) {
          double ds = p[i * c.Nk + j] * (dp[j] - rowsum);
          r.dmask[i * c.Nk + j] += ds;
          if (c.softcap > 0) ds *= 1.0 - t[i * c.Nk + j] * t[i * c.Nk + j];
          ds *= scale;
          for (int64_t d = 0; d < c.D; ++d) {
            r.dq[((b * c.Hq + h) * c.Nq + i) * c.D + d] += ds * K(j, d);
            r.dk[((b * c.Hkv + hk) * c.Nk + j) * c.D + d] += ds * Q(i, d);
          }
        }
      }
    }
  return r;
}

template <typename T>
void run_case(const Case& c, double tol) {
  const double scale = 1.0 / std::sqrt(double(c.D));
  const uint64_t seed = 12345;
  auto q64 = llmcore_test::randn(c.B * c.Hq * c.Nq * c.D, 1);
  auto k64 = llmcore_test::randn(c.B * c.Hkv * c.Nk * c.D, 2);
  auto v64 = llmcore_test::randn(c.B * c.Hkv * c.Nk * c.Dv, 3);
  auto do64 = llmcore_test::randn(c.B * c.Hq * c.Nq * c.Dv, 4);
  auto mask64 = llmcore_test::randn(c.Nq * c.Nk, 5);
  for (size_t i = 0; i < mask64.size(); i += 7) mask64[i] = -std::numeric_limits<double>::infinity();
  auto cast = [](const std::vector<double>& x) { return std::vector<T>(x.begin(), x.end()); };
  // round the inputs to T first so both sides see the same values
  std::vector<T> q = cast(q64), k = cast(k64), v = cast(v64), dout = cast(do64), mask = cast(mask64);
  q64.assign(q.begin(), q.end());
  k64.assign(k.begin(), k.end());
  v64.assign(v.begin(), v.end());
  do64.assign(dout.begin(), dout.end());
  mask64.assign(mask.begin(), mask.end());
  const Ref ref = reference(c, q64, k64, v64, mask64, do64, scale, seed);

  std::vector<T> out(ref.out.size()), lse(ref.lse.size()), dq(q.size()), dk(k.size()),
      dv(v.size()), dscores(c.mask ? c.B * c.Hq * c.Nq * c.Nk : 0, T(0));
  AttentionParams p;
  p.dtype = sizeof(T) == 8 ? DType::kFloat64 : DType::kFloat32;
  p.batch = c.B;
  p.heads_q = c.Hq;
  p.heads_kv = c.Hkv;
  p.seqlen_q = c.Nq;
  p.seqlen_k = c.Nk;
  p.head_dim = c.D;
  p.head_dim_v = c.Dv;
  p.q = q.data();
  p.k = k.data();
  p.v = v.data();
  const int64_t qs[3] = {c.Hq * c.Nq * c.D, c.Nq * c.D, c.D};
  const int64_t ks[3] = {c.Hkv * c.Nk * c.D, c.Nk * c.D, c.D};
  const int64_t vs[3] = {c.Hkv * c.Nk * c.Dv, c.Nk * c.Dv, c.Dv};
  const int64_t os[3] = {c.Hq * c.Nq * c.Dv, c.Nq * c.Dv, c.Dv};
  for (int i = 0; i < 3; ++i) {
    p.q_stride[i] = qs[i];
    p.k_stride[i] = ks[i];
    p.v_stride[i] = vs[i];
    p.out_stride[i] = os[i];
    p.dout_stride[i] = os[i];
    p.dq_stride[i] = qs[i];
    p.dk_stride[i] = ks[i];
    p.dv_stride[i] = vs[i];
  }
  p.out = out.data();
  p.lse = lse.data();
  p.scale = scale;
  p.softcap = c.softcap;
  p.window_left = c.left;
  p.window_right = c.right;
  p.bottom_right = c.bottom_right;
  std::vector<T> slopes(c.B * c.Hq, T(c.alibi));
  if (c.alibi > 0) p.alibi = slopes.data();
  if (c.mask) {
    p.mask = mask.data();
    p.mask_stride[2] = c.Nk;  // (1, 1, Nq, Nk) broadcast over batch and heads
    p.mask_stride[3] = 1;
  }
  p.dropout_p = c.dropout;
  p.seed = seed;
  p.num_threads = 2;
  llmcore::attention_fwd_cpu(p);
  p.dout = dout.data();
  // nan everywhere first: the kernel must write every element of the dense gradients
  for (auto* g : {&dq, &dk, &dv})
    std::fill(g->begin(), g->end(), std::numeric_limits<T>::quiet_NaN());
  p.dq = dq.data();
  p.dk = dk.data();
  p.dv = dv.data();
  p.dscores = c.mask ? dscores.data() : nullptr;
  llmcore::attention_bwd_cpu(p);

  for (size_t i = 0; i < out.size(); ++i) CHECK_NEAR(out[i], ref.out[i], tol, tol);
  for (size_t i = 0; i < lse.size(); ++i) {
    if (std::isinf(ref.lse[i])) CHECK(std::isinf(double(lse[i])) && lse[i] > 0);
    else CHECK_NEAR(lse[i], ref.lse[i], tol, tol);
  }
  for (size_t i = 0; i < dq.size(); ++i) CHECK_NEAR(dq[i], ref.dq[i], tol, tol);
  for (size_t i = 0; i < dk.size(); ++i) CHECK_NEAR(dk[i], ref.dk[i], tol, tol);
  for (size_t i = 0; i < dv.size(); ++i) CHECK_NEAR(dv[i], ref.dv[i], tol, tol);
  if (c.mask) {  // d mask summed over the broadcast batch and head dims
    for (int64_t e = 0; e < c.Nq * c.Nk; ++e) {
      double sum = 0;
      for (int64_t bh = 0; bh < c.B * c.Hq; ++bh) sum += double(dscores[bh * c.Nq * c.Nk + e]);
      CHECK_NEAR(sum, ref.dmask[e], tol, tol);
    }
  }
}

// B, Hq, Hkv, Nq, Nk, D, Dv, left, right, bottom_right, softcap, alibi, dropout, mask
const Case kPlain{2, 2, 2, 70, 67, 16, 16, -1, -1, false, 0.0, 0.0, 0.0, false};
const Case kCausalGqa{1, 4, 2, 130, 129, 24, 40, -1, 0, true, 0.0, 0.0, 0.0, false};
const Case kWindowSoftcapAlibi{1, 2, 1, 97, 150, 8, 8, 40, 3, false, 1.5, 0.25, 0.0, false};
const Case kMaskDropout{2, 2, 1, 65, 80, 16, 16, -1, -1, false, 0.0, 0.0, 0.3, true};

}  // namespace

TEST(attention_f64_plain) { run_case<double>(kPlain, 1e-10); }
TEST(attention_f64_causal_gqa) { run_case<double>(kCausalGqa, 1e-10); }
TEST(attention_f64_window_softcap_alibi) { run_case<double>(kWindowSoftcapAlibi, 1e-10); }
TEST(attention_f64_mask_dropout) { run_case<double>(kMaskDropout, 1e-10); }
TEST(attention_f32_causal_gqa) { run_case<float>(kCausalGqa, 2e-4); }
TEST(attention_f32_mask_dropout) { run_case<float>(kMaskDropout, 2e-4); }
