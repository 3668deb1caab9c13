// Flash-style attention forward and backward on the CPU (FlashAttention-2, Dao 2023): query
// tiles of kBM rows meet streamed key tiles of kBN keys; each score tile lives in L1 and the
// softmax is computed online (running max m and sum l per row), so extra memory is O(N): the
// logsumexp per row (compute type), saved for the backward, which recomputes the probabilities.
//
// Work is split over (batch-or-sequence, head, tile) tasks, or for the fused backward
// (batch-or-sequence, kv head) tasks, one OpenMP dynamic schedule; every task writes its own
// rows, so results do not depend on the thread count (no atomics). The tile products are
// register-blocked rank-1 updates (gemm_acc); the per-task functions are compiled per x86 ISA
// level (LLMCORE_CPU_CLONES). Only fp32 and fp64 tensors reach this file (the binding upcasts
// fp16 and bf16), so the element type is the compute type C.
#include "llmcore/attention.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "parallel.h"
#include "vmath.h"

namespace llmcore {
namespace {

constexpr int64_t kBM = 64;  // query rows per tile
constexpr int64_t kBN = 64;  // keys per tile: a 64 x 64 fp32 score tile is 16 KiB

// ------------------------------------------------------------------ dropout hash
inline uint64_t mix64(uint64_t z) {  // splitmix64's finaliser
  z += 0x9e3779b97f4a7c15ull;
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

// One 64-bit key per (seed, b, h, row); the keys of a row's columns come from a 32-bit hash
// (murmur3's finaliser, a bijection) of the column, cheap enough for a vector loop.
inline uint64_t row_key(uint64_t seed, int64_t b, int64_t h, int64_t heads_q, int64_t i) {
  return mix64(seed ^ mix64((uint64_t(b * heads_q + h) << 32) + uint64_t(i)));
}

#pragma omp declare simd
inline uint32_t col_bits(uint32_t lo, uint32_t hi, uint32_t j) {
  uint32_t x = (j * 0x9e3779b9u + hi) ^ lo;
  x ^= x >> 16;
  x *= 0x85ebca6bu;
  x ^= x >> 13;
  x *= 0xc2b2ae35u;
  x ^= x >> 16;
  return x >> 8;  // 24 uniform bits: keep when >= p * 2^24
}

inline uint32_t drop_threshold(double p) { return uint32_t(p * 16777216.0 + 0.5); }

// ------------------------------------------------------------------ geometry
struct Seq {
  int64_t b;       // index into the tensors' batch dim (0 for varlen)
  int64_t s;       // batch or sequence index (ALiBi row, dropout key)
  int64_t q0, lq;  // first packed query row and the number of rows
  int64_t k0, lk;
  int64_t off;     // alignment offset of the diagonal: query i sees r = j - (i + off)
};

inline Seq seq_of(const AttentionParams& p, int64_t s) {
  Seq g;
  g.s = s;
  if (p.cu_seqlens_q) {
    g.b = 0;
    g.q0 = p.cu_seqlens_q[s];
    g.lq = p.cu_seqlens_q[s + 1] - g.q0;
    g.k0 = p.cu_seqlens_k[s];
    g.lk = p.cu_seqlens_k[s + 1] - g.k0;
  } else {
    g.b = s;
    g.q0 = g.k0 = 0;
    g.lq = p.seqlen_q;
    g.lk = p.seqlen_k;
  }
  g.off = p.bottom_right ? g.lk - g.lq : 0;
  return g;
}

// Keys [*jb, *je) that some row of [i0, i0 + mi) may see under the window.
inline void key_range(const AttentionParams& p, const Seq& g, int64_t i0, int64_t mi, int64_t* jb,
                      int64_t* je) {
  *jb = p.window_left >= 0 ? std::max<int64_t>(0, i0 + g.off - p.window_left) : 0;
  *je = p.window_right >= 0 ? std::min<int64_t>(g.lk, i0 + mi - 1 + g.off + p.window_right + 1)
                            : g.lk;
}

// Query rows [*ib, *ie) that may see some key of [j0, j0 + nj).
inline void query_range(const AttentionParams& p, const Seq& g, int64_t j0, int64_t nj,
                        int64_t* ib, int64_t* ie) {
  *ib = p.window_right >= 0 ? std::max<int64_t>(0, j0 - g.off - p.window_right) : 0;
  *ie = p.window_left >= 0 ? std::min<int64_t>(g.lq, j0 + nj - 1 - g.off + p.window_left + 1)
                           : g.lq;
}

// Tasks: (sequence, head, tile), with the tiles of the longest sequence per sequence (varlen:
// tasks past a shorter sequence's end return at once).
inline int64_t q_tiles(const AttentionParams& p) {
  return ((p.cu_seqlens_q ? p.max_len_q : p.seqlen_q) + kBM - 1) / kBM;
}
inline int64_t k_tiles(const AttentionParams& p) {
  return ((p.cu_seqlens_q ? p.max_len_k : p.seqlen_k) + kBN - 1) / kBN;
}

// Per-thread scratch, sized once per kernel call.
template <typename C>
struct Work {
  std::vector<C> qs, dos, kt, vt, s, t, dp, pd, acc, acc2, row_a, row_b;
  // Forward: this thread's keys of one (sequence, kv head) transposed into (d, kBN) tiles as
  // its q-tiles first need them, reused by its later q-tiles of the same kv head (tasks come in
  // head order), instead of one transposition per q-tile. No barrier, no shared buffer.
  std::vector<C> kt_cache;
  std::vector<uint8_t> kt_have;  // per tile: filled for kt_owner
  int64_t kt_owner = -1;         // s * heads_kv + kv head, or -1
  // Forward: whether all of V's rows of the (sequence, kv head) v_owner are finite, checked
  // once per thread and kv head rather than once per q-tile
  int64_t v_owner = -1;
  bool v_finite = false;
  Work(int64_t d, int64_t dv)
      : qs(kBM * d), dos(kBM * dv), kt(d * kBN), vt(dv * kBN), s(kBM * kBN), t(kBM * kBN),
        dp(kBM * kBN), pd(kBM * kBN), acc(std::max(kBM, kBN) * std::max(d, dv)),
        acc2(kBN * dv), row_a(kBM), row_b(kBM) {}
};

// The readers of strided q, k, v, dO rows below ask for the row kAhead rows on at the start of
// each row, a line at a time: rows of a (B, N, H, D) view are short runs far apart (one head's
// D values per token), which the hardware prefetchers follow late. Measured on the 2-vCPU EPYC
// VM (benchmarks/README.md, "the attention rows prefetched"): forward 4-12% and backward 1-7%
// faster than without, 8 rows ahead as good as 12 or 16 and better than 2 or 4.
constexpr int64_t kAhead = 8;

template <typename C>
LLMCORE_ALWAYS_INLINE inline void prefetch_row(const C* row, int64_t cols) {
  for (int64_t c = 0; c < cols; c += int64_t(64 / sizeof(C))) __builtin_prefetch(row + c);
}

// rows [r0, r0 + n) of a (rows, cols) strided matrix into a dense (n, cols) tile
template <typename C>
LLMCORE_ALWAYS_INLINE inline void load_rows(const C* base, int64_t stride, int64_t r0, int64_t n,
                                            int64_t cols, C* dst) {
  for (int64_t r = 0; r < n; ++r) {
    const C* src = base + (r0 + r) * stride;
    if (r + kAhead < n) prefetch_row(src + kAhead * stride, cols);
#pragma omp simd
    for (int64_t c = 0; c < cols; ++c) dst[r * cols + c] = src[c];
  }
}

// a dense (n, cols) tile times a into rows of a strided (rows, cols) matrix (row stride rs)
template <typename C>
LLMCORE_ALWAYS_INLINE inline void store_rows(const C* src, int64_t n, int64_t cols, C a, C* dst,
                                             int64_t rs) {
  for (int64_t r = 0; r < n; ++r) {
    C* row = dst + r * rs;
#pragma omp simd
    for (int64_t c = 0; c < cols; ++c) row[c] = src[r * cols + c] * a;
  }
}

// row `row` of head h of batch b in a gradient with strides st (batch, head, row)
template <typename C>
LLMCORE_ALWAYS_INLINE inline C* grad_row(void* base, const int64_t* st, int64_t b, int64_t h,
                                         int64_t row) {
  return static_cast<C*>(base) + b * st[0] + h * st[1] + row * st[2];
}

// rows [r0, r0 + n) transposed into a (cols, kBN) tile, zero in the columns n..kBN
template <typename C>
LLMCORE_ALWAYS_INLINE inline void load_cols(const C* base, int64_t stride, int64_t r0, int64_t n,
                                            int64_t cols, C* dst) {
  for (int64_t c = 0; c < cols; ++c)
    for (int64_t r = n; r < kBN; ++r) dst[c * kBN + r] = C(0);
  for (int64_t r = 0; r < n; ++r) {
    const C* src = base + (r0 + r) * stride;
    if (r + kAhead < n) prefetch_row(src + kAhead * stride, cols);
    for (int64_t c = 0; c < cols; ++c) dst[c * kBN + r] = src[c];
  }
}

// whether rows [r0, r0 + n) of a (rows, cols) strided matrix are all finite (0 * x is nan iff
// x is inf or nan)
template <typename C>
LLMCORE_ALWAYS_INLINE inline bool rows_finite(const C* base, int64_t stride, int64_t r0,
                                              int64_t n, int64_t cols) {
  constexpr int kL = 16;  // lane accumulators, summed once at the end
  C acc[kL] = {};
  C tail = C(0);
  for (int64_t r = 0; r < n; ++r) {
    const C* src = base + (r0 + r) * stride;
    if (r + kAhead < n) prefetch_row(src + kAhead * stride, cols);
    int64_t c = 0;
    for (; c + kL <= cols; c += kL)
      for (int l = 0; l < kL; ++l) acc[l] += src[c + l] * C(0);
    for (; c < cols; ++c) tail += src[c] * C(0);
  }
  for (int l = 0; l < kL; ++l) tail += acc[l];
  return tail == C(0);
}

// ------------------------------------------------------------------ tile products
// C (M, N) += A (M, K) @ B (K, N), with A read through strides (a_rs per row, a_ks per k) so
// that a transposed operand (P^T, dS^T) needs no copy, and B / C row-major (ldb, ldc). Blocks
// of kR rows x 2 vectors of C stay in registers across the K loop: one B load feeds kR FMAs.
// A vector is 64 bytes (cpu::LanesOf: 16 floats or 8 doubles; 4 xmm, 2 ymm or 1 zmm).
template <typename C>
using VecOf = cpu::LanesOf<C, int(64 / sizeof(C))>;
using cpu::vload;
using cpu::vstore;

constexpr int kR = 4;  // rows per register block

template <typename C, int R>
LLMCORE_ALWAYS_INLINE inline void gemm_block(int64_t K, const C* A, int64_t a_rs, int64_t a_ks,
                                             const C* B, int64_t ldb, C* Cm, int64_t ldc) {
  using Vec = VecOf<C>;
  constexpr int kL = int(sizeof(Vec) / sizeof(C));
  Vec acc0[R], acc1[R];
  for (int r = 0; r < R; ++r) {
    vload(acc0[r], Cm + r * ldc);
    vload(acc1[r], Cm + r * ldc + kL);
  }
  for (int64_t k = 0; k < K; ++k) {
    Vec b0, b1;
    vload(b0, B + k * ldb);
    vload(b1, B + k * ldb + kL);
    for (int r = 0; r < R; ++r) {
      const C x = A[r * a_rs + k * a_ks];
      acc0[r] += x * b0;
      acc1[r] += x * b1;
    }
  }
  for (int r = 0; r < R; ++r) {
    vstore(Cm + r * ldc, acc0[r]);
    vstore(Cm + r * ldc + kL, acc1[r]);
  }
}

// The causal (right-window) band of a (q-tile, k-tile) pair in tile-local indices: score (i, j)
// can be visible only if j <= i + delta (delta = i0 + offset + window_right - j0); kNoBand when
// there is no right window. The tile products skip what lies wholly outside it, the row blocks
// that only read or write zeros there (for a diagonal tile about half of the work): masked
// scores are -inf, their probabilities and dS exactly 0, so with finite operands skipping
// changes no result (fwd_task and bwd_tile skip a product's band only then).
constexpr int64_t kNoBand = int64_t(1) << 40;

// The band of the (q-tile i0, k-tile j0) pair (kNoBand without a right window)
LLMCORE_ALWAYS_INLINE inline int64_t pair_band(const AttentionParams& p, const Seq& g, int64_t i0,
                                               int64_t j0) {
  return p.window_right >= 0 ? i0 + g.off + p.window_right - j0 : kNoBand;
}

// Which operand index of gemm_acc the band bounds, for C row block [m, m + rows):
//   kCols:  C's columns, C = scores (M query rows, N keys):     n < m + rows + delta
//   kKUpTo: the K index, C = P or dS (query rows) times keys:  k < m + rows + delta
//   kKFrom: the K index, C = P^T or dS^T (key rows) times rows: k >= m - delta
enum class Band { kCols, kKUpTo, kKFrom };

// [*k0, *k1) of the K range and the column end *n1 that C rows [m, m + rows) need in the band
LLMCORE_ALWAYS_INLINE inline void band_limits(Band band, int64_t delta, int64_t m, int64_t rows,
                                              int64_t N, int64_t K, int64_t* k0, int64_t* k1,
                                              int64_t* n1) {
  *k0 = 0;
  *k1 = K;
  *n1 = N;
  if (delta >= kNoBand) return;
  const int64_t hi = std::max<int64_t>(0, m + rows + delta);
  if (band == Band::kCols) *n1 = std::min(N, hi);
  else if (band == Band::kKUpTo) *k1 = std::min(K, hi);
  else *k0 = std::min(K, std::max<int64_t>(0, m - delta));
}

template <typename C>
LLMCORE_ALWAYS_INLINE inline void gemm_acc(int64_t M, int64_t N, int64_t K, const C* A,
                                           int64_t a_rs, int64_t a_ks, const C* B, int64_t ldb,
                                           C* Cm, int64_t ldc, Band band = Band::kCols,
                                           int64_t delta = kNoBand) {
  constexpr int64_t kW = 2 * int64_t(64 / sizeof(C));  // columns per block
  int64_t k0, k1, n1;
  int64_t n0 = 0;
  for (; n0 + kW <= N; n0 += kW) {
    int64_t m0 = 0;
    for (; m0 + kR <= M; m0 += kR) {
      band_limits(band, delta, m0, kR, N, K, &k0, &k1, &n1);
      if (n0 < n1 && k0 < k1)
        gemm_block<C, kR>(k1 - k0, A + m0 * a_rs + k0 * a_ks, a_rs, a_ks, B + k0 * ldb + n0,
                          ldb, Cm + m0 * ldc + n0, ldc);
    }
    for (; m0 < M; ++m0) {
      band_limits(band, delta, m0, 1, N, K, &k0, &k1, &n1);
      if (n0 < n1 && k0 < k1)
        gemm_block<C, 1>(k1 - k0, A + m0 * a_rs + k0 * a_ks, a_rs, a_ks, B + k0 * ldb + n0,
                         ldb, Cm + m0 * ldc + n0, ldc);
    }
  }
  if (n0 == N) return;
  for (int64_t m = 0; m < M; ++m) {  // the last N % kW columns: rank-1 updates of one row
    band_limits(band, delta, m, 1, N, K, &k0, &k1, &n1);
    if (n0 >= n1) continue;
    C* crow = Cm + m * ldc;
    for (int64_t k = k0; k < k1; ++k) {
      const C x = A[m * a_rs + k * a_ks];
      const C* b = B + k * ldb;
#pragma omp simd
      for (int64_t n = n0; n < N; ++n) crow[n] += x * b[n];
    }
  }
}

// out (mi, kBN) = a (mi, kdim) @ bt (kdim, kBN); columns wholly outside the band stay 0
template <typename C>
LLMCORE_ALWAYS_INLINE inline void tile_abt(const C* a, const C* bt, int64_t mi, int64_t kdim,
                                           C* out, int64_t delta = kNoBand) {
  std::fill(out, out + mi * kBN, C(0));
  gemm_acc(mi, kBN, kdim, a, kdim, 1, bt, kBN, out, kBN, Band::kCols, delta);
}

// The entries of tile row i that can be visible in the band, rounded up to whole 16-lane groups
// (at least the row's visible keys; the rest of the row is masked)
LLMCORE_ALWAYS_INLINE inline int64_t band_row_len(int64_t i, int64_t delta) {
  if (delta >= kNoBand) return kBN;
  const int64_t vis = std::min<int64_t>(kBN, std::max<int64_t>(0, i + delta + 1));
  return (vis + 15) / 16 * 16;
}

// The final scores of a tile, in place on s (mi, kBN) holding q.k: scale, softcap (t keeps
// tanh(s / softcap) for the backward), ALiBi, mask, and -inf outside the window or past nj.
template <typename C>
LLMCORE_ALWAYS_INLINE inline void finish_scores(const AttentionParams& p, const Seq& g, int64_t h,
                                                int64_t i0, int64_t mi, int64_t j0, int64_t nj,
                                                C* s, C* t) {
  constexpr C kNegInf = -std::numeric_limits<C>::infinity();
  const C scale = C(p.scale), cap = C(p.softcap), inv_cap = p.softcap > 0 ? C(1.0 / p.softcap) : C(0);
  const C slope = p.alibi ? static_cast<const C*>(p.alibi)[g.s * p.heads_q + h] : C(0);
  const C* mask = p.mask ? static_cast<const C*>(p.mask) + g.b * p.mask_stride[0] +
                               h * p.mask_stride[1] : nullptr;
  const int64_t ms2 = p.mask_stride[2], ms3 = p.mask_stride[3];
  for (int64_t i = 0; i < mi; ++i) {
    C* row = s + i * kBN;
    const int64_t diag = i0 + i + g.off;  // key index of this row's diagonal
    if (p.softcap > 0) {
      C* trow = t + i * kBN;
#pragma omp simd
      for (int64_t j = 0; j < kBN; ++j) {
        const C th = cpu::tanh_approx(row[j] * scale * inv_cap);
        trow[j] = th;
        row[j] = cap * th;
      }
    } else {
#pragma omp simd
      for (int64_t j = 0; j < kBN; ++j) row[j] *= scale;
    }
    if (p.alibi) {
#pragma omp simd
      for (int64_t j = 0; j < kBN; ++j) row[j] -= slope * std::abs(C(j0 + j - diag));
    }
    if (mask) {
      const C* mrow = mask + (i0 + i) * ms2 + j0 * ms3;
      for (int64_t j = 0; j < nj; ++j) row[j] += mrow[j * ms3];
    }
    // keys [lo, hi) of the tile are inside the window and the sequence
    int64_t lo = 0, hi = nj;
    if (p.window_left >= 0) lo = std::max<int64_t>(lo, diag - p.window_left - j0);
    if (p.window_right >= 0) hi = std::min<int64_t>(hi, diag + p.window_right + 1 - j0);
    lo = std::min<int64_t>(lo, kBN);
    hi = std::max<int64_t>(hi, 0);
    for (int64_t j = 0; j < lo; ++j) row[j] = kNegInf;
    for (int64_t j = std::max(hi, lo); j < kBN; ++j) row[j] = kNegInf;
  }
}

// p[i][j] *= keep_ij / (1 - dropout_p) for the tile's rows (dropout applied to probabilities).
template <typename C>
LLMCORE_ALWAYS_INLINE inline void apply_dropout(const AttentionParams& p, const Seq& g, int64_t h,
                                                int64_t i0, int64_t mi, int64_t j0,
                                                const C* src, C* dst) {
  const uint32_t thr = drop_threshold(p.dropout_p);
  const C inv_keep = C(1.0 / (1.0 - p.dropout_p));
  for (int64_t i = 0; i < mi; ++i) {
    const uint64_t key = row_key(p.seed, g.s, h, p.heads_q, i0 + i);
    const uint32_t lo = uint32_t(key), hi = uint32_t(key >> 32);
#pragma omp simd
    for (int64_t j = 0; j < kBN; ++j)
      dst[i * kBN + j] = col_bits(lo, hi, uint32_t(j0 + j)) >= thr ? src[i * kBN + j] * inv_keep
                                                                  : C(0);
  }
}

// ------------------------------------------------------------------ forward
// Row helpers of the online softmax. GCC vectorises the max as an `omp simd` max reduction,
// but keeps an `omp simd` sum around the inlined exp scalar: there a fixed-width lane loop
// (vectorised) feeds one small reduction. Every order is fixed (deterministic).
template <typename C>
LLMCORE_ALWAYS_INLINE inline C row_max(const C* row, int64_t n) {  // a nan may or may not show
  C mx = -std::numeric_limits<C>::infinity();
#pragma omp simd reduction(max : mx)
  for (int64_t j = 0; j < n; ++j) mx = mx > row[j] ? mx : row[j];
  return mx;
}

template <typename C>
LLMCORE_ALWAYS_INLINE inline bool row_has_nan(const C* row) {
  for (int64_t j = 0; j < kBN; ++j)
    if (row[j] != row[j]) return true;
  return false;
}

// row[j] = exp(row[j] - m) in place for j < n (a multiple of 16); returns their sum
template <typename C>
LLMCORE_ALWAYS_INLINE inline C row_exp_sum(C* row, int64_t n, C m) {
  constexpr int kL = 16;
  static_assert(kBN % kL == 0, "score rows are whole lane groups");
  static_assert(kL == cpu::kSumLanes, "one accumulator per lane of cpu::sum_lanes");
  C acc[kL] = {};
  for (int64_t j = 0; j < n; j += kL)
    for (int l = 0; l < kL; ++l) {
      const C e = cpu::exp_nonpos(C(row[j + l] - m));
      row[j + l] = e;
      acc[l] += e;
    }
  return cpu::sum_lanes(acc);  // pairwise: no serial chain of 16 additions per row and tile
}

// Task (s, h, q-tile): online softmax over the visible key tiles, then out = acc / l and
// lse = m + log l (+inf and out = 0 for a row that saw no finite score).
template <typename C>
LLMCORE_ALWAYS_INLINE inline void fwd_task(const AttentionParams& p, int64_t task, bool cache_kt,
                                           Work<C>& w) {
  constexpr C kNegInf = -std::numeric_limits<C>::infinity();
  const int64_t hq = p.heads_q, d = p.head_dim, dv = p.head_dim_v;
  const int64_t tiles = q_tiles(p);
  const int64_t it = task % tiles, h = (task / tiles) % hq, s = task / tiles / hq;
  const Seq g = seq_of(p, s);
  const int64_t i0 = it * kBM;
  if (i0 >= g.lq) return;
  const int64_t mi = std::min(kBM, g.lq - i0), hk = h / (hq / p.heads_kv);
  const C* qb = static_cast<const C*>(p.q) + g.b * p.q_stride[0] + h * p.q_stride[1] +
                g.q0 * p.q_stride[2];
  const C* kb = static_cast<const C*>(p.k) + g.b * p.k_stride[0] + hk * p.k_stride[1] +
                g.k0 * p.k_stride[2];
  const C* vb = static_cast<const C*>(p.v) + g.b * p.v_stride[0] + hk * p.v_stride[1] +
                g.k0 * p.v_stride[2];
  C* qs = w.qs.data();
  C* kt = w.kt.data();
  C* sc = w.s.data();
  C* acc = w.acc.data();  // (mi, dv) running sum of p * v
  C* m = w.row_a.data();
  C* l = w.row_b.data();
  load_rows(qb, p.q_stride[2], i0, mi, d, qs);
  std::fill(acc, acc + mi * dv, C(0));
  std::fill(m, m + mi, kNegInf);
  std::fill(l, l + mi, C(0));

  int64_t jb, je;
  key_range(p, g, i0, mi, &jb, &je);
  // Under a right window (causal) the diagonal tiles skip what the band masks: the scores'
  // column blocks and the softmax of the masked tail of each row always; the keys P V skips
  // only when the kv head's rows of V are finite (0 * nan is nan: the oracle's P @ V spreads a
  // nan in a masked key's value, and so does this kernel).
  const bool banded = p.window_right >= 0;
  if (banded && w.v_owner != s * p.heads_kv + hk) {
    w.v_owner = s * p.heads_kv + hk;
    w.v_finite = rows_finite(vb, p.v_stride[2], 0, g.lk, dv);
  }
  const bool v_finite = banded && w.v_finite;
  for (int64_t j0 = jb; j0 < je; j0 += kBN) {
    const int64_t nj = std::min(kBN, je - j0);
    const int64_t delta = pair_band(p, g, i0, j0);
    const C* ktile = kt;  // K^T tile, from the thread's cache when the tiles are aligned
    if (cache_kt && j0 % kBN == 0) {
      const int64_t owner = s * p.heads_kv + hk, t = j0 / kBN;
      if (w.kt_owner != owner) {
        std::fill(w.kt_have.begin(), w.kt_have.end(), uint8_t(0));
        w.kt_owner = owner;
      }
      C* tile = w.kt_cache.data() + t * d * kBN;
      if (!w.kt_have[t]) {  // the whole tile: a later q-tile may see more of it than nj
        load_cols(kb, p.k_stride[2], j0, std::min(kBN, g.lk - j0), d, tile);
        w.kt_have[t] = 1;
      }
      ktile = tile;
    } else {
      load_cols(kb, p.k_stride[2], j0, nj, d, kt);
    }
    tile_abt(qs, ktile, mi, d, sc, delta);
    finish_scores(p, g, h, i0, mi, j0, nj, sc, w.t.data());
    for (int64_t i = 0; i < mi; ++i) {
      C* row = sc + i * kBN;
      const int64_t len = band_row_len(i, delta);  // the rest of the row is masked
      // A nan score (nan in q or k) must give a nan row, as the oracle does: with a finite max
      // its exp makes the sum, and so l, out and lse nan; only the all -inf case looks.
      C mnew = std::max(m[i], row_max(row, len));
      if (mnew == kNegInf) {
        if (!row_has_nan(row)) {  // nothing visible yet in this row
          std::fill(row, row + kBN, C(0));
          continue;
        }
        mnew = std::numeric_limits<C>::quiet_NaN();
      }
      const C alpha = cpu::exp_nonpos(m[i] - mnew);  // 0 when m was -inf
      const C sum = row_exp_sum(row, len, mnew);
      std::fill(row + len, row + kBN, C(0));
      l[i] = l[i] * alpha + sum;
      m[i] = mnew;
      if (alpha != C(1)) {
        C* arow = acc + i * dv;
#pragma omp simd
        for (int64_t c = 0; c < dv; ++c) arow[c] *= alpha;
      }
    }
    if (p.dropout_p > 0) apply_dropout(p, g, h, i0, mi, j0, sc, sc);
    // acc (mi, dv) += P (mi, nj) @ V (nj, dv)
    gemm_acc(mi, dv, nj, sc, kBN, 1, vb + j0 * p.v_stride[2], p.v_stride[2], acc, dv,
             Band::kKUpTo, v_finite ? delta : kNoBand);
  }
  C* ob = static_cast<C*>(p.out) + g.b * p.out_stride[0] + h * p.out_stride[1] +
          (g.q0 + i0) * p.out_stride[2];
  C* lse = static_cast<C*>(p.lse) + (g.b * hq + h) * p.seqlen_q + g.q0 + i0;
  for (int64_t i = 0; i < mi; ++i) {
    C* orow = ob + i * p.out_stride[2];
    const C* arow = acc + i * dv;
    if (l[i] != C(0)) {  // (nan too: a nan row stays nan, it must not look empty)
      const C inv = C(1) / l[i];
#pragma omp simd
      for (int64_t c = 0; c < dv; ++c) orow[c] = arow[c] * inv;
      lse[i] = m[i] + std::log(l[i]);
    } else {
      std::fill(orow, orow + dv, C(0));
      lse[i] = std::numeric_limits<C>::infinity();
    }
  }
}

// ------------------------------------------------------------------ backward
// With P = exp(S - lse), dropout keep mask Z (scaled by 1/(1-p)), O = (P*Z) V and dO:
//   dV   = (P*Z)^T dO
//   dP   = (dO V^T) * Z
//   dS   = P * (dP - delta),  delta_i = sum_c dO_ic O_ic  (= sum_j P_ij dP_ij)
//   d(q.k) = dS * scale * (1 - tanh^2(s / softcap))   (the last factor only with softcap)
//   dQ   = d(q.k) K,   dK = d(q.k)^T Q;  d mask = dS (the mask is added after the cap).
// Pass A: task (s, kv head, k-tile) accumulates dK, dV over the group's query heads and the
// visible q-tiles. Pass B: task (s, q head, q-tile) accumulates dQ over the visible k-tiles.
// Both recompute S; each task owns the rows it writes, so no atomics and no races. With enough
// (sequence, kv head) pairs to fill the threads, one fused pass does both (bwd_fused_task).

// Scores and probabilities of one (q-tile, k-tile) pair and dS, as above: on return w.s holds
// P*Z (the dropped probabilities, for dV) and w.dp holds d(q.k) / scale. band: the pair's
// causal band (kNoBand without a right window), skipped for the scores and their exp; ops_band:
// the same band when the q, dO, k and v rows the pair reads are finite, else kNoBand: dP and dS
// skip it then, and so may the caller's products (a masked dS is 0 * (dP - delta), nan when dP
// is, as in the oracle).
template <typename C>
LLMCORE_ALWAYS_INLINE inline void bwd_tile(const AttentionParams& p, const Seq& g, int64_t h,
                                           int64_t i0, int64_t mi, int64_t j0, int64_t nj,
                                           const C* lse, const C* delta, int64_t band,
                                           int64_t ops_band, Work<C>& w) {
  const int64_t d = p.head_dim, dv = p.head_dim_v;
  C* sc = w.s.data();
  C* dp = w.dp.data();
  tile_abt(w.qs.data(), w.kt.data(), mi, d, sc, band);
  finish_scores(p, g, h, i0, mi, j0, nj, sc, w.t.data());
  for (int64_t i = 0; i < mi; ++i) {
    const C li = lse[i];  // +inf on an empty row: P = 0 there
    C* row = sc + i * kBN;
    const int64_t len = band_row_len(i, band);
#pragma omp simd
    for (int64_t j = 0; j < len; ++j) row[j] = cpu::exp_nonpos(row[j] - li);
    std::fill(row + len, row + kBN, C(0));
  }
  tile_abt(w.dos.data(), w.vt.data(), mi, dv, dp, ops_band);  // dO V^T
  if (p.dropout_p > 0) {
    // dP * Z needs Z alone: drop a tile of ones, then scale both P and dP by it
    C* z = w.pd.data();
    std::fill(z, z + mi * kBN, C(1));
    apply_dropout(p, g, h, i0, mi, j0, z, z);
    for (int64_t i = 0; i < mi * kBN; ++i) dp[i] *= z[i];
    for (int64_t i = 0; i < mi; ++i) {
      const C di = delta[i];
#pragma omp simd
      for (int64_t j = 0; j < kBN; ++j) {
        const C pij = sc[i * kBN + j];
        dp[i * kBN + j] = pij * (dp[i * kBN + j] - di);
        sc[i * kBN + j] = pij * z[i * kBN + j];
      }
    }
  } else {
    for (int64_t i = 0; i < mi; ++i) {
      const C di = delta[i];
      const int64_t len = band_row_len(i, ops_band);
      C* dprow = dp + i * kBN;
      const C* prow = sc + i * kBN;
#pragma omp simd
      for (int64_t j = 0; j < len; ++j) dprow[j] = prow[j] * (dprow[j] - di);
      std::fill(dprow + len, dprow + kBN, C(0));
    }
  }
  if (p.dscores) {  // d loss / d (final score), for the mask's gradient (dense layouts only)
    C* ds = static_cast<C*>(p.dscores) + ((g.b * p.heads_q + h) * p.seqlen_q + i0) * p.seqlen_k;
    for (int64_t i = 0; i < mi; ++i)
      for (int64_t j = 0; j < nj; ++j) ds[i * p.seqlen_k + j0 + j] = dp[i * kBN + j];
  }
  if (p.softcap > 0) {
    const C* t = w.t.data();
    for (int64_t i = 0; i < mi * kBN; ++i) dp[i] *= C(1) - t[i] * t[i];
  }
}

template <typename C>
struct BwdRows {  // a q-tile's base pointers into q, dO, lse and delta
  const C* q;
  const C* dout;
  const C* lse;
  const C* delta;
};

template <typename C>
LLMCORE_ALWAYS_INLINE inline BwdRows<C> bwd_rows(const AttentionParams& p, const Seq& g, int64_t h,
                                                 int64_t i0, const C* delta_all) {
  const int64_t row = (g.b * p.heads_q + h) * p.seqlen_q + g.q0 + i0;
  return {static_cast<const C*>(p.q) + g.b * p.q_stride[0] + h * p.q_stride[1] +
              (g.q0 + i0) * p.q_stride[2],
          static_cast<const C*>(p.dout) + g.b * p.dout_stride[0] + h * p.dout_stride[1] +
              (g.q0 + i0) * p.dout_stride[2],
          static_cast<const C*>(p.lse) + row, delta_all + row};
}

// whether query head h's q and dO rows [r0, r1) of sequence g are finite
template <typename C>
LLMCORE_ALWAYS_INLINE inline bool q_rows_finite(const AttentionParams& p, const Seq& g, int64_t h,
                                                int64_t r0, int64_t r1) {
  const C* q = static_cast<const C*>(p.q) + g.b * p.q_stride[0] + h * p.q_stride[1] +
               g.q0 * p.q_stride[2];
  const C* dout = static_cast<const C*>(p.dout) + g.b * p.dout_stride[0] +
                  h * p.dout_stride[1] + g.q0 * p.dout_stride[2];
  return rows_finite(q, p.q_stride[2], r0, r1 - r0, p.head_dim) &&
         rows_finite(dout, p.dout_stride[2], r0, r1 - r0, p.head_dim_v);
}

// delta rows [r0, r1) of the flat (B * Hq * Nq) index: rowsum(dO * O)
template <typename C>
LLMCORE_ALWAYS_INLINE inline void delta_rows(const AttentionParams& p, int64_t r0, int64_t r1,
                                             C* delta) {
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t i = r % p.seqlen_q, h = (r / p.seqlen_q) % p.heads_q, b = r / p.seqlen_q / p.heads_q;
    const C* o = static_cast<const C*>(p.out) + b * p.out_stride[0] + h * p.out_stride[1] +
                 i * p.out_stride[2];
    const C* go = static_cast<const C*>(p.dout) + b * p.dout_stride[0] + h * p.dout_stride[1] +
                  i * p.dout_stride[2];
    constexpr int kL = cpu::kSumLanes;  // lane sums added pairwise, as row_exp_sum's
    C acc[kL] = {};
    int64_t c = 0;
    for (; c + kL <= p.head_dim_v; c += kL)
      for (int l = 0; l < kL; ++l) acc[l] += o[c + l] * go[c + l];
    C sum = cpu::sum_lanes(acc);
    for (; c < p.head_dim_v; ++c) sum += o[c] * go[c];
    delta[r] = sum;
  }
}

// Pass A: task (s, kv head, k-tile) -> dK, dV rows of that tile.
template <typename C>
LLMCORE_ALWAYS_INLINE inline void bwd_kv_task(const AttentionParams& p, int64_t task,
                                              const C* delta_all, Work<C>& w) {
  const int64_t hkv = p.heads_kv, d = p.head_dim, dv = p.head_dim_v;
  const int64_t group = p.heads_q / hkv;
  const int64_t tiles = k_tiles(p);
  const int64_t jt = task % tiles, hk = (task / tiles) % hkv, s = task / tiles / hkv;
  const Seq g = seq_of(p, s);
  const int64_t j0 = jt * kBN;
  if (j0 >= g.lk) return;
  const int64_t nj = std::min(kBN, g.lk - j0);
  const C* kb = static_cast<const C*>(p.k) + g.b * p.k_stride[0] + hk * p.k_stride[1] +
                g.k0 * p.k_stride[2];
  const C* vb = static_cast<const C*>(p.v) + g.b * p.v_stride[0] + hk * p.v_stride[1] +
                g.k0 * p.v_stride[2];
  load_cols(kb, p.k_stride[2], j0, nj, d, w.kt.data());
  load_cols(vb, p.v_stride[2], j0, nj, dv, w.vt.data());
  C* dk = w.acc.data();   // (nj, d)
  C* dvv = w.acc2.data(); // (nj, dv)
  std::fill(dk, dk + nj * d, C(0));
  std::fill(dvv, dvv + nj * dv, C(0));
  int64_t ib, ie;
  query_range(p, g, j0, nj, &ib, &ie);
  const bool banded = p.window_right >= 0;
  const bool kv_finite = banded && rows_finite(kb, p.k_stride[2], j0, nj, d) &&
                         rows_finite(vb, p.v_stride[2], j0, nj, dv);
  for (int64_t h = hk * group; h < (hk + 1) * group; ++h) {
    const bool finite = kv_finite && q_rows_finite<C>(p, g, h, ib, ie);
    for (int64_t i0 = ib; i0 < ie; i0 += kBM) {
      const int64_t mi = std::min(kBM, ie - i0);
      const BwdRows<C> r = bwd_rows(p, g, h, i0, delta_all);
      load_rows(r.q, p.q_stride[2], 0, mi, d, w.qs.data());
      load_rows(r.dout, p.dout_stride[2], 0, mi, dv, w.dos.data());
      const int64_t band = pair_band(p, g, i0, j0), ops_band = finite ? band : kNoBand;
      bwd_tile(p, g, h, i0, mi, j0, nj, r.lse, r.delta, band, ops_band, w);
      // dV (nj, dv) += (P*Z)^T @ dO;  dK (nj, d) += dS^T @ Q  (scale applied at the end)
      gemm_acc(nj, dv, mi, w.s.data(), 1, kBN, w.dos.data(), dv, dvv, dv, Band::kKFrom,
               ops_band);
      gemm_acc(nj, d, mi, w.dp.data(), 1, kBN, w.qs.data(), d, dk, d, Band::kKFrom, ops_band);
    }
  }
  store_rows(dk, nj, d, C(p.scale), grad_row<C>(p.dk, p.dk_stride, g.b, hk, g.k0 + j0),
             p.dk_stride[2]);
  store_rows(dvv, nj, dv, C(1), grad_row<C>(p.dv, p.dv_stride, g.b, hk, g.k0 + j0),
             p.dv_stride[2]);
}

// Pass B: task (s, q head, q-tile) -> dQ rows of that tile.
template <typename C>
LLMCORE_ALWAYS_INLINE inline void bwd_q_task(const AttentionParams& p, int64_t task,
                                             const C* delta_all, Work<C>& w) {
  const int64_t hq = p.heads_q, d = p.head_dim, dv = p.head_dim_v;
  const int64_t tiles = q_tiles(p);
  const int64_t it = task % tiles, h = (task / tiles) % hq, s = task / tiles / hq;
  const Seq g = seq_of(p, s);
  const int64_t i0 = it * kBM;
  if (i0 >= g.lq) return;
  const int64_t mi = std::min(kBM, g.lq - i0), hk = h / (hq / p.heads_kv);
  const C* kb = static_cast<const C*>(p.k) + g.b * p.k_stride[0] + hk * p.k_stride[1] +
                g.k0 * p.k_stride[2];
  const C* vb = static_cast<const C*>(p.v) + g.b * p.v_stride[0] + hk * p.v_stride[1] +
                g.k0 * p.v_stride[2];
  const BwdRows<C> r = bwd_rows(p, g, h, i0, delta_all);
  load_rows(r.q, p.q_stride[2], 0, mi, d, w.qs.data());
  load_rows(r.dout, p.dout_stride[2], 0, mi, dv, w.dos.data());
  C* dq = w.acc.data();  // (mi, d)
  std::fill(dq, dq + mi * d, C(0));
  int64_t jb, je;
  key_range(p, g, i0, mi, &jb, &je);
  const bool finite = p.window_right >= 0 && q_rows_finite<C>(p, g, h, i0, i0 + mi) &&
                      rows_finite(kb, p.k_stride[2], jb, je - jb, d) &&
                      rows_finite(vb, p.v_stride[2], jb, je - jb, dv);
  for (int64_t j0 = jb; j0 < je; j0 += kBN) {
    const int64_t nj = std::min(kBN, je - j0);
    load_cols(kb, p.k_stride[2], j0, nj, d, w.kt.data());
    load_cols(vb, p.v_stride[2], j0, nj, dv, w.vt.data());
    const int64_t band = pair_band(p, g, i0, j0), ops_band = finite ? band : kNoBand;
    bwd_tile(p, g, h, i0, mi, j0, nj, r.lse, r.delta, band, ops_band, w);
    // dQ (mi, d) += dS (mi, nj) @ K (nj, d)
    gemm_acc(mi, d, nj, w.dp.data(), kBN, 1, kb + j0 * p.k_stride[2], p.k_stride[2], dq, d,
             Band::kKUpTo, ops_band);
  }
  store_rows(dq, mi, d, C(p.scale), grad_row<C>(p.dq, p.dq_stride, g.b, h, g.q0 + i0),
             p.dq_stride[2]);
}

// Fused pass: task (s, kv head) -> dK, dV of all the sequence's keys and dQ of the group's
// query rows, from one recomputation of each (q-tile, k-tile) pair (5 tile products instead of
// pass A + pass B's 7). dQ accumulates in place in the output over the k-tiles in ascending
// order, the order pass B sums in, and dK, dV exactly as in pass A, so both schedules give the
// same bits; which one runs may depend on the thread count (bwd_impl).
template <typename C>
LLMCORE_ALWAYS_INLINE inline void bwd_fused_task(const AttentionParams& p, int64_t task,
                                                 C* delta_all, Work<C>& w) {
  const int64_t hq = p.heads_q, hkv = p.heads_kv, d = p.head_dim, dv = p.head_dim_v;
  const int64_t group = hq / hkv;
  const int64_t hk = task % hkv, s = task / hkv;
  const Seq g = seq_of(p, s);
  const C* kb = static_cast<const C*>(p.k) + g.b * p.k_stride[0] + hk * p.k_stride[1] +
                g.k0 * p.k_stride[2];
  const C* vb = static_cast<const C*>(p.v) + g.b * p.v_stride[0] + hk * p.v_stride[1] +
                g.k0 * p.v_stride[2];
  const int64_t rs = p.dq_stride[2];  // dQ row stride: accumulated in place in the output
  auto dq_rows = [&](int64_t h) { return grad_row<C>(p.dq, p.dq_stride, g.b, h, g.q0); };
  for (int64_t h = hk * group; h < (hk + 1) * group; ++h) {
    C* dqh = dq_rows(h);
    for (int64_t i = 0; i < g.lq; ++i) std::fill(dqh + i * rs, dqh + i * rs + d, C(0));
    // delta of the rows this task reads (the two-pass schedule computes it up front)
    const int64_t row0 = (g.b * hq + h) * p.seqlen_q + g.q0;
    delta_rows(p, row0, row0 + g.lq, delta_all);
  }
  const C scale = C(p.scale);
  C* dk = w.acc.data();   // (nj, d)
  C* dvv = w.acc2.data(); // (nj, dv)
  // which heads' pairs may skip the band in dP, dS and the three products (bwd_tile)
  const bool kv_finite = p.window_right >= 0 && rows_finite(kb, p.k_stride[2], 0, g.lk, d) &&
                         rows_finite(vb, p.v_stride[2], 0, g.lk, dv);
  std::vector<uint8_t> finite(size_t(group), 0);
  for (int64_t h = hk * group; h < (hk + 1) * group; ++h)
    finite[h - hk * group] = kv_finite && q_rows_finite<C>(p, g, h, 0, g.lq);
  for (int64_t j0 = 0; j0 < g.lk; j0 += kBN) {
    const int64_t nj = std::min(kBN, g.lk - j0);
    load_cols(kb, p.k_stride[2], j0, nj, d, w.kt.data());
    load_cols(vb, p.v_stride[2], j0, nj, dv, w.vt.data());
    std::fill(dk, dk + nj * d, C(0));
    std::fill(dvv, dvv + nj * dv, C(0));
    int64_t ib, ie;
    query_range(p, g, j0, nj, &ib, &ie);
    for (int64_t h = hk * group; h < (hk + 1) * group; ++h) {
      C* dqh = dq_rows(h);
      for (int64_t i0 = ib; i0 < ie; i0 += kBM) {
        const int64_t mi = std::min(kBM, ie - i0);
        const BwdRows<C> r = bwd_rows(p, g, h, i0, delta_all);
        load_rows(r.q, p.q_stride[2], 0, mi, d, w.qs.data());
        load_rows(r.dout, p.dout_stride[2], 0, mi, dv, w.dos.data());
        const int64_t band = pair_band(p, g, i0, j0);
        const int64_t ops_band = finite[h - hk * group] ? band : kNoBand;
        bwd_tile(p, g, h, i0, mi, j0, nj, r.lse, r.delta, band, ops_band, w);
        // dV += (P*Z)^T @ dO;  dK += dS^T @ Q;  dQ (mi, d) += dS (mi, nj) @ K (nj, d)
        gemm_acc(nj, dv, mi, w.s.data(), 1, kBN, w.dos.data(), dv, dvv, dv, Band::kKFrom,
                 ops_band);
        gemm_acc(nj, d, mi, w.dp.data(), 1, kBN, w.qs.data(), d, dk, d, Band::kKFrom,
                 ops_band);
        gemm_acc(mi, d, nj, w.dp.data(), kBN, 1, kb + j0 * p.k_stride[2], p.k_stride[2],
                 dqh + i0 * rs, rs, Band::kKUpTo, ops_band);
      }
    }
    store_rows(dk, nj, d, scale, grad_row<C>(p.dk, p.dk_stride, g.b, hk, g.k0 + j0),
               p.dk_stride[2]);
    store_rows(dvv, nj, dv, C(1), grad_row<C>(p.dv, p.dv_stride, g.b, hk, g.k0 + j0),
               p.dv_stride[2]);
  }
  for (int64_t h = hk * group; h < (hk + 1) * group; ++h) {
    C* dqh = dq_rows(h);
    for (int64_t i = 0; i < g.lq; ++i) {
      C* row = dqh + i * rs;
#pragma omp simd
      for (int64_t c = 0; c < d; ++c) row[c] *= scale;
    }
  }
}

// One function per element type and task kind, compiled for several x86 ISA levels.
#define LLMCORE_ATTN_TASKS(suffix, C)                                                          \
  LLMCORE_CPU_CLONES void fwd_task_##suffix(const AttentionParams& p, int64_t task,            \
                                            bool cache_kt, Work<C>& w) {                       \
    fwd_task<C>(p, task, cache_kt, w);                                                         \
  }                                                                                            \
  LLMCORE_CPU_CLONES void delta_##suffix(const AttentionParams& p, int64_t r0, int64_t r1,     \
                                         C* delta) {                                           \
    delta_rows<C>(p, r0, r1, delta);                                                           \
  }                                                                                            \
  LLMCORE_CPU_CLONES void bwd_kv_task_##suffix(const AttentionParams& p, int64_t task,         \
                                               const C* delta, Work<C>& w) {                   \
    bwd_kv_task<C>(p, task, delta, w);                                                         \
  }                                                                                            \
  LLMCORE_CPU_CLONES void bwd_q_task_##suffix(const AttentionParams& p, int64_t task,          \
                                              const C* delta, Work<C>& w) {                    \
    bwd_q_task<C>(p, task, delta, w);                                                          \
  }                                                                                            \
  LLMCORE_CPU_CLONES void bwd_fused_task_##suffix(const AttentionParams& p, int64_t task,      \
                                                  C* delta, Work<C>& w) {                      \
    bwd_fused_task<C>(p, task, delta, w);                                                      \
  }
LLMCORE_ATTN_TASKS(f32, float)
LLMCORE_ATTN_TASKS(f64, double)
#undef LLMCORE_ATTN_TASKS

inline void fwd_task_any(const AttentionParams& p, int64_t task, bool cache_kt,
                         Work<float>& w) {
  fwd_task_f32(p, task, cache_kt, w);
}
inline void fwd_task_any(const AttentionParams& p, int64_t task, bool cache_kt,
                         Work<double>& w) {
  fwd_task_f64(p, task, cache_kt, w);
}
inline void delta_any(const AttentionParams& p, int64_t r0, int64_t r1, float* d) {
  delta_f32(p, r0, r1, d);
}
inline void delta_any(const AttentionParams& p, int64_t r0, int64_t r1, double* d) {
  delta_f64(p, r0, r1, d);
}
inline void bwd_kv_any(const AttentionParams& p, int64_t t, const float* d, Work<float>& w) {
  bwd_kv_task_f32(p, t, d, w);
}
inline void bwd_kv_any(const AttentionParams& p, int64_t t, const double* d, Work<double>& w) {
  bwd_kv_task_f64(p, t, d, w);
}
inline void bwd_q_any(const AttentionParams& p, int64_t t, const float* d, Work<float>& w) {
  bwd_q_task_f32(p, t, d, w);
}
inline void bwd_q_any(const AttentionParams& p, int64_t t, const double* d, Work<double>& w) {
  bwd_q_task_f64(p, t, d, w);
}

inline void bwd_fused_any(const AttentionParams& p, int64_t t, float* d, Work<float>& w) {
  bwd_fused_task_f32(p, t, d, w);
}
inline void bwd_fused_any(const AttentionParams& p, int64_t t, double* d, Work<double>& w) {
  bwd_fused_task_f64(p, t, d, w);
}

int64_t num_seqs(const AttentionParams& p) { return p.cu_seqlens_q ? p.num_seqs : p.batch; }

int team(const AttentionParams& p, int64_t tasks) {
  const int64_t work = p.batch * p.heads_q * std::max<int64_t>(p.seqlen_q, 1) *
                       std::max<int64_t>(p.seqlen_k, 1);
  return cpu::team_size(tasks, work / std::max<int64_t>(tasks, 1) + 1, p.num_threads);
}

template <typename C>
void fwd_impl(const AttentionParams& p) {
  const int64_t tasks = num_seqs(p) * p.heads_q * q_tiles(p);
  const int nt = team(p, tasks);
  // cache transposed key tiles when more than one q-tile reads each (not under a left window:
  // its key ranges start off the tile grid)
  const bool cache_kt = q_tiles(p) * (p.heads_q / p.heads_kv) > 1 && p.window_left < 0;
  cpu::run_team(nt, [&] {
    Work<C> w(p.head_dim, p.head_dim_v);
    if (cache_kt) {
      w.kt_cache.resize(size_t(k_tiles(p)) * p.head_dim * kBN);
      w.kt_have.assign(size_t(k_tiles(p)), 0);
    }
#pragma omp for schedule(dynamic, 1)
    for (int64_t t = 0; t < tasks; ++t) fwd_task_any(p, t, cache_kt, w);
  });
}

template <typename C>
void bwd_impl(const AttentionParams& p) {
  const int64_t rows = p.batch * p.heads_q * p.seqlen_q;
  std::vector<C> delta(rows);
  const int64_t q_tasks = num_seqs(p) * p.heads_q * q_tiles(p);
  const int64_t kv_tasks = num_seqs(p) * p.heads_kv * k_tiles(p);
  const int64_t fused_tasks = num_seqs(p) * p.heads_kv;
  const int nt = team(p, q_tasks + kv_tasks);
  // The fused pass does 5/7 of the two passes' work but has only (sequence, kv head) tasks:
  // run it when they keep every thread busy (varlen tasks differ in size: ask for more).
  const bool fused = fused_tasks >= (p.cu_seqlens_q ? 4 : 2) * nt;
  cpu::run_team(nt, [&] {
    if (!fused) {  // the fused tasks compute the delta rows they read themselves
      int64_t r0, r1;
      cpu::chunk(rows, cpu::team_threads(), cpu::thread_id(), &r0, &r1);
      delta_any(p, r0, r1, delta.data());
#pragma omp barrier
    }
    Work<C> w(p.head_dim, p.head_dim_v);
    if (fused) {
#pragma omp for schedule(dynamic, 1)
      for (int64_t t = 0; t < fused_tasks; ++t) bwd_fused_any(p, t, delta.data(), w);
    } else {
#pragma omp for schedule(dynamic, 1) nowait
      for (int64_t t = 0; t < kv_tasks; ++t) bwd_kv_any(p, t, delta.data(), w);
#pragma omp for schedule(dynamic, 1)
      for (int64_t t = 0; t < q_tasks; ++t) bwd_q_any(p, t, delta.data(), w);
    }
  });
}

}  // namespace

bool attention_dropout_keep(uint64_t seed, int64_t b, int64_t h, int64_t heads_q, int64_t i,
                            int64_t j, double p) {
  const uint64_t key = row_key(seed, b, h, heads_q, i);
  return col_bits(uint32_t(key), uint32_t(key >> 32), uint32_t(j)) >= drop_threshold(p);
}

void attention_fwd_cpu(const AttentionParams& p) {
  if (p.dtype == DType::kFloat64) fwd_impl<double>(p);
  else fwd_impl<float>(p);
}

void attention_bwd_cpu(const AttentionParams& p) {
  if (p.dtype == DType::kFloat64) bwd_impl<double>(p);
  else bwd_impl<float>(p);
}

}  // namespace llmcore
