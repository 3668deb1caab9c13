"""LayerNorm and RMSNorm in Triton: forward and backward, with the fused pre-norm residual add.

Shapes: every launcher works on 2-D views (M rows, N features); rows and features may be strided
(nothing is copied to make them contiguous). Outputs are contiguous. Statistics and sums are fp32
(fp64 for fp64 inputs): the kernels compute in the dtype of the rstd buffer they are given.

    h    = x + residual                          (when a residual is given; stored, rounded)
    mean = sum(h) / N                            (layer norm only)
    rstd = 1 / sqrt(sum((h - mean)^2) / N + eps) (rms norm: mean = 0)
    y    = (h - mean) * rstd * weight + bias

The whole row lives in registers, so a row may hold at most MAX_ROW_BYTES bytes.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from llmcore.kernels.triton._host import cdiv, next_power_of_2

# One row is held in registers by one program: 64 KB of input per row at most (hidden 32768 in
# bf16, 16384 in fp32). Longer rows need a two-pass kernel that llmcore does not have.
MAX_ROW_BYTES = 64 * 1024


def check_row_size(n: int, dtype: torch.dtype, op: str) -> None:
    """Raises ValueError when a row of `n` elements of `dtype` is too long for these kernels."""
    nbytes = n * dtype.itemsize
    if nbytes > MAX_ROW_BYTES:
        raise ValueError(
            f"{op} on the triton backend: the normalised size {n} in {dtype} is {nbytes} bytes "
            f"per row, and these kernels hold one row in registers, at most {MAX_ROW_BYTES} "
            f"bytes; use backend='torch' or 'native' for rows this long"
        )


def _num_warps(block: int) -> int:
    # Untuned (no GPU measured yet): about 256 elements per warp, 1..16 warps.
    return min(max(block // 256, 1), 16)


@functools.lru_cache(maxsize=None)
def _row_config(n: int) -> tuple[int, int]:
    """(BLOCK_N, num_warps) for rows of n features: one cached lookup per launch."""
    block = next_power_of_2(n)
    return block, _num_warps(block)


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _num_partials(m: int, n: int, cuda_index: int) -> int:
    """Programs of the backward kernel = rows of the weight-gradient partials: a few hundred,
    not one per input row. Each program walks a contiguous block of rows, one at a time, so the
    SMs are kept busy by running several programs each: about 32 warps per SM (2 programs of
    16 warps at hidden 4096-8192, 8 of 4 warps at hidden 1024; 264 to 1056 partial rows on an
    H200). Depends only on M, N and the device, so the reduction order (hence every bit of
    dweight) is reproducible. Untuned: no H200 measurement of this choice yet.
    cuda_index: the CUDA device's index, -1 for the CPU (tensor.get_device(), which builds no
    device object)."""
    if cuda_index >= 0:
        per_sm = max(2, 32 // _row_config(n)[1])
        return max(1, min(m, per_sm * _sm_count(cuda_index)))
    return max(1, min(m, 4))  # the interpreter: few programs, many rows each


@triton.jit
def _norm_fwd_kernel(
    X, R, W, B, Y, H, Mean, Rstd,
    N, stride_xm, stride_xn, stride_rm, stride_rn, stride_w, stride_b, stride_ym, stride_hm,
    eps,
    IS_RMS: tl.constexpr, HAS_RES: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
    STATS: tl.constexpr, ACC: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # ACC: the arithmetic's dtype, fp32 (fp64 for fp64 inputs); STATS: store mean and rstd (not
    # when nothing will differentiate y: then Mean and Rstd are None)
    # one program per row; offsets in int64 (a row or column stride times an index may pass
    # 2**31 elements), the mask on the int32 column index
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < N
    c64 = cols.to(tl.int64)
    x = tl.load(X + row * stride_xm + c64 * stride_xn, mask=mask, other=0.0)
    if HAS_RES:
        r = tl.load(R + row * stride_rm + c64 * stride_rn, mask=mask, other=0.0)
        # h = x + residual, rounded to the input dtype: the norm is taken of the returned h
        h = (x.to(ACC) + r.to(ACC)).to(H.dtype.element_ty)
        tl.store(H + row * stride_hm + c64, h, mask=mask)
        x = h
    x = x.to(ACC)
    if IS_RMS:
        xc = x
    else:
        mean = tl.sum(x, axis=0) / N
        if STATS:
            tl.store(Mean + row, mean)
        xc = tl.where(mask, x - mean, 0.0)
    var = tl.sum(xc * xc, axis=0) / N
    rstd = 1.0 / tl.sqrt(var + eps)
    if STATS:
        tl.store(Rstd + row, rstd)
    y = xc * rstd
    if HAS_W:
        y = y * tl.load(W + c64 * stride_w, mask=mask, other=0.0).to(ACC)
    if HAS_B:
        y = y + tl.load(B + c64 * stride_b, mask=mask, other=0.0).to(ACC)
    tl.store(Y + row * stride_ym + c64, y.to(Y.dtype.element_ty), mask=mask)


# Backward, per row, with xhat = (h - mean) * rstd and g = dy * weight (g = dy without weight):
#   layer norm: dh = rstd * (g - xhat * mean(g * xhat) - mean(g))
#   rms norm:   dh = rstd * (g - xhat * mean(g * xhat))
#   dweight = sum_rows(dy * xhat), dbias = sum_rows(dy)
# With a residual, the gradient of the h output (dh_out) adds to dh, and dx = dresidual = dh.
# Each program walks a contiguous block of rows and keeps its dweight/dbias sums in fp32
# registers; it writes them as one row of a (programs, N) partials buffer, which the launcher
# sums in a fixed order: no atomics, bit-identical results run after run.
@triton.jit
def _norm_bwd_kernel(
    DY, DHO, Hx, W, Mean, Rstd, DX, DWp, DBp,
    M, N, rows_per_program,
    stride_dym, stride_dyn, stride_dhm, stride_dhn, stride_hm, stride_hn, stride_w, stride_dxm,
    IS_RMS: tl.constexpr, HAS_DHO: tl.constexpr, HAS_W: tl.constexpr, DW: tl.constexpr,
    DB: tl.constexpr, BLOCK_N: tl.constexpr,
):
    acc_ty = Rstd.dtype.element_ty  # fp32, fp64 for fp64 inputs
    pid = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < N
    c64 = cols.to(tl.int64)  # offsets in int64: index * stride may pass 2**31 elements
    row_start = pid * rows_per_program  # int64
    n_rows = tl.minimum(rows_per_program, M - row_start)
    if HAS_W:
        w = tl.load(W + c64 * stride_w, mask=mask, other=0.0).to(acc_ty)
    dw_acc = tl.zeros((BLOCK_N,), dtype=acc_ty)
    db_acc = tl.zeros((BLOCK_N,), dtype=acc_ty)
    # the loop counts from 0 and the row is row_start + r, int64 whatever type the loop
    # variable gets (the interpreter makes `for row in range(a, b)` int32 even for int64 bounds)
    for r in range(0, n_rows):
        row = row_start + r
        h = tl.load(Hx + row * stride_hm + c64 * stride_hn, mask=mask, other=0.0).to(acc_ty)
        dy = tl.load(DY + row * stride_dym + c64 * stride_dyn, mask=mask, other=0.0).to(acc_ty)
        rstd = tl.load(Rstd + row)
        if IS_RMS:
            xhat = h * rstd
        else:
            mean = tl.load(Mean + row)
            xhat = tl.where(mask, (h - mean) * rstd, 0.0)
        if HAS_W:
            g = dy * w
        else:
            g = dy
        if DW:
            dw_acc += dy * xhat
        if DB:
            db_acc += dy
        c1 = tl.sum(g * xhat, axis=0) / N
        if IS_RMS:
            dh = (g - xhat * c1) * rstd
        else:
            c2 = tl.sum(g, axis=0) / N
            dh = (g - xhat * c1 - c2) * rstd
        if HAS_DHO:
            dho = tl.load(DHO + row * stride_dhm + c64 * stride_dhn, mask=mask, other=0.0)
            dh += dho.to(acc_ty)
        tl.store(DX + row * stride_dxm + c64, dh.to(DX.dtype.element_ty), mask=mask)
    if DW:
        tl.store(DWp + pid * N + c64, dw_acc, mask=mask)
    if DB:
        tl.store(DBp + pid * N + c64, db_acc, mask=mask)


# dweight[c] = sum over the partial rows p = 0, 1, ... of partials[p, c] (fixed order, fp32),
# rounded once to the parameter's dtype: the reduction and the cast in one pass. With HAS_Q the
# same program also sums a second (p, N) partials buffer Q (dbias beside dweight): one launch
# for both, each column's sum in the same order as alone.
@triton.jit
def _partials_sum_kernel(P, Out, Q, OutQ, n_partials, N, HAS_Q: tl.constexpr,
                         BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr):
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cmask = cols < N
    acc = tl.zeros((BLOCK_N,), dtype=P.dtype.element_ty)
    acc_q = tl.zeros((BLOCK_N,), dtype=P.dtype.element_ty)
    for start in range(0, n_partials, BLOCK_P):
        rows = start + tl.arange(0, BLOCK_P)
        offs = rows.to(tl.int64)[:, None] * N + cols[None, :]
        mask = (rows < n_partials)[:, None] & cmask[None, :]
        acc += tl.sum(tl.load(P + offs, mask=mask, other=0.0), axis=0)
        if HAS_Q:
            acc_q += tl.sum(tl.load(Q + offs, mask=mask, other=0.0), axis=0)
    tl.store(Out + cols, acc.to(Out.dtype.element_ty), mask=cmask)
    if HAS_Q:
        tl.store(OutQ + cols, acc_q.to(OutQ.dtype.element_ty), mask=cmask)


@functools.lru_cache(maxsize=None)
def _partials_config(n: int) -> tuple[int, int]:
    """(BLOCK_N, BLOCK_P) of the partials reduction: columns per program, rows per step. One
    program per BLOCK_N columns walks all the partial rows, so narrow rows need narrow column
    blocks to spread over the SMs: at hidden 1024 the 256 columns a program took before made 4
    programs for 1056 partial rows (2 x 1 MiB read by 4 SMs, a third of the backward's time in
    a bandwidth model). Now about 128 programs, with column blocks of 32-256 fp32 (whole 128-byte
    lines) and 4096-element steps (8 vector loads in flight per thread and buffer). Untimed
    (no GPU yet); the column sums' order is fixed by the shape, so the bits are reproducible."""
    block_n = max(32, min(256, next_power_of_2(cdiv(n, 128))))
    return block_n, 4096 // block_n


def _sum_partials(part: torch.Tensor, dtype: torch.dtype, part_q=None, dtype_q=None):
    """(p, N) fp32/fp64 partials -> (N,) sums in `dtype`; with part_q, also its sums in dtype_q
    (None otherwise). One kernel."""
    p, n = part.shape
    # The Triton interpreter (CPU tests) truncates fp32 -> bf16 casts where the GPU rounds to
    # nearest: there, the sums come out in fp32 and torch rounds them.
    interp = part.is_cpu
    acc = part.dtype
    out = part.new_empty(n, dtype=acc if interp and dtype == torch.bfloat16 else dtype)
    out_q = None
    if part_q is not None:
        out_q = part.new_empty(n, dtype=acc if interp and dtype_q == torch.bfloat16 else dtype_q)
    block_n, block_p = _partials_config(n)
    _partials_sum_kernel[(cdiv(n, block_n),)](part, out, part_q, out_q, p, n,
                                              HAS_Q=part_q is not None, BLOCK_P=block_p,
                                              BLOCK_N=block_n, num_warps=4)
    if interp:
        out = out if out.dtype == dtype else out.to(dtype)
        out_q = out_q if out_q is None or out_q.dtype == dtype_q else out_q.to(dtype_q)
    return out, out_q


def _stat_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def norm_fwd(x, residual, weight, bias, eps: float, is_rms: bool, stats: bool = True):
    """x, residual: (M, N), any strides; weight, bias: (N,) with any stride, or None.

    Returns y (M, N), h = x + residual (M, N) or None without residual, mean (M,) or None for
    rms, rstd (M,); statistics in fp32 (fp64 for fp64 x). Outputs are contiguous.
    stats=False, for a y that nothing will differentiate: no statistics (mean and rstd None)."""
    m, n = x.shape
    check_row_size(n, x.dtype, "rms_norm" if is_rms else "layer_norm")
    stat = _stat_dtype(x)
    # new_empty with plain ints: the cheapest allocation call (no device object, no torch.Size)
    y = x.new_empty(m, n)
    h = x.new_empty(m, n) if residual is not None else None
    mean = None if is_rms or not stats else x.new_empty(m, dtype=stat)
    rstd = x.new_empty(m, dtype=stat) if stats else None
    if m == 0 or n == 0:
        # nothing to normalise; zero-width rows have no statistics (0/0): left at 0
        for t in (mean, rstd):
            if t is not None:
                t.zero_()
        return y, h, mean, rstd
    block, warps = _row_config(n)
    r = residual
    sx = x.stride()  # one tuple: stride(i) costs several times more per call
    sr = r.stride() if r is not None else (0, 0)
    _norm_fwd_kernel[(m,)](
        x, r, weight, bias, y, h, mean, rstd,
        n, sx[0], sx[1], sr[0], sr[1],
        weight.stride()[0] if weight is not None else 0,
        bias.stride()[0] if bias is not None else 0,
        n, n,  # y's and h's row strides: both contiguous
        eps,
        IS_RMS=is_rms, HAS_RES=r is not None, HAS_W=weight is not None, HAS_B=bias is not None,
        STATS=stats, ACC=tl.float64 if stat is torch.float64 else tl.float32,
        BLOCK_N=block, num_warps=warps,
    )
    return y, h, mean, rstd


def norm_bwd(dy, dh_out, h, weight, mean, rstd, is_rms: bool, weight_grad: bool,
             bias_grad: bool, weight_dtype=None, bias_dtype=None):
    """dy, dh_out (or None), h: (M, N), any strides; h is the normalised input (x, or x +
    residual); mean (None for rms) and rstd as norm_fwd returned them.

    Returns dh (M, N) contiguous in h's dtype (the gradient of x, and of the residual), and
    dweight, dbias (N,) summed in the statistics' dtype and rounded once to weight_dtype /
    bias_dtype (default: the statistics' dtype), or None where not asked for."""
    m, n = h.shape
    check_row_size(n, h.dtype, "rms_norm" if is_rms else "layer_norm")
    stat = rstd.dtype
    dx = h.new_empty(m, n)
    if m == 0 or n == 0:  # no rows: zero gradients (and nothing to launch)
        return (dx, torch.zeros(n, dtype=weight_dtype or stat, device=h.device)
                if weight_grad else None,
                torch.zeros(n, dtype=bias_dtype or stat, device=h.device) if bias_grad else None)
    p = _num_partials(m, n, h.get_device())
    # every program writes its whole partial row (zeros when it has no rows): no zero-fill
    dw_part = h.new_empty(p, n, dtype=stat) if weight_grad else None
    db_part = h.new_empty(p, n, dtype=stat) if bias_grad else None
    block, warps = _row_config(n)
    sdy, sh = dy.stride(), h.stride()
    sdh = dh_out.stride() if dh_out is not None else (0, 0)
    _norm_bwd_kernel[(p,)](
        dy, dh_out, h, weight, mean, rstd, dx, dw_part, db_part,
        m, n, cdiv(m, p),
        sdy[0], sdy[1], sdh[0], sdh[1], sh[0], sh[1],
        weight.stride()[0] if weight is not None else 0,
        n,  # dx's row stride: contiguous
        IS_RMS=is_rms, HAS_DHO=dh_out is not None, HAS_W=weight is not None,
        DW=weight_grad, DB=bias_grad, BLOCK_N=block, num_warps=warps,
    )
    # the one reduction over the per-program partials: fixed shape, fixed order, one cast, one
    # launch for dweight and dbias together
    if weight_grad:
        dw, db = _sum_partials(dw_part, weight_dtype or stat, db_part, bias_dtype or stat)
    elif bias_grad:
        dw, db = None, _sum_partials(db_part, bias_dtype or stat)[0]
    else:
        dw = db = None
    return dx, dw, db
