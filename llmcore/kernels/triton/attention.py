"""Fused attention in Triton: FlashAttention-2 forward and backward.

Algorithm (Dao, "FlashAttention-2", 2023): a program owns a tile of BLOCK_M queries of one
(batch, head) and streams BLOCK_N-key tiles of K and V past it, keeping the running row maximum
m, the running normaliser l and an fp32 output accumulator (the online softmax). The N x N score
matrix never exists in memory. Scores are kept in base 2: log2(e) is folded into the scale so
the kernel uses exp2. The forward saves lse = log(sum_j exp(s_ij)) (natural log, fp32) per row.

Backward recomputes the probabilities tile by tile from lse:
    p_ij  = exp(s_ij - lse_i)                       softmax, recomputed
    dv_j  = sum_i p~_ij do_i                        p~ = p * keep / (1 - dropout_p)
    dp_ij = (do_i . v_j) * keep_ij / (1 - dropout_p)
    ds_ij = p_ij (dp_ij - delta_i),  delta_i = sum_d do_id o_id   (= sum_j p_ij dp_ij)
    dq_i  = scale sum_j ds'_ij k_j,  dk_j = scale sum_i ds'_ij q_i
where ds' = ds * (1 - tanh^2(scale q.k / softcap)) with softcap (d/dx c tanh(x/c) = 1 - tanh^2),
else ds' = ds. A preprocess kernel computes delta; one kernel owns a key tile and loops over the
query tiles (and over every query head of its GQA group), another owns a query tile and loops
over key tiles: dq, dk and dv are each written once, deterministically, without atomics. With
deterministic=False the key-tile kernel also adds each tile's dq share atomically into an fp32
buffer (FlashAttention-2's backward: 5 tile products, not 7, the order of the sums varying).
The "ordered" backward schedule (BWD_SCHEDULE) is that one pass made deterministic: the key
tiles add into each query tile's dq rows one after another in a fixed order, taking turns on a
counter per query tile.
An additive attn_mask that needs a gradient gets d mask_ij = ds_ij, written by the dq kernel.

Visibility of key j to query i (indices local to the sequence), all optional:
    j <= i + diag + window_right      (causal is window_right = 0)
    j >= i + diag - window_left
    mask[b, h, i, j]                  (bool: True = attend; or additive, added to the score)
with diag = 0 (top-left alignment, torch's SDPA) or Lk - Lq (bottom-right, flash-attn). Tiles
outside the visible band are skipped by the loop bounds, not just masked. Scores are, in order:
s = scale q.k; s = softcap tanh(s / softcap); s -= slope_h |i + diag - j| (ALiBi); s += mask.
A row that sees no key returns 0 with lse = +inf (flash-attn's convention: exp(s - lse) = 0
there in backward, with no special case), and a zero gradient.

Dropout draws keep_ij = rand(seed, offset(b, h, i, j)) >= p with Triton's counter-based Philox,
so backward regenerates the same mask from the seed instead of storing it.

Layouts: q/k/v/o are (B, H, N, D) views addressed through their strides (index * stride in
int64, as offsets may pass 2**31 elements), so flash-attn's
(B, N, H, D) arrives as a transposed view and runs without a copy. The tile loops compute a
tile's element offsets once per program and add one scalar per tile (its first row times the
row stride); their loads are masked only in boundary tiles (rows past the sequence) and on
the columns of a head dim padded up to its block (PAD_D, PAD_DV); packed varlen sequences are a
(1, H, total, D) view plus cu_seqlens offsets (the batch axis of the grid walks the sequences).
K/V heads are shared by GROUP = Hq // Hkv query heads. v may have its own head dim Dv.
"""
from __future__ import annotations

import json
import os

import torch
import triton
import triton.language as tl

from llmcore.kernels.triton._host import cdiv, next_power_of_2
from llmcore.kernels.triton._interp import INTERPRET as _INTERPRET
from llmcore.kernels.triton._interp import to_dtype as _to

LOG2E = 1.4426950408889634  # log2(e)
MAX_HEAD_DIM = 256


# ------------------------------------------------------------------------------ jit helpers

# Two gaps of the Triton interpreter (CPU tests) around bfloat16, which it stores as raw uint16
# bits: its dot multiplies those bits as integers, and its fp32 -> bf16 cast truncates. Under
# the interpreter, _dot upcasts bf16 operands to fp32 first (what the GPU computes: bf16 x bf16
# products are exact in fp32, accumulation is fp32 either way) and _to (kernels/triton/_interp)
# rounds to nearest even by hand (the GPU's cast). Compiled kernels never take these branches.
_INTERPRETED = tl.constexpr(_INTERPRET)


@triton.jit
def _dot(a, b, acc, DOT_PREC: tl.constexpr):
    # acc + a @ b in fp32 (acc None: a @ b)
    if _INTERPRETED and a.dtype == tl.bfloat16:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=DOT_PREC)


@triton.jit
def _offs(i, stride_i, j, stride_j):
    # i * stride_i + j * stride_j for a tile of row indices i and column indices j, in int64:
    # an int32 index times an int32 stride wraps once the offset passes 2**31 elements
    return i.to(tl.int64) * stride_i + j.to(tl.int64) * stride_j


@triton.jit
def _start(i, stride):
    # i * stride in int64 for a scalar index i (a tile loop's index: int32 when compiled, a
    # Python int under the interpreter)
    return (tl.zeros((), tl.int64) + i) * stride


@triton.jit
def _ptrs(base, i, stride_i, j, stride_j):
    return base + _offs(i, stride_i, j, stride_j)


@triton.jit
def _load_tile(ptrs, rows_ok, cols_ok, CHECK_ROWS: tl.constexpr, CHECK_COLS: tl.constexpr):
    # A tile load masked only where it can be out of range: rows past the sequence (boundary
    # tiles only: interior tiles lie inside it) and columns past the head dim (only when it is
    # padded up to the block). An unmasked load is a plain vector copy: no predicates and no
    # mask arithmetic in the tile loops. Zeros fill what the mask hides.
    if CHECK_ROWS and CHECK_COLS:
        x = tl.load(ptrs, mask=rows_ok & cols_ok, other=0.0)
    elif CHECK_ROWS:
        x = tl.load(ptrs, mask=rows_ok, other=0.0)
    elif CHECK_COLS:
        x = tl.load(ptrs, mask=cols_ok, other=0.0)
    else:
        x = tl.load(ptrs)
    return x


@triton.jit
def _tanh(x):
    # tanh(x) = 1 - 2 / (exp(2x) + 1): exact limits at +-inf (exp2 -> inf or 0), never NaN.
    return 1.0 - 2.0 / (tl.exp2(x * 2.8853900817779268) + 1.0)


@triton.jit
def _dropout_keep(seed, dropout_p, rng_base, i, j, rng_nk):
    # One Philox counter per (batch, head, i, j): rng_base = (b * H + h) * Nq * Nk, int64.
    offsets = rng_base + i.to(tl.int64) * rng_nk + j
    return tl.rand(seed, offsets) >= dropout_p


@triton.jit
def _scores(qk, i, j, Lq, Lk, diag, mask_base, smm, smn, slope2, qk_scale2, cap_scale, softcap2,
            window_left, window_right,
            HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, MASK_KIND: tl.constexpr,
            HAS_WL: tl.constexpr, HAS_WR: tl.constexpr, BOUNDARY: tl.constexpr):
    """Scores of one tile in base-2 units, -inf where key j is hidden from query i.

    qk: raw q.k (fp32); i, j: query / key indices broadcast to the tile's orientation, so the
    same helper serves (BLOCK_M, BLOCK_N) and transposed (BLOCK_N, BLOCK_M) tiles. BOUNDARY:
    the tile may hold keys past the sequence or outside the causal / window band, so those are
    masked; interior tiles skip that work. Also returns t = tanh(scale q.k / softcap) for the
    softcap derivative (qk itself when there is none)."""
    if HAS_SOFTCAP:
        t = _tanh(qk * cap_scale)  # cap_scale = scale / softcap
        s = t * softcap2  # softcap2 = softcap * log2(e)
    else:
        t = qk
        s = qk * qk_scale2  # qk_scale2 = scale * log2(e)
    if HAS_ALIBI:
        s = s - slope2 * tl.abs(i + diag - j).to(tl.float32)  # slope2 = slope * log2(e)
    if BOUNDARY:
        # query i sees keys j <= hi_i (and j >= its left window bound): the bounds are per
        # query, a row or a column of the tile, so a score costs one compare (two with a left
        # window), not four compares and three ands. A query past the sequence sees none.
        hi = tl.where(i < Lq, Lk - 1, -1)
        if HAS_WR:
            hi = tl.minimum(hi, i + diag + window_right)
        valid = j <= hi
        if HAS_WL:
            valid = valid & (j >= i + diag - window_left)
    if MASK_KIND != 0:
        m = tl.load(mask_base + i.to(tl.int64) * smm + j.to(tl.int64) * smn,
                    mask=(i < Lq) & (j < Lk), other=0)
        if MASK_KIND == 1:  # bool: True = attend
            if BOUNDARY:
                valid = valid & (m != 0)
            else:
                valid = m != 0
        else:  # additive, natural-log units
            s = s + m.to(tl.float32) * 1.4426950408889634
    if BOUNDARY or MASK_KIND == 1:
        s = tl.where(valid, s, float("-inf"))
    return s, t


@triton.jit
def _interior(lo, hi, full_lo, full_hi, L, BLOCK: tl.constexpr, HAS_LO: tl.constexpr,
              HAS_HI: tl.constexpr):
    """Split the tiles [lo, hi) (lo a multiple of BLOCK) into boundary | interior | boundary:
    returns (a, e) with interior tiles [a, e) those inside [full_lo, min(full_hi, L)), the
    indices every row of the other side's tile may use (HAS_LO / HAS_HI: that bound exists)."""
    inner_lo = 0
    inner_hi = L
    if HAS_LO:
        inner_lo = tl.maximum(full_lo, 0)
    if HAS_HI:
        inner_hi = tl.maximum(tl.minimum(inner_hi, full_hi), 0)
    a = tl.minimum(tl.maximum(lo, (inner_lo + BLOCK - 1) // BLOCK * BLOCK), hi)
    e = tl.maximum(a, tl.minimum(hi, inner_hi // BLOCK * BLOCK))
    return a, e


@triton.jit
def _seq_bounds(CU_Q, CU_K, b, N_Q, N_K, IS_VARLEN: tl.constexpr):
    """(start of the sequence in the packed q / k rows, its q length, its k length)."""
    if IS_VARLEN:
        q_start = tl.load(CU_Q + b).to(tl.int64)
        k_start = tl.load(CU_K + b).to(tl.int64)
        Lq = (tl.load(CU_Q + b + 1) - tl.load(CU_Q + b)).to(tl.int32)
        Lk = (tl.load(CU_K + b + 1) - tl.load(CU_K + b)).to(tl.int32)
    else:
        q_start = tl.zeros((), tl.int64)
        k_start = tl.zeros((), tl.int64)
        Lq = tl.zeros((), tl.int32) + N_Q
        Lk = tl.zeros((), tl.int32) + N_K
    return q_start, k_start, Lq, Lk


# ------------------------------------------------------------------------------ forward

@triton.jit
def _fwd_tile(start_n, q, m_i, l_i, acc, k_base, v_base, k_tile, v_tile, d_ok, dv_ok, mask_base,
              seed, rng_base, offs_m, Lq, Lk, diag, skn, svn, smm, smn, N_K, slope2, qk_scale2,
              cap_scale, softcap2, window_left, window_right, dropout_p,
              BLOCK_N: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr,
              MASK_KIND: tl.constexpr, HAS_WL: tl.constexpr, HAS_WR: tl.constexpr,
              HAS_DROPOUT: tl.constexpr, DOT_PREC: tl.constexpr, PAD_D: tl.constexpr,
              PAD_DV: tl.constexpr, BOUNDARY: tl.constexpr):
    # one key tile of the online softmax: (m_i, l_i, acc) -> updated. k_tile / v_tile: the
    # tile's element offsets from its first key (computed once per program), so a tile costs
    # one scalar offset, start_n * stride, not a 64-bit multiply per element
    offs_n = start_n + tl.arange(0, BLOCK_N)
    n_ok = offs_n < Lk
    kT = _load_tile(k_base + _start(start_n, skn) + k_tile, n_ok[None, :], d_ok[:, None],
                    BOUNDARY, PAD_D)  # (D, BLOCK_N)
    qk = _dot(q, kT, None, DOT_PREC)  # (BLOCK_M, BLOCK_N) fp32
    if not BOUNDARY and not HAS_SOFTCAP and not HAS_ALIBI and MASK_KIND == 0:
        # plain interior tile, s = c qk with c = qk_scale2 >= 0 (attention_fwd makes it so):
        # the max is taken on the raw qk, max_j s = c max_j qk, and exp2(c qk - m) is one fma
        # per score, where a scaled copy of qk costs a multiply per score. Every row sees every
        # key here, so m is finite.
        m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale2)
        p = tl.exp2(qk * qk_scale2 - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
    else:
        s, t = _scores(qk, offs_m[:, None], offs_n[None, :], Lq, Lk, diag, mask_base, smm,
                       smn, slope2, qk_scale2, cap_scale, softcap2, window_left, window_right,
                       HAS_SOFTCAP, HAS_ALIBI, MASK_KIND, HAS_WL, HAS_WR, BOUNDARY)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # a row that has seen no key yet keeps m = -inf: shift by 0 so exp2 gives 0, not NaN
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    if HAS_DROPOUT:
        keep = _dropout_keep(seed, dropout_p, rng_base, offs_m[:, None], offs_n[None, :], N_K)
        p = tl.where(keep, p, 0.0)
    v = _load_tile(v_base + _start(start_n, svn) + v_tile, n_ok[:, None], dv_ok[None, :],
                   BOUNDARY, PAD_DV)  # (BLOCK_N, Dv)
    acc = _dot(_to(p, v.dtype), v, acc, DOT_PREC)
    return m_new, l_i, acc


@triton.jit
def _attn_fwd_kernel(
    Q, K, V, O, LSE, MASK, SLOPES, CU_Q, CU_K, SEED,
    sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sob, soh, som, sod,
    slb, slh, slm, smb, smh, smm, smn, ssb, ssh,
    H, GROUP, N_Q, N_K, HEAD_DIM, HEAD_DIM_V,
    qk_scale2, cap_scale, softcap2, window_left, window_right, align, dropout_p, drop_scale,
    SEQ_BUCKET,  # autotune key only: next power of two of the longest query sequence, capped
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    IS_VARLEN: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr,
    MASK_KIND: tl.constexpr, HAS_WL: tl.constexpr, HAS_WR: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, DOT_PREC: tl.constexpr, PAD_D: tl.constexpr,
    PAD_DV: tl.constexpr,
):
    # grid: (cdiv(N_Q, BLOCK_M), H, B); one program = BLOCK_M query rows of one (batch, head).
    # Query tiles run last-first: under a causal mask the last tiles see the most keys, and
    # starting them first keeps every SM busy to the end of the grid instead of leaving a tail
    # of long tiles (the order the hardware launches programs in is program_id(0) fastest).
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
    h = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    q_start, k_start, Lq, Lk = _seq_bounds(CU_Q, CU_K, b, N_Q, N_K, IS_VARLEN)
    m0 = pid_m * BLOCK_M
    if m0 >= Lq:  # varlen: this sequence is shorter than the longest one
        return
    kvh = h // GROUP
    diag = align * (Lk - Lq)

    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    q_base = Q + b * sqb + h * sqh + q_start * sqm
    k_base = K + b * skb + kvh * skh + k_start * skn
    v_base = V + b * svb + kvh * svh + k_start * svn
    mask_base = MASK + b * smb + h * smh
    q = tl.load(_ptrs(q_base, offs_m[:, None], sqm, offs_d[None, :], sqd),
                mask=(offs_m[:, None] < Lq) & (offs_d[None, :] < HEAD_DIM),
                other=0.0)  # (BLOCK_M, BLOCK_D)

    slope2 = 0.0
    if HAS_ALIBI:
        slope2 = tl.load(SLOPES + b * ssb + h * ssh).to(tl.float32) * 1.4426950408889634
    seed = 0
    rng_base = 0
    if HAS_DROPOUT:
        seed = tl.load(SEED)
        rng_base = (b * H + h) * N_Q * N_K

    # key tiles this query tile can see: [lo, hi), skipping tiles outside the causal / window
    # band; of those, [a, e) are seen whole by every row (no positional masking there)
    lo = 0
    hi = Lk
    if HAS_WR:
        hi = tl.minimum(hi, m0 + BLOCK_M + diag + window_right)
    if HAS_WL:
        lo = tl.maximum(0, m0 + diag - window_left)
        lo = (lo // BLOCK_N) * BLOCK_N
    a, e = _interior(lo, hi, m0 + BLOCK_M - 1 + diag - window_left,
                     m0 + diag + window_right + 1, Lk, BLOCK_N, HAS_WL, HAS_WR)

    offs_t = tl.arange(0, BLOCK_N)  # a key tile's rows, from its first
    k_tile = _offs(offs_t[None, :], skn, offs_d[:, None], skd)  # (D, BLOCK_N): K^T
    v_tile = _offs(offs_t[:, None], svn, offs_dv[None, :], svd)  # (BLOCK_N, Dv)
    d_ok = offs_d < HEAD_DIM
    dv_ok = offs_dv < HEAD_DIM_V
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)  # running max, base 2
    l_i = tl.zeros((BLOCK_M,), tl.float32)  # running sum of exp2(s - m_i)
    acc = tl.zeros((BLOCK_M, BLOCK_DV), tl.float32)
    for start_n in range(lo, a, BLOCK_N):
        m_i, l_i, acc = _fwd_tile(
            start_n, q, m_i, l_i, acc, k_base, v_base, k_tile, v_tile, d_ok, dv_ok, mask_base,
            seed, rng_base, offs_m, Lq, Lk, diag, skn, svn, smm, smn, N_K, slope2, qk_scale2,
            cap_scale, softcap2, window_left, window_right, dropout_p, BLOCK_N, HAS_SOFTCAP,
            HAS_ALIBI, MASK_KIND, HAS_WL, HAS_WR, HAS_DROPOUT, DOT_PREC, PAD_D, PAD_DV,
            True)
    for start_n in range(a, e, BLOCK_N):
        m_i, l_i, acc = _fwd_tile(
            start_n, q, m_i, l_i, acc, k_base, v_base, k_tile, v_tile, d_ok, dv_ok, mask_base,
            seed, rng_base, offs_m, Lq, Lk, diag, skn, svn, smm, smn, N_K, slope2, qk_scale2,
            cap_scale, softcap2, window_left, window_right, dropout_p, BLOCK_N, HAS_SOFTCAP,
            HAS_ALIBI, MASK_KIND, HAS_WL, HAS_WR, HAS_DROPOUT, DOT_PREC, PAD_D, PAD_DV,
            False)
    for start_n in range(e, hi, BLOCK_N):
        m_i, l_i, acc = _fwd_tile(
            start_n, q, m_i, l_i, acc, k_base, v_base, k_tile, v_tile, d_ok, dv_ok, mask_base,
            seed, rng_base, offs_m, Lq, Lk, diag, skn, svn, smm, smn, N_K, slope2, qk_scale2,
            cap_scale, softcap2, window_left, window_right, dropout_p, BLOCK_N, HAS_SOFTCAP,
            HAS_ALIBI, MASK_KIND, HAS_WL, HAS_WR, HAS_DROPOUT, DOT_PREC, PAD_D, PAD_DV,
            True)

    # o = acc / l (x 1/(1-p) with dropout); rows that saw no key (l = 0 exactly): o = 0,
    # lse = +inf. `!= 0`, not `> 0`: a row whose scores hold a nan has l = nan, and must come
    # out nan (out and lse), not pass for an empty row that backward would then skip
    seen = l_i != 0.0
    l_safe = tl.where(seen, l_i, 1.0)
    out = acc * (drop_scale / l_safe)[:, None]
    lse = tl.where(seen, (m_i + tl.log2(l_safe)) * 0.6931471805599453, float("inf"))
    m_ok = offs_m < Lq
    o_base = O + b * sob + h * soh + q_start * som
    tl.store(_ptrs(o_base, offs_m[:, None], som, offs_dv[None, :], sod),
             _to(out, O.dtype.element_ty),
             mask=m_ok[:, None] & (offs_dv[None, :] < HEAD_DIM_V))
    tl.store(LSE + b * slb + h * slh + (q_start + offs_m) * slm, lse, mask=m_ok)


# ------------------------------------------------------------------------------ backward

@triton.jit
def _attn_bwd_delta_kernel(
    O, DO, DELTA, CU_Q,
    sob, soh, som, sod, sdb, sdh, sdm, sdd, slb, slh, slm,
    N_Q, HEAD_DIM_V,
    BLOCK_M: tl.constexpr, BLOCK_DV: tl.constexpr, IS_VARLEN: tl.constexpr,
):
    # delta_i = sum_d do_id * o_id (fp32); grid (cdiv(N_Q, BLOCK_M), H, B)
    pid_m = tl.program_id(0)
    h = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    q_start, _k_start, Lq, _Lk = _seq_bounds(CU_Q, CU_Q, b, N_Q, N_Q, IS_VARLEN)
    m0 = pid_m * BLOCK_M
    if m0 >= Lq:
        return
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_DV)
    ok = (offs_m[:, None] < Lq) & (offs_d[None, :] < HEAD_DIM_V)
    o = tl.load(_ptrs(O + b * sob + h * soh + q_start * som, offs_m[:, None], som,
                      offs_d[None, :], sod), mask=ok, other=0.0).to(tl.float32)
    do = tl.load(_ptrs(DO + b * sdb + h * sdh + q_start * sdm, offs_m[:, None], sdm,
                       offs_d[None, :], sdd), mask=ok, other=0.0).to(tl.float32)
    tl.store(DELTA + b * slb + h * slh + (q_start + offs_m) * slm, tl.sum(o * do, 1),
             mask=offs_m < Lq)


@triton.jit
def _dq_tile(start_n, q, do, lse2, delta, dq, k_base, v_base, k_tile, v_tile, d_ok, dv_ok,
             mask_base, dmask_base, seed, rng_base, offs_m, Lq, Lk, diag, skn, svn, smm, smn,
             N_K, slope2, qk_scale2, cap_scale, softcap2, window_left, window_right, dropout_p,
             drop_scale,
             BLOCK_N: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr,
             MASK_KIND: tl.constexpr, HAS_WL: tl.constexpr, HAS_WR: tl.constexpr,
             HAS_DROPOUT: tl.constexpr, DOT_PREC: tl.constexpr, MASK_GRAD: tl.constexpr,
             PAD_D: tl.constexpr, PAD_DV: tl.constexpr, BOUNDARY: tl.constexpr):
    # one key tile of dq += ds' k (and of d mask = ds); k_tile / v_tile as in _fwd_tile
    offs_n = start_n + tl.arange(0, BLOCK_N)
    n_ok = offs_n[None, :] < Lk
    kT = _load_tile(k_base + _start(start_n, skn) + k_tile, n_ok, d_ok[:, None], BOUNDARY,
                    PAD_D)  # (BLOCK_D, BLOCK_N)
    vT = _load_tile(v_base + _start(start_n, svn) + v_tile, n_ok, dv_ok[:, None], BOUNDARY,
                    PAD_DV)  # (BLOCK_DV, BLOCK_N)
    qk = _dot(q, kT, None, DOT_PREC)  # (BLOCK_M, BLOCK_N)
    s, t = _scores(qk, offs_m[:, None], offs_n[None, :], Lq, Lk, diag, mask_base, smm, smn,
                   slope2, qk_scale2, cap_scale, softcap2, window_left, window_right,
                   HAS_SOFTCAP, HAS_ALIBI, MASK_KIND, HAS_WL, HAS_WR, BOUNDARY)
    p = tl.exp2(s - lse2[:, None])
    dp = _dot(do, vT, None, DOT_PREC)  # (BLOCK_M, BLOCK_N)
    if HAS_DROPOUT:
        keep = _dropout_keep(seed, dropout_p, rng_base, offs_m[:, None], offs_n[None, :], N_K)
        dp = tl.where(keep, dp * drop_scale, 0.0)
    ds = p * (dp - delta[:, None])
    if MASK_GRAD:
        tl.store(dmask_base + offs_m[:, None].to(tl.int64) * N_K + offs_n[None, :], ds,
                 mask=(offs_m[:, None] < Lq) & n_ok)
    if HAS_SOFTCAP:
        ds = ds * (1.0 - t * t)
    return _dot(_to(ds, kT.dtype), tl.trans(kT), dq, DOT_PREC)


@triton.jit
def _attn_bwd_dq_kernel(
    Q, K, V, DO, DQ, DMASK, LSE, DELTA, MASK, SLOPES, CU_Q, CU_K, SEED,
    sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sdob, sdoh, sdom, sdod,
    sdqb, sdqh, sdqm, sdqd, slb, slh, slm, smb, smh, smm, smn, ssb, ssh,
    H, GROUP, N_Q, N_K, HEAD_DIM, HEAD_DIM_V,
    sm_scale, qk_scale2, cap_scale, softcap2, window_left, window_right, align, dropout_p,
    drop_scale, SEQ_BUCKET,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    IS_VARLEN: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr,
    MASK_KIND: tl.constexpr, HAS_WL: tl.constexpr, HAS_WR: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, DOT_PREC: tl.constexpr, MASK_GRAD: tl.constexpr,
    PAD_D: tl.constexpr, PAD_DV: tl.constexpr,
):
    # dq_i = scale * sum_j ds'_ij k_j; grid (cdiv(N_Q, BLOCK_M), H, B), loop over key tiles.
    # MASK_GRAD: an additive mask enters as s += mask, so d mask_ij = ds_ij: written to DMASK,
    # fp32 (B, H, N_Q, N_K) contiguous (each (i, j) is visited once: deterministic).
    # Query tiles last-first, as in the forward: the longest causal tiles start first.
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
    h = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    q_start, k_start, Lq, Lk = _seq_bounds(CU_Q, CU_K, b, N_Q, N_K, IS_VARLEN)
    m0 = pid_m * BLOCK_M
    if m0 >= Lq:
        return
    kvh = h // GROUP
    diag = align * (Lk - Lq)

    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    m_ok = offs_m < Lq
    q_ok = m_ok[:, None] & (offs_d[None, :] < HEAD_DIM)
    q = tl.load(_ptrs(Q + b * sqb + h * sqh + q_start * sqm, offs_m[:, None], sqm,
                      offs_d[None, :], sqd), mask=q_ok, other=0.0)  # (BLOCK_M, BLOCK_D)
    do = tl.load(_ptrs(DO + b * sdob + h * sdoh + q_start * sdom, offs_m[:, None], sdom,
                       offs_dv[None, :], sdod),
                 mask=m_ok[:, None] & (offs_dv[None, :] < HEAD_DIM_V),
                 other=0.0)  # (BLOCK_M, BLOCK_DV)
    # lse in base 2; +inf on rows that saw no key, where every s = -inf, so p = 0 there
    lse2 = tl.load(LSE + b * slb + h * slh + (q_start + offs_m) * slm, mask=m_ok,
                   other=0.0) * 1.4426950408889634
    delta = tl.load(DELTA + b * slb + h * slh + (q_start + offs_m) * slm, mask=m_ok, other=0.0)
    k_base = K + b * skb + kvh * skh + k_start * skn
    v_base = V + b * svb + kvh * svh + k_start * svn
    mask_base = MASK + b * smb + h * smh
    dmask_base = DMASK + (b * H + h) * N_Q * N_K

    slope2 = 0.0
    if HAS_ALIBI:
        slope2 = tl.load(SLOPES + b * ssb + h * ssh).to(tl.float32) * 1.4426950408889634
    seed = 0
    rng_base = 0
    if HAS_DROPOUT:
        seed = tl.load(SEED)
        rng_base = (b * H + h) * N_Q * N_K

    # the forward's key tiles: boundary [lo, a), interior [a, e), boundary [e, hi)
    lo = 0
    hi = Lk
    if HAS_WR:
        hi = tl.minimum(hi, m0 + BLOCK_M + diag + window_right)
    if HAS_WL:
        lo = tl.maximum(0, m0 + diag - window_left)
        lo = (lo // BLOCK_N) * BLOCK_N
    a, e = _interior(lo, hi, m0 + BLOCK_M - 1 + diag - window_left,
                     m0 + diag + window_right + 1, Lk, BLOCK_N, HAS_WL, HAS_WR)

    offs_t = tl.arange(0, BLOCK_N)  # a key tile's rows, from its first
    k_tile = _offs(offs_t[None, :], skn, offs_d[:, None], skd)  # (D, BLOCK_N): K^T
    v_tile = _offs(offs_t[None, :], svn, offs_dv[:, None], svd)  # (Dv, BLOCK_N): V^T
    d_ok = offs_d < HEAD_DIM
    dv_ok = offs_dv < HEAD_DIM_V
    dq = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    for start_n in range(lo, a, BLOCK_N):
        dq = _dq_tile(start_n, q, do, lse2, delta, dq, k_base, v_base, k_tile, v_tile, d_ok,
                      dv_ok, mask_base, dmask_base, seed, rng_base, offs_m, Lq, Lk, diag, skn,
                      svn, smm, smn, N_K, slope2, qk_scale2, cap_scale, softcap2, window_left,
                      window_right, dropout_p, drop_scale, BLOCK_N, HAS_SOFTCAP, HAS_ALIBI,
                      MASK_KIND, HAS_WL, HAS_WR, HAS_DROPOUT, DOT_PREC, MASK_GRAD, PAD_D,
                      PAD_DV, True)
    for start_n in range(a, e, BLOCK_N):
        dq = _dq_tile(start_n, q, do, lse2, delta, dq, k_base, v_base, k_tile, v_tile, d_ok,
                      dv_ok, mask_base, dmask_base, seed, rng_base, offs_m, Lq, Lk, diag, skn,
                      svn, smm, smn, N_K, slope2, qk_scale2, cap_scale, softcap2, window_left,
                      window_right, dropout_p, drop_scale, BLOCK_N, HAS_SOFTCAP, HAS_ALIBI,
                      MASK_KIND, HAS_WL, HAS_WR, HAS_DROPOUT, DOT_PREC, MASK_GRAD, PAD_D,
                      PAD_DV, False)
    for start_n in range(e, hi, BLOCK_N):
        dq = _dq_tile(start_n, q, do, lse2, delta, dq, k_base, v_base, k_tile, v_tile, d_ok,
                      dv_ok, mask_base, dmask_base, seed, rng_base, offs_m, Lq, Lk, diag, skn,
                      svn, smm, smn, N_K, slope2, qk_scale2, cap_scale, softcap2, window_left,
                      window_right, dropout_p, drop_scale, BLOCK_N, HAS_SOFTCAP, HAS_ALIBI,
                      MASK_KIND, HAS_WL, HAS_WR, HAS_DROPOUT, DOT_PREC, MASK_GRAD, PAD_D,
                      PAD_DV, True)
    dq = dq * sm_scale
    tl.store(_ptrs(DQ + b * sdqb + h * sdqh + q_start * sdqm, offs_m[:, None], sdqm,
                   offs_d[None, :], sdqd), _to(dq, DQ.dtype.element_ty), mask=q_ok)


@triton.jit
def _dkdv_tile(start_m, k, v, dk, dv, q_base, do_base, dq_base, LSE, DELTA, l_base, q_tile,
               do_tile, l_tile, d_ok, dv_ok, mask_base, seed, rng_base, offs_n, offs_d, Lq, Lk,
               diag, sqm, sdom, sdqm, sdqd, slm, smm, smn, N_K, sm_scale, slope2, qk_scale2,
               cap_scale, softcap2, window_left, window_right, dropout_p, drop_scale,
               BLOCK_M: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr,
               MASK_KIND: tl.constexpr, HAS_WL: tl.constexpr, HAS_WR: tl.constexpr,
               HAS_DROPOUT: tl.constexpr, DOT_PREC: tl.constexpr, ATOMIC_DQ: tl.constexpr,
               PAD_D: tl.constexpr, PAD_DV: tl.constexpr, BOUNDARY: tl.constexpr,
               status, lock_base, n0, BLOCK_N: tl.constexpr, ORDERED_DQ: tl.constexpr,
               SPIN_LIMIT: tl.constexpr):
    # one query tile of dv += p~^T do and dk += ds'^T q, in transposed (keys x queries) tiles;
    # ATOMIC_DQ: also dq += scale ds' k for this tile, added atomically into fp32 (the order of
    # the additions varies from run to run: not deterministic), or with ORDERED_DQ in a fixed
    # order (see "the ordered dq" at _attn_bwd_dkdv_kernel). q_tile / do_tile / l_tile: the
    # tile's element offsets from its first query, computed once per program (as in _fwd_tile).
    # Query rows past Lq (boundary tiles only) load q = do = lse = delta = 0, so they add
    # exactly 0 even unmasked.
    offs_m = start_m + tl.arange(0, BLOCK_M)
    m_ok = offs_m < Lq
    qT = _load_tile(q_base + _start(start_m, sqm) + q_tile, m_ok[None, :], d_ok[:, None],
                    BOUNDARY, PAD_D)  # (D, BLOCK_M)
    do = _load_tile(do_base + _start(start_m, sdom) + do_tile, m_ok[:, None], dv_ok[None, :],
                    BOUNDARY, PAD_DV)  # (BLOCK_M, Dv)
    l_offs = l_base + _start(start_m, slm) + l_tile
    lse2 = _load_tile(LSE + l_offs, m_ok, m_ok, BOUNDARY, False) * 1.4426950408889634
    delta = _load_tile(DELTA + l_offs, m_ok, m_ok, BOUNDARY, False)
    qkT = _dot(k, qT, None, DOT_PREC)  # (BLOCK_N, BLOCK_M)
    sT, tT = _scores(qkT, offs_m[None, :], offs_n[:, None], Lq, Lk, diag, mask_base, smm, smn,
                     slope2, qk_scale2, cap_scale, softcap2, window_left, window_right,
                     HAS_SOFTCAP, HAS_ALIBI, MASK_KIND, HAS_WL, HAS_WR, BOUNDARY)
    pT = tl.exp2(sT - lse2[None, :])
    dpT = _dot(v, tl.trans(do), None, DOT_PREC)  # (BLOCK_N, BLOCK_M)
    if HAS_DROPOUT:
        keepT = _dropout_keep(seed, dropout_p, rng_base, offs_m[None, :], offs_n[:, None], N_K)
        pdT = tl.where(keepT, pT * drop_scale, 0.0)
        dpT = tl.where(keepT, dpT * drop_scale, 0.0)
    else:
        pdT = pT
    dv = _dot(_to(pdT, do.dtype), do, dv, DOT_PREC)
    dsT = pT * (dpT - delta[None, :])
    if HAS_SOFTCAP:
        dsT = dsT * (1.0 - tT * tT)
    dsT = _to(dsT, qT.dtype)
    dk = _dot(dsT, tl.trans(qT), dk, DOT_PREC)
    if ATOMIC_DQ:
        dq_ptrs = _ptrs(dq_base, offs_m[:, None], sdqm, offs_d[None, :], sdqd)
        if ORDERED_DQ:
            # this key tile's turn at the query tile: the key tiles that add into it are
            # [J0, J1] (contiguous), and they add in descending order, J1 first: rank J1 - j.
            # The wait comes before the dq product, which then holds no registers across it.
            lock = lock_base + start_m // BLOCK_M
            last = Lk  # J1 = (last - 1) // BLOCK_N: past the query tile's last visible key
            if HAS_WR:
                last = tl.minimum(start_m + BLOCK_M + diag + window_right, Lk)
            rank = (last - 1) // BLOCK_N - n0 // BLOCK_N
            spins = 0
            seen = tl.atomic_add(lock, 0, sem="acquire")
            while (seen != rank) & (spins < SPIN_LIMIT):
                spins += 1
                seen = tl.atomic_add(lock, 0, sem="acquire")
                if spins % 1024 == 0:
                    if tl.atomic_add(status, 0, sem="relaxed") != 0:
                        spins = SPIN_LIMIT  # a wait gave up already: no more waiting
            if seen != rank:  # out of turn (a bug, or a wait past SPIN_LIMIT): say so
                tl.atomic_or(status, 1)
        dq = _dot(tl.trans(dsT), k, None, DOT_PREC) * sm_scale  # (BLOCK_M, BLOCK_D)
        tl.atomic_add(dq_ptrs, dq, mask=m_ok[:, None] & d_ok[None, :], sem="relaxed")
        if ORDERED_DQ:
            tl.debug_barrier()  # every thread's adds issued before the turn passes on
            tl.atomic_add(lock, 1, sem="release")
    return dk, dv


@triton.jit
def _attn_bwd_dkdv_kernel(
    Q, K, V, DO, DK, DV, DQ, LSE, DELTA, MASK, SLOPES, CU_Q, CU_K, SEED,
    sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sdob, sdoh, sdom, sdod,
    sdkb, sdkh, sdkn, sdkd, sdvb, sdvh, sdvn, sdvd, sdqb, sdqh, sdqm, sdqd,
    slb, slh, slm, smb, smh, smm, smn, ssb, ssh,
    H, GROUP, N_Q, N_K, HEAD_DIM, HEAD_DIM_V,
    sm_scale, qk_scale2, cap_scale, softcap2, window_left, window_right, align, dropout_p,
    drop_scale, SEQ_BUCKET, LOCK, LOCK_TILES,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    IS_VARLEN: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr,
    MASK_KIND: tl.constexpr, HAS_WL: tl.constexpr, HAS_WR: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, DOT_PREC: tl.constexpr, ATOMIC_DQ: tl.constexpr,
    PAD_D: tl.constexpr, PAD_DV: tl.constexpr, ORDERED_DQ: tl.constexpr,
    SPIN_LIMIT: tl.constexpr,
):
    # dv_j = sum_i p~_ij do_i, dk_j = scale * sum_i ds'_ij q_i, summed over the GROUP query
    # heads that share kv head `kvh`. grid (cdiv(N_K, BLOCK_N), Hkv, B). Tiles are transposed
    # (keys along rows): sT = k q^T is (BLOCK_N, BLOCK_M). ATOMIC_DQ (deterministic=False):
    # dq too, FlashAttention-2's way: each tile's share added atomically into DQ (fp32, zeroed),
    # so the backward is this one pass (5 tile products instead of 7 with the dq kernel).
    #
    # The ordered dq (ATOMIC_DQ and ORDERED_DQ): the same pass, deterministic. Every (sequence,
    # query head, query tile) has a counter in LOCK (int32, zeroed; LOCK[0] a status word,
    # LOCK[1] the tickets, then LOCK_TILES counters per head) of the key tiles that have added
    # into its dq rows. Key tile j adds only when the counter equals its rank, the number of key
    # tiles after it that also see the query tile, then passes the turn on: the adds into any dq
    # row come in one fixed order (descending key tiles), so the fp32 sums are the same bits on
    # every run. A program takes its work from a ticket (LOCK[1], one atomic add as it starts),
    # in descending key tiles: it waits only on programs that took their tickets before it, so
    # are running or done, whatever order the GPU starts programs in (no deadlock). Under causal
    # masking key tile j reaches query tile i one tile after key tile j + 1 did, so in a steady
    # state nobody waits; without it every key tile starts at query tile 0, and the first adds
    # there come one after another, after which the key tiles run staggered by one add each. A
    # wait that outlasts SPIN_LIMIT polls gives up, adds out of turn and sets LOCK[0] (the tests
    # read it; it stays 0 unless the rank arithmetic is wrong).
    pid_n = tl.program_id(0)
    kvh = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    if ORDERED_DQ:
        n_tiles = tl.num_programs(0)
        ticket = tl.atomic_add(LOCK + 1, 1, sem="relaxed")
        pid_n = n_tiles - 1 - ticket % n_tiles
        kvh = ((ticket // n_tiles) % tl.num_programs(1)).to(tl.int64)
        b = (ticket // (n_tiles * tl.num_programs(1))).to(tl.int64)
    q_start, k_start, Lq, Lk = _seq_bounds(CU_Q, CU_K, b, N_Q, N_K, IS_VARLEN)
    n0 = pid_n * BLOCK_N
    if n0 >= Lk:
        return
    diag = align * (Lk - Lq)

    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    n_ok = offs_n[:, None] < Lk
    k_ok = n_ok & (offs_d[None, :] < HEAD_DIM)
    v_ok = n_ok & (offs_dv[None, :] < HEAD_DIM_V)
    k = tl.load(_ptrs(K + b * skb + kvh * skh + k_start * skn, offs_n[:, None], skn,
                      offs_d[None, :], skd), mask=k_ok, other=0.0)  # (BLOCK_N, BLOCK_D)
    v = tl.load(_ptrs(V + b * svb + kvh * svh + k_start * svn, offs_n[:, None], svn,
                      offs_dv[None, :], svd), mask=v_ok, other=0.0)  # (BLOCK_N, BLOCK_DV)

    # query tiles that see this key tile: i >= j - diag - right, i <= j - diag + left, so
    # [lo, hi); of those, [a, e) see all of it (no positional masking there)
    lo = 0
    hi = Lq
    if HAS_WR:
        lo = tl.maximum(0, n0 - diag - window_right)
        lo = (lo // BLOCK_M) * BLOCK_M
    if HAS_WL:
        hi = tl.minimum(hi, n0 + BLOCK_N - diag + window_left)
    a, e = _interior(lo, hi, n0 + BLOCK_N - 1 - diag - window_right,
                     n0 - diag + window_left + 1, Lq, BLOCK_M, HAS_WR, HAS_WL)

    seed = 0
    if HAS_DROPOUT:
        seed = tl.load(SEED)
    offs_t = tl.arange(0, BLOCK_M)  # a query tile's rows, from its first
    q_tile = _offs(offs_t[None, :], sqm, offs_d[:, None], sqd)  # (D, BLOCK_M): Q^T
    do_tile = _offs(offs_t[:, None], sdom, offs_dv[None, :], sdod)  # (BLOCK_M, Dv)
    l_tile = offs_t.to(tl.int64) * slm
    d_ok = offs_d < HEAD_DIM
    dv_ok = offs_dv < HEAD_DIM_V
    dk = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_DV), tl.float32)
    for g in range(0, GROUP):  # the query heads of this kv head, in a fixed order
        h = kvh * GROUP + g
        q_base = Q + b * sqb + h * sqh + q_start * sqm
        do_base = DO + b * sdob + h * sdoh + q_start * sdom
        dq_base = DQ + b * sdqb + h * sdqh + q_start * sdqm
        lock_base = LOCK + 2 + (b * H + h) * LOCK_TILES
        l_base = b * slb + h * slh + q_start * slm
        mask_base = MASK + b * smb + h * smh
        slope2 = 0.0
        if HAS_ALIBI:
            slope2 = tl.load(SLOPES + b * ssb + h * ssh).to(tl.float32) * 1.4426950408889634
        rng_base = 0
        if HAS_DROPOUT:
            rng_base = (b * H + h) * N_Q * N_K
        for start_m in range(lo, a, BLOCK_M):
            dk, dv = _dkdv_tile(
                start_m, k, v, dk, dv, q_base, do_base, dq_base, LSE, DELTA, l_base, q_tile,
                do_tile, l_tile, d_ok, dv_ok, mask_base, seed, rng_base, offs_n, offs_d, Lq, Lk,
                diag, sqm, sdom, sdqm, sdqd, slm, smm, smn, N_K, sm_scale, slope2, qk_scale2,
                cap_scale, softcap2, window_left, window_right, dropout_p, drop_scale, BLOCK_M,
                HAS_SOFTCAP, HAS_ALIBI, MASK_KIND, HAS_WL, HAS_WR, HAS_DROPOUT, DOT_PREC,
                ATOMIC_DQ, PAD_D, PAD_DV, True, LOCK, lock_base, n0, BLOCK_N, ORDERED_DQ,
                SPIN_LIMIT)
        for start_m in range(a, e, BLOCK_M):
            dk, dv = _dkdv_tile(
                start_m, k, v, dk, dv, q_base, do_base, dq_base, LSE, DELTA, l_base, q_tile,
                do_tile, l_tile, d_ok, dv_ok, mask_base, seed, rng_base, offs_n, offs_d, Lq, Lk,
                diag, sqm, sdom, sdqm, sdqd, slm, smm, smn, N_K, sm_scale, slope2, qk_scale2,
                cap_scale, softcap2, window_left, window_right, dropout_p, drop_scale, BLOCK_M,
                HAS_SOFTCAP, HAS_ALIBI, MASK_KIND, HAS_WL, HAS_WR, HAS_DROPOUT, DOT_PREC,
                ATOMIC_DQ, PAD_D, PAD_DV, False, LOCK, lock_base, n0, BLOCK_N, ORDERED_DQ,
                SPIN_LIMIT)
        for start_m in range(e, hi, BLOCK_M):
            dk, dv = _dkdv_tile(
                start_m, k, v, dk, dv, q_base, do_base, dq_base, LSE, DELTA, l_base, q_tile,
                do_tile, l_tile, d_ok, dv_ok, mask_base, seed, rng_base, offs_n, offs_d, Lq, Lk,
                diag, sqm, sdom, sdqm, sdqd, slm, smm, smn, N_K, sm_scale, slope2, qk_scale2,
                cap_scale, softcap2, window_left, window_right, dropout_p, drop_scale, BLOCK_M,
                HAS_SOFTCAP, HAS_ALIBI, MASK_KIND, HAS_WL, HAS_WR, HAS_DROPOUT, DOT_PREC,
                ATOMIC_DQ, PAD_D, PAD_DV, True, LOCK, lock_base, n0, BLOCK_N, ORDERED_DQ,
                SPIN_LIMIT)
    dk = dk * sm_scale
    tl.store(_ptrs(DK + b * sdkb + kvh * sdkh + k_start * sdkn, offs_n[:, None], sdkn,
                   offs_d[None, :], sdkd), _to(dk, DK.dtype.element_ty), mask=k_ok)
    tl.store(_ptrs(DV + b * sdvb + kvh * sdvh + k_start * sdvn, offs_n[:, None], sdvn,
                   offs_dv[None, :], sdvd), _to(dv, DV.dtype.element_ty), mask=v_ok)


@triton.jit
def _dropout_mask_kernel(KEEP, SEED, dropout_p, N_Q, N_K,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # The keep mask the attention kernels draw, written out as int8 (B, H, N_Q, N_K): debugging
    # and tests only. grid (cdiv(N_Q, BLOCK_M), cdiv(N_K, BLOCK_N), B * H)
    bh = tl.program_id(2).to(tl.int64)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    seed = tl.load(SEED)
    keep = _dropout_keep(seed, dropout_p, bh * N_Q * N_K, offs_m[:, None], offs_n[None, :], N_K)
    ptrs = KEEP + bh * N_Q * N_K + offs_m[:, None].to(tl.int64) * N_K + offs_n[None, :]
    tl.store(ptrs, keep.to(tl.int8), mask=(offs_m[:, None] < N_Q) & (offs_n[None, :] < N_K))


# ------------------------------------------------------------------------------ launch configs
# Under the interpreter one small config keeps CPU tests fast (BLOCK_M != BLOCK_N on purpose, so
# the tile-skipping bounds are exercised with unequal tiles). On CUDA: a short list of
# candidates per kernel and head-dim class, autotuned per (head-dim block, causal/window, dtype,
# sequence bucket).
# NOT YET TIMED ON A GPU: the lists below were checked by compiling for sm_90 (no spills, they
# fit), not by measuring; the first GPU check's tuning log says which to keep.

_INTERPRET_CONFIG = {"BLOCK_M": 32, "BLOCK_N": 16}
# + every tensor's dtype (added by triton). BLOCK_DV too: the pruner picks the head-dim class
# from max(BLOCK_D, BLOCK_DV), so a config tuned for Dv = 64 must not be reused for Dv = 256
# GROUP: a dK/dV program loops over its GQA group's query heads, which costs registers (a
# candidate that fits MHA may spill with GQA), so each group size is tuned on its own
_AUTOTUNE_KEY = ["BLOCK_D", "BLOCK_DV", "HAS_WR", "SEQ_BUCKET", "GROUP"]

# head-dim class (padded D up to 64, 128, 256) -> [(BLOCK_M, BLOCK_N, num_warps, num_stages)].
# BLOCK_M counts queries and BLOCK_N keys in every kernel: the forward and dQ programs own BLOCK_M
# queries and loop over BLOCK_N-key tiles, the dK/dV programs own BLOCK_N keys and loop over
# BLOCK_M-query tiles. Each kernel has its own list: what fits one does not fit the other.
# Chosen 2026-11-30 without a GPU, from an sm_90 compile of every kernel over a sweep of tile
# shapes, warps and stages (python -m llmcore.kernels.triton.aot): under Triton 3.6, the H200
# machine's, every entry compiles without register spills and fits an SM's shared memory at
# D = 64 / 128 / 256, causal MHA (under 3.9, one D = 64 dK/dV entry spills 8 bytes). The lists
# they replace had spilling entries, among them every dK/dV candidate at D = 128 that the first
# H200 run (2026-11-29) tuned from (24-296 bytes per thread), and 128x64 / 4-warp forward
# tiles. Kept: 8 warps (two warpgroups for
# wgmma) in most entries, a long outer tile with a short inner loop in the backward (the
# Triton tutorial's Hopper shapes: 32 x 128 for dK/dV, 128 x 32 for dQ), and an entry with
# 16 resident warps per SM. Out at D = 128 then: 128x128 forward tiles (255 registers a thread,
# spilling under Triton 3.9; back since, below). Re-checked after the tile loops' loads lost
# their per-element address arithmetic and masks (2026-11-30, evening):
# - the D = 128 dK/dV 32 x 128 tile, at the register limit, spilled with 2 stages under 3.9
#   (causal: 56 bytes) and not with 3, so it comes first with 3 stages, and with 2 as a 5th
#   entry (no spill under 3.6 in the causal case, and a loop 12% shorter);
# - the D = 128 forward takes a 128 x 128 tile again (5th entry): 255 registers without a
#   spill under 3.6, 8.3 loop instructions per score and thread against 11.0 for 128 x 64;
# - aot.TOLERATED_SPILLS lists what those two spill under 3.9 (16 and 64 bytes);
# - still spilling under 3.6, outside the causal MHA cases: the dK/dV 32 x 128 tile at D = 128
#   without a mask (16 bytes), with GQA 32/8 (112, as before) and with dropout (88, as before);
#   with dropout the 64-key forward and dQ tiles (8-48 bytes); the 128 x 128 forward with
#   dropout (88) or an additive mask (24); the 2-stage 32 x 128 dK/dV with varlen (40).
# Which is fastest is unmeasured: LLMCORE_TUNING_LOG records the autotuner's timings of every
# candidate on the GPU check.
_FWD_TABLE = {64: [(128, 64, 4, 3), (128, 64, 8, 2), (64, 64, 4, 3), (128, 128, 8, 3)],
              128: [(128, 64, 8, 3), (128, 64, 8, 2), (64, 64, 8, 2), (128, 32, 8, 3),
                    (128, 128, 8, 2)],
              256: [(64, 32, 8, 2), (64, 64, 8, 2), (128, 32, 8, 2), (32, 32, 8, 2)]}
_DQ_TABLE = {64: [(64, 64, 8, 2), (128, 32, 8, 2), (64, 32, 8, 2), (128, 64, 8, 2)],
             128: [(128, 32, 8, 2), (64, 64, 8, 2), (64, 32, 8, 2), (128, 64, 8, 2)],
             256: [(32, 32, 8, 2), (64, 16, 8, 2), (16, 64, 8, 2), (32, 64, 8, 2)]}
# also the deterministic=False kernel's, which holds a dQ tile more. GQA and dropout cost the
# dK/dV kernel registers too: with them, under 3.6, the first D = 128 entry spills (and should
# lose the tuning there)
_DKDV_TABLE = {64: [(64, 64, 8, 2), (32, 128, 8, 2), (64, 32, 8, 2), (32, 64, 8, 1)],
               128: [(32, 128, 8, 3), (16, 128, 8, 2), (64, 32, 8, 1), (32, 32, 8, 2),
                     (32, 128, 8, 2)],
               256: [(32, 32, 8, 2), (16, 32, 8, 2), (32, 16, 8, 1), (64, 32, 8, 1)]}
# the ordered dq's: the turn-taking holds a few registers more, and under 3.6 the D = 128
# 32 x 128 tiles then spill (80-96 bytes, MHA and GQA 32/8), so they are out there; the rest
# compile without a spill under 3.6 at D = 64 and 128, GQA 32/8 included (2026-12-01)
_DKDV_ORDERED_TABLE = {**_DKDV_TABLE, 128: [(16, 128, 8, 2), (64, 32, 8, 1), (32, 32, 8, 2)]}


def _configs(table):
    flat = sorted({entry for entries in table.values() for entry in entries})
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
            for bm, bn, w, s in flat]


def _pruner(table):
    def prune(configs, named_args, **kwargs):
        """Keep the head-dim class's entries, minus query tiles longer than the sequence (the
        shortest one when none is that short)."""
        d = max(kwargs["BLOCK_D"], kwargs["BLOCK_DV"])
        wanted = table[64 if d <= 64 else 128 if d <= 128 else 256]
        def key(c):
            return (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages)
        mine = sorted((c for c in configs if key(c) in wanted), key=lambda c: wanted.index(key(c)))
        fits = [c for c in mine if c.kwargs["BLOCK_M"] <= max(named_args["SEQ_BUCKET"], 16)]
        return fits or [min(mine, key=lambda c: c.kwargs["BLOCK_M"])]
    return prune


def _autotuned(kernel, table, **kwargs):
    return triton.autotune(_configs(table), key=_AUTOTUNE_KEY,
                           prune_configs_by={"early_config_prune": _pruner(table)},
                           **kwargs)(kernel)


if _INTERPRET:
    _fwd_kernel, _dq_kernel, _dkdv_kernel = (_attn_fwd_kernel, _attn_bwd_dq_kernel,
                                             _attn_bwd_dkdv_kernel)
    _dkdv_atomic_kernel = _dkdv_ordered_kernel = _attn_bwd_dkdv_kernel
else:
    _fwd_kernel = _autotuned(_attn_fwd_kernel, _FWD_TABLE)
    _dq_kernel = _autotuned(_attn_bwd_dq_kernel, _DQ_TABLE)
    _dkdv_kernel = _autotuned(_attn_bwd_dkdv_kernel, _DKDV_TABLE)
    # its own tuning cache, and the dq accumulator zeroed before each timed try (the tries add
    # into it) and again before the real run
    _dkdv_atomic_kernel = _autotuned(_attn_bwd_dkdv_kernel, _DKDV_TABLE, reset_to_zero=["DQ"])
    # the ordered dq: its turn counters zeroed with the accumulator before each try
    _dkdv_ordered_kernel = _autotuned(_attn_bwd_dkdv_kernel, _DKDV_ORDERED_TABLE,
                                      reset_to_zero=["DQ", "LOCK"])


# The deterministic backward's schedule (attention_bwd) when no mask gradient is asked for:
# "two_pass" (the dK/dV kernel, then the dq kernel: 7 tile products per tile
# pair, no atomics) or "ordered" (one pass, dq added atomically in a fixed order: 5 products,
# FlashAttention-2's count; see "the ordered dq" at _attn_bwd_dkdv_kernel). Read at every
# backward from this attribute, which starts as LLMCORE_ATTN_BWD (default "two_pass": the
# ordered pass has not been timed on a GPU yet; benchmarks/gpu_check.sh times both).
BWD_SCHEDULES = ("two_pass", "ordered")
BWD_SCHEDULE_AT_START = os.environ.get("LLMCORE_ATTN_BWD", "two_pass")
BWD_SCHEDULE = BWD_SCHEDULE_AT_START


def _bwd_schedule() -> str:
    if BWD_SCHEDULE not in BWD_SCHEDULES:
        raise ValueError(f"LLMCORE_ATTN_BWD (llmcore.kernels.triton.attention.BWD_SCHEDULE) "
                         f"must be one of {BWD_SCHEDULES}, got {BWD_SCHEDULE!r}")
    return BWD_SCHEDULE


# The ordered dq's turn counters are sized for the smallest query tile any config has. Polls
# before a wait gives up: none under the interpreter, which runs programs one after another
# in launch order, so that a wait there can only be a wrong rank; on a GPU 2^15, several ms
# of L2 round trips, past any real wait (the longest: without a right window every key tile
# waits its turn at query tile 0, one add per key tile before it, well under a ms at 16k
# keys). After one wait gave up the others stop within 1024 polls, so a broken order costs
# a launch milliseconds, not minutes.
def _turn_counters(n: int, device) -> torch.Tensor:
    """The ordered dq's LOCK: status word, ticket and turn counters, zeroed."""
    return torch.zeros(n, device=device, dtype=torch.int32)


_MIN_BLOCK_M = min([_INTERPRET_CONFIG["BLOCK_M"]]
                   + [e[0] for entries in _DKDV_ORDERED_TABLE.values() for e in entries])
_SPIN_LIMIT = 0 if _INTERPRET else 1 << 15
_TURNS_HOOK = None  # tests: called with (LOCK, LOCK_TILES) after an ordered dq pass


# The autotuner runs once per shape class, not on every call: its run() costs ~30 us of host
# time a launch on our CI VM (it rebuilds a dict of the kernel's ~60 arguments, scanning the
# argument-name list for each, and str()s every tensor's dtype for its key), 20x the direct
# launch's Python around the same kernel (benchmarks/triton_autotune_overhead.py measures both).
# Its choice is kept here under a key of our own (_Features.tune_key: the autotuner's key and
# the dtypes that make up the rest of it), and later calls launch the JIT kernel with it.
_CHOSEN: dict = {}  # (id(autotuned kernel), tune key) -> (JIT kernel, its config's launch kwargs)
# LLMCORE_TUNING_LOG=path: each choice is appended there as a JSON line, with the time of every
# candidate the autotuner tried (benchmarks/gpu_check.sh sets it): the data to prune the tables
# below with, per GPU.
_TUNING_LOG = os.environ.get("LLMCORE_TUNING_LOG")


def _log_choice(kernel, tune_key, config):
    timings = getattr(kernel, "configs_timings", None) or {}
    def cfg(c):
        return dict(c.kwargs, num_warps=c.num_warps, num_stages=c.num_stages)
    record = dict(kernel=kernel.fn.__name__, key=[str(k) for k in tune_key], best=cfg(config),
                  device=torch.cuda.get_device_name() if torch.cuda.is_available() else None,
                  triton=triton.__version__, tuning_s=getattr(kernel, "bench_time", None),
                  timings_ms=[dict(cfg(c), ms=(t[0] if isinstance(t, (list, tuple)) else t))
                              for c, t in timings.items()])
    with open(_TUNING_LOG, "a") as f:
        f.write(json.dumps(record) + "\n")


def _launch(kernel, grid_axis0, H, B, args, consts, tune_key):
    """grid_axis0(meta) -> programs along axis 0. The interpreter gets the fixed small config;
    on a GPU the first call of a shape class goes through the autotuner, later ones straight
    to the kernel with the config it chose."""
    if _INTERPRET:
        meta = dict(_INTERPRET_CONFIG)
        kernel[(grid_axis0(meta), H, B)](*args, **consts, **meta)
        return
    key = (id(kernel), tune_key)
    chosen = _CHOSEN.get(key)
    if chosen is None:
        kernel[lambda meta: (grid_axis0(meta), H, B)](*args, **consts)
        config = getattr(kernel, "best_config", None)
        if config is not None:    # (a triton whose autotuner says nothing: asked every call)
            _CHOSEN[key] = (kernel.fn, config.all_kwargs())
            if _TUNING_LOG:
                _log_choice(kernel, tune_key, config)
        return
    fn, config = chosen
    fn[(grid_axis0(config), H, B)](*args, **consts, **config)


# ------------------------------------------------------------------------------ launchers

def _strides4(t: torch.Tensor, varlen: bool) -> tuple[int, int, int, int]:
    """(batch, head, seq, dim) strides of a (B, H, N, D) view; packed varlen (1, H, total, D)
    has no batch stride (the sequence offsets come from cu_seqlens)."""
    s = t.stride()  # one tuple: stride(i) costs several times more per call
    return (0 if varlen else s[0]), s[1], s[2], s[3]


def _like_layout(ref: torch.Tensor, shape, dtype=None) -> torch.Tensor:
    """An uninitialised (B, H, N, d) tensor of `shape`, in memory order (B, N, H, d) when `ref` is
    a transposed view of such memory (flash-attn layouts), else contiguous (B, H, N, d). Used for
    outputs and gradients, and by the fake impls, so both agree on strides."""
    dtype = ref.dtype if dtype is None else dtype
    strides = ref.stride()
    if len(strides) == 4 and strides[1] < strides[2]:  # heads inside sequence positions
        b, h, n, d = shape
        # (B, N, H, d) memory seen as (B, H, N, d), allocated with those strides in one call
        # (an allocation and a transpose cost a dispatcher call more, ~1.5 us of host time)
        return ref.new_empty_strided(shape, (n * h * d, d, h * d, 1), dtype=dtype)
    # new_empty: no device object to build
    return ref.new_empty(shape, dtype=dtype)


class _Features:
    """Kernel scalars and constexpr flags shared by forward and backward."""

    def __init__(self, q, k, v, scale, window, bottom_right, softcap, alibi_slopes, attn_mask,
                 dropout_p, seed, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k):
        self.varlen = cu_seqlens_q is not None
        _, self.H, self.Nq, self.D = q.shape
        self.Hkv, self.Nk, self.Dv = k.shape[1], k.shape[2], v.shape[3]
        self.B = q.shape[0]
        if self.varlen:  # the grid's batch axis walks the packed sequences
            self.B = cu_seqlens_q.shape[0] - 1
            self.Nq, self.Nk = int(max_seqlen_q), int(max_seqlen_k)
        if max(self.D, self.Dv) > MAX_HEAD_DIM:
            raise ValueError(f"the triton attention kernels take head dims up to {MAX_HEAD_DIM}, "
                             f"got query/key {self.D} and value {self.Dv}")
        if self.H % self.Hkv != 0:
            raise ValueError(f"query heads ({self.H}) must be a multiple of key/value heads "
                             f"({self.Hkv})")
        self.group = self.H // self.Hkv
        self.block_d = max(16, next_power_of_2(self.D))
        self.block_dv = max(16, next_power_of_2(self.Dv))
        self.seq_bucket = min(next_power_of_2(max(self.Nq, 1)), 8192)
        left, right = (int(w) for w in window)
        self.window_left, self.window_right = max(left, 0), max(right, 0)
        self.has_wl, self.has_wr = left >= 0, right >= 0
        self.align = 1 if bottom_right else 0
        self.scale = float(scale)
        self.softcap = float(softcap)
        self.has_softcap = self.softcap > 0.0
        self.alibi = alibi_slopes
        self.mask = attn_mask
        self.dropout_p = float(dropout_p)
        self.has_dropout = self.dropout_p > 0.0
        if self.has_dropout and seed is None:
            raise ValueError("dropout_p > 0 needs a seed tensor (draw_seed)")
        self.seed = seed
        # _seq_bounds reads offset b at CU + b: the (S + 1,) offsets, copied when strided
        self.cu_q = None if cu_seqlens_q is None else cu_seqlens_q.contiguous()
        self.cu_k = None if cu_seqlens_k is None else cu_seqlens_k.contiguous()
        # fp32 inputs: exact fp32 products (no TF32), so fp32 meets the oracle rule on GPUs too
        self.dot_prec = "ieee" if q.dtype == torch.float32 else "tf32"
        # what the autotuner's key holds (_AUTOTUNE_KEY, and the dtypes of the tensors the
        # kernels receive, which these flags and dtypes determine): see _launch
        self.tune_key = (self.block_d, self.block_dv, self.has_wr, self.seq_bucket, self.group,
                         q.dtype,
                         k.dtype, v.dtype, None if attn_mask is None else attn_mask.dtype,
                         alibi_slopes is None, self.varlen, self.has_dropout)

    def pointers(self, q):
        """(MASK, SLOPES, CU_Q, CU_K, SEED); absent ones point at q and are never read."""
        mask = q if self.mask is None else self.mask
        if mask.dtype == torch.bool:
            mask = mask.view(torch.uint8)
        return (mask, q if self.alibi is None else self.alibi,
                q if self.cu_q is None else self.cu_q, q if self.cu_k is None else self.cu_k,
                q if self.seed is None else self.seed)

    def mask_strides(self):
        if self.mask is None:
            return 0, 0, 0, 0
        m = self.mask.expand(self.B, self.H, self.Nq, self.Nk)  # broadcast dims -> stride 0
        return m.stride()

    def slope_strides(self):
        if self.alibi is None:
            return 0, 0
        s = self.alibi.stride()
        if len(s) == 1:  # (H,)
            return 0, s[0]
        # (B or S, H), or (1, H) for every batch row
        return (0 if self.alibi.shape[0] == 1 else s[0]), s[1]

    def lse_strides(self, lse):
        s = lse.stride()
        return (0 if self.varlen else s[0]), s[1], s[2]

    def sizes(self):
        return (self.H, self.group, self.Nq, self.Nk, self.D, self.Dv)

    def score_args(self):
        softcap = self.softcap if self.has_softcap else 1.0
        return (self.scale * LOG2E, self.scale / softcap, softcap * LOG2E, self.window_left,
                self.window_right, self.align, self.dropout_p,
                1.0 / (1.0 - self.dropout_p) if self.has_dropout else 1.0)

    def consts(self):
        mask_kind = 0 if self.mask is None else (1 if self.mask.dtype == torch.bool else 2)
        # PAD_D / PAD_DV: a head dim below its power-of-two block, whose tile loads mask columns
        return dict(BLOCK_D=self.block_d, BLOCK_DV=self.block_dv, PAD_D=self.D != self.block_d,
                    PAD_DV=self.Dv != self.block_dv, IS_VARLEN=self.varlen,
                    HAS_SOFTCAP=self.has_softcap, HAS_ALIBI=self.alibi is not None,
                    MASK_KIND=mask_kind, HAS_WL=self.has_wl, HAS_WR=self.has_wr,
                    HAS_DROPOUT=self.has_dropout, DOT_PREC=self.dot_prec)


def attention_fwd(q, k, v, *, scale, window=(-1, -1), bottom_right=False, softcap=0.0,
                  attn_mask=None, alibi_slopes=None, dropout_p=0.0, seed=None,
                  cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=None, max_seqlen_k=None):
    """Fused attention forward: (out, lse).

    q (B, Hq, Nq, D), k (B, Hkv, Nk, D), v (B, Hkv, Nk, Dv): any strides, Hq % Hkv == 0, head
    dims <= 256. Varlen: (1, H, total, D) views with int32 cu_seqlens_q/k (S + 1,) and the
    longest lengths max_seqlen_q/k. window (left, right) with causal folded in (right = 0), -1
    unbounded, aligned on i + (Lk - Lq) when bottom_right else on i. softcap > 0 caps scores.
    alibi_slopes (H,), (B, H) or (1, H), fp32: bias -slope |i + diag - j|. attn_mask: bool (True
    = attend) or additive, 4-D broadcastable to (B, Hq, Nq, Nk); dense only. dropout_p > 0 needs
    seed, an int64 tensor (1,) on q's device (draw_seed).
    out: (B, Hq, Nq, Dv) in q's dtype, in q's memory order (see _like_layout). lse: fp32
    (B, Hq, Nq) natural-log logsumexp of the scores, +inf on rows that see no key (out = 0).
    No input checks beyond what the kernels need: llmcore.ops checks."""
    if scale < 0:
        # the kernel takes its row max on the raw q.k, which needs scale >= 0: scale q.k =
        # |scale| (-q).k, a negated copy of q (exact, same memory order) for this odd call;
        # the backward recomputes scale q.k as it is
        q, scale = torch.neg(q), -scale
    f = _Features(q, k, v, scale, window, bottom_right, softcap, alibi_slopes, attn_mask,
                  dropout_p, seed, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    B, H, Nq = q.shape[:3]
    out = _like_layout(q, (B, H, Nq, f.Dv))
    lse = q.new_empty((B, H, Nq), dtype=torch.float32)
    if f.varlen:  # rows outside every sequence (none when cu_seqlens end at total) stay defined
        out.zero_()
        lse.fill_(float("inf"))
    if out.numel() == 0 or f.B == 0:
        return out, lse.fill_(float("inf"))
    args = (q, k, v, out, lse, *f.pointers(q),
            *_strides4(q, f.varlen), *_strides4(k, f.varlen), *_strides4(v, f.varlen),
            *_strides4(out, f.varlen), *f.lse_strides(lse), *f.mask_strides(),
            *f.slope_strides(), *f.sizes(), *f.score_args(), f.seq_bucket)
    _launch(_fwd_kernel, lambda meta: cdiv(f.Nq, meta["BLOCK_M"]), f.H, f.B, args,
            f.consts(), f.tune_key)
    return out, lse


def attention_bwd(grad_out, q, k, v, out, lse, *, scale, window=(-1, -1), bottom_right=False,
                  softcap=0.0, attn_mask=None, alibi_slopes=None, dropout_p=0.0, seed=None,
                  cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=None, max_seqlen_k=None,
                  mask_grad=False, deterministic=True):
    """Fused attention backward: (dq, dk, dv, dmask) with dq, dk, dv in the shapes, dtypes and
    memory orders of q, k, v.

    The arguments of attention_fwd (the same seed), its (out, lse), and grad_out (out's shape,
    any strides). mask_grad (additive attn_mask only): dmask is the gradient of the mask in the
    mask's shape and dtype (summed over its broadcast dims); else None. deterministic (the
    default): no atomics, dk/dv sum a GQA group's query heads in order, a dq kernel of its own.
    deterministic=False (without mask_grad): one pass that adds dq atomically into an fp32
    buffer (flash-attn's meaning of the flag: bitwise results may vary between runs)."""
    f = _Features(q, k, v, scale, window, bottom_right, softcap, alibi_slopes, attn_mask,
                  dropout_p, seed, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    mask_grad = bool(mask_grad)
    ordered_dq = deterministic and not mask_grad and _bwd_schedule() == "ordered"
    atomic_dq = (not deterministic and not mask_grad) or ordered_dq
    dq, dk, dv = (_like_layout(t, t.shape) for t in (q, k, v))
    if f.varlen:
        for t in ((dk, dv) if atomic_dq else (dq, dk, dv)):
            t.zero_()
    if mask_grad and (attn_mask is None or attn_mask.dtype == torch.bool or f.varlen):
        raise ValueError("mask_grad needs an additive (float) attn_mask on dense inputs")
    # d mask over the full (B, H, Nq, Nk); reduced to the mask's broadcast shape at the end
    dmask = (torch.zeros((f.B, f.H, f.Nq, f.Nk), device=q.device, dtype=torch.float32)
             if mask_grad else None)
    if q.numel() == 0 or k.numel() == 0 or f.B == 0:
        return dq.zero_(), dk.zero_(), dv.zero_(), _reduce_dmask(dmask, attn_mask)
    delta = torch.empty_like(lse)  # rowsum(do * o), fp32, lse's layout
    lse_strides = f.lse_strides(lse)
    delta_block = 32 if _INTERPRET else 64
    _attn_bwd_delta_kernel[(cdiv(f.Nq, delta_block), f.H, f.B)](
        out, grad_out, delta, q if f.cu_q is None else f.cu_q,
        *_strides4(out, f.varlen), *_strides4(grad_out, f.varlen), *lse_strides,
        f.Nq, f.Dv, BLOCK_M=delta_block, BLOCK_DV=f.block_dv, IS_VARLEN=f.varlen)

    common = (*f.pointers(q), *_strides4(q, f.varlen), *_strides4(k, f.varlen),
              *_strides4(v, f.varlen), *_strides4(grad_out, f.varlen))
    tail = (*f.mask_strides(), *f.slope_strides(), *f.sizes(), f.scale, *f.score_args(),
            f.seq_bucket)
    tune_key = (*f.tune_key, grad_out.dtype)
    if atomic_dq:
        # fp32 (B, H, Nq, D) accumulator (varlen: (1, H, total, D)), zeroed: rows outside
        # every sequence stay 0, as dq's do on the deterministic path
        dq_acc = torch.zeros(q.shape, device=q.device, dtype=torch.float32)
        # the ordered dq's status word, ticket and turn counters (B, H, query tiles of the
        # smallest BLOCK_M a config may have), zeroed; the unordered kernel never reads them
        lock_tiles = cdiv(f.Nq, _MIN_BLOCK_M)
        lock = _turn_counters(2 + f.B * f.H * lock_tiles, q.device) if ordered_dq else dq_acc
        _launch(_dkdv_ordered_kernel if ordered_dq else _dkdv_atomic_kernel,
                lambda meta: cdiv(f.Nk, meta["BLOCK_N"]), f.Hkv, f.B,
                (q, k, v, grad_out, dk, dv, dq_acc, lse, delta, *common,
                 *_strides4(dk, f.varlen), *_strides4(dv, f.varlen),
                 *_strides4(dq_acc, f.varlen), *lse_strides, *tail, lock, lock_tiles),
                {**f.consts(), "ATOMIC_DQ": True, "ORDERED_DQ": ordered_dq,
                 "SPIN_LIMIT": _SPIN_LIMIT if ordered_dq else 0}, tune_key)
        if ordered_dq and _TURNS_HOOK is not None:
            _TURNS_HOOK(lock, lock_tiles)
        return dq.copy_(dq_acc), dk, dv, None
    _launch(_dq_kernel, lambda meta: cdiv(f.Nq, meta["BLOCK_M"]), f.H, f.B,
            (q, k, v, grad_out, dq, q if dmask is None else dmask, lse, delta, *common,
             *_strides4(dq, f.varlen), *lse_strides, *tail),
            {**f.consts(), "MASK_GRAD": mask_grad}, (*tune_key, mask_grad))
    # DQ and LOCK are not read or written without ATOMIC_DQ: dq stands in
    _launch(_dkdv_kernel, lambda meta: cdiv(f.Nk, meta["BLOCK_N"]), f.Hkv, f.B,
            (q, k, v, grad_out, dk, dv, dq, lse, delta, *common, *_strides4(dk, f.varlen),
             *_strides4(dv, f.varlen), *_strides4(dq, f.varlen), *lse_strides, *tail, dq, 0),
            {**f.consts(), "ATOMIC_DQ": False, "ORDERED_DQ": False, "SPIN_LIMIT": 0}, tune_key)
    return dq, dk, dv, _reduce_dmask(dmask, attn_mask)


def _reduce_dmask(dmask, attn_mask):
    # sum the (B, H, Nq, Nk) gradient over the dims the mask broadcasts along
    if dmask is None:
        return None
    dims = [d for d in range(4) if attn_mask.shape[d] == 1 and dmask.shape[d] != 1]
    if dims:
        dmask = dmask.sum(dims, keepdim=True)
    return dmask.to(attn_mask.dtype)


# ------------------------------------------------------------------------------ dropout RNG

def draw_seed(device) -> torch.Tensor:
    """A fresh dropout seed, an int64 tensor (1,) on `device`, drawn from torch's generator for
    that device, so torch.manual_seed makes attention dropout reproducible."""
    return torch.randint(0, 2**62, (1,), device=device, dtype=torch.int64)


def dropout_mask(seed: torch.Tensor, dropout_p: float, batch: int, heads: int, seqlen_q: int,
                 seqlen_k: int) -> torch.Tensor:
    """The keep mask (bool, (batch, heads, seqlen_q, seqlen_k)) the attention kernels draw for
    `seed` (an int64 tensor (1,) from draw_seed). A debugging and testing aid: attention with
    this seed and dropout_p equals softmax(s) * mask / (1 - dropout_p) @ v. For varlen, sequence
    b uses mask[b, :, :Lq_b, :Lk_b] with seqlen_q/seqlen_k the longest lengths; for the dense
    layouts the query heads index dim 1."""
    keep = torch.empty((batch, heads, seqlen_q, seqlen_k), device=seed.device, dtype=torch.int8)
    if keep.numel() == 0:
        return keep.bool()
    block = 32
    grid = (cdiv(seqlen_q, block), cdiv(seqlen_k, block), batch * heads)
    _dropout_mask_kernel[grid](keep, seed, float(dropout_p), seqlen_q, seqlen_k,
                               BLOCK_M=block, BLOCK_N=block)
    return keep.bool()
