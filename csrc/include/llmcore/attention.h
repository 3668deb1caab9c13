// Flash-style attention on the CPU (FlashAttention-2's schedule): query tiles against streamed
// key tiles with an online softmax, O(N) extra memory (the per-row logsumexp), backward by
// recomputation. Plain pointers, sizes and element strides; no torch types.
//
// Layouts: q (B, Hq, Nq, D), k (B, Hkv, Nk, D), v (B, Hkv, Nk, Dv), any strides for the first
// three dims and a contiguous last dim. Query head h reads kv head h / (Hq / Hkv) (GQA).
// Varlen (cu_seqlens_q != null): B == 1 and sequence s holds rows cu_q[s]..cu_q[s+1] of q and
// cu_k[s]..cu_k[s+1] of k and v; it attends only to itself.
//
// Scores, per (query i, key j) with positions local to the sequence and o the alignment
// offset (o = Lk - Lq when bottom_right, else 0), r = j - (i + o):
//   s = scale * q_i . k_j
//   s = softcap * tanh(s / softcap)                  (softcap > 0)
//   s = s - alibi[b or seq, h] * |r|                 (alibi != null)
//   s = s + mask[b, h, i, j]                         (mask != null; bool masks arrive as 0/-inf)
//   s = -inf unless (left < 0 or r >= -left) and (right < 0 or r <= right)
// Forward: lse_i = log sum_j exp(s_ij) (+inf for a row with no finite score),
//   out_i = sum_j exp(s_ij - lse_i) * keep_ij / (1 - p) * v_j  (0 for a row with no key).
// keep_ij is a counter-based hash of (seed, b, h, i, j): no state, the same in both passes.
#pragma once

#include <cstdint>

#include "llmcore/dtype.h"

namespace llmcore {

struct AttentionParams {
  DType dtype = DType::kFloat32;   // element type of every tensor below but lse: fp32 or fp64
  int64_t batch = 0, heads_q = 0, heads_kv = 0, seqlen_q = 0, seqlen_k = 0;
  int64_t head_dim = 0, head_dim_v = 0;
  const void* q = nullptr;         // strides in elements: batch, head, row (last dim is 1)
  const void* k = nullptr;
  const void* v = nullptr;
  int64_t q_stride[3] = {0, 0, 0}, k_stride[3] = {0, 0, 0}, v_stride[3] = {0, 0, 0};
  void* out = nullptr;             // (B, Hq, Nq, Dv), strides out_stride
  int64_t out_stride[3] = {0, 0, 0};
  void* lse = nullptr;             // (B, Hq, Nq) contiguous, compute type (fp64 for fp64)

  double scale = 1.0, softcap = 0.0;
  int64_t window_left = -1, window_right = -1;  // -1: unbounded
  bool bottom_right = false;
  const void* mask = nullptr;      // additive, broadcast by stride 0 over (B, Hq, Nq, Nk), or null
  int64_t mask_stride[4] = {0, 0, 0, 0};
  const void* alibi = nullptr;     // (B or S, Hq) contiguous slopes, or null
  const int64_t* cu_seqlens_q = nullptr;  // (S + 1,) offsets, or null (dense)
  const int64_t* cu_seqlens_k = nullptr;
  int64_t num_seqs = 0;            // S (varlen only)
  int64_t max_len_q = 0, max_len_k = 0;  // varlen: the longest sequences (size the task grid)
  double dropout_p = 0.0;
  uint64_t seed = 0;

  // backward only
  const void* dout = nullptr;      // gradient of out, strides dout_stride
  int64_t dout_stride[3] = {0, 0, 0};
  void* dq = nullptr;              // (B, Hq, Nq, D), strides dq_stride (last dim is 1)
  void* dk = nullptr;              // (B, Hkv, Nk, D), strides dk_stride
  void* dv = nullptr;              // (B, Hkv, Nk, Dv), strides dv_stride
  int64_t dq_stride[3] = {0, 0, 0}, dk_stride[3] = {0, 0, 0}, dv_stride[3] = {0, 0, 0};
  // The backward writes every element of dq, dk and dv (varlen: cu_seqlens_q / _k must end at
  // seqlen_q / seqlen_k, so the sequences cover every row).
  void* dscores = nullptr;         // contiguous (B, Hq, Nq, Nk): d loss / d s (for the mask), or null

  int num_threads = 1;             // OpenMP threads (torch.get_num_threads())
};

void attention_fwd_cpu(const AttentionParams& p);
void attention_bwd_cpu(const AttentionParams& p);

// The dropout keep decision of the kernels for (seed, batch-or-sequence b, query head h, local
// query row i, local key j): true keeps the probability (scaled by 1 / (1 - p)).
bool attention_dropout_keep(uint64_t seed, int64_t b, int64_t h, int64_t heads_q, int64_t i,
                            int64_t j, double p);

}  // namespace llmcore
