"""Cross-entropy over (n, V) logits in Triton: one program per row, the vocabulary walked in
tiles with an online logsumexp (base 2), so nothing of size (n, V) is materialised except the
gradient itself, which may overwrite the logits (in-place gradient).

Per row, with y = softcap * tanh(x / softcap) (y = x without softcap), t the target, w the class
weight (w = 1 without one), W = sum_c w[c], e = label_smoothing, z = z_loss * r, lse =
logsumexp(y), p = softmax(y), valid = t != ignore_index:

    loss = (1-e) w[t] (lse - y[t]) + (e/V) (W lse - sum_c w[c] y[c]) + z lse^2
    dloss/dy[c] = p[c] ((1-e) w[t] + (e/V) W + 2 z lse) - (1-e) w[t] [c == t] - (e/V) w[c]
    dloss/dx[c] = dloss/dy[c] * (1 - tanh^2)              (softcap: d/dx of softcap*tanh(x/sc))

The z-term is not class-weighted; r (a device scalar, 1 when absent) is sum_valid w[t] / n_valid
for a class-weighted "mean", so that sum(loss) / sum_valid w[t] averages it over valid tokens.
Ignored rows have loss 0 and gradient 0. The gradient is multiplied by a per-row scale read
from a device tensor (a 0-dim scale broadcasts), so the "mean" 1/n_valid needs no host sync.

Memory traffic (s bytes per logit): the forward reads the logits once; the backward reads them
once and writes the gradient once: 3 N V s for a fwd+bwd, the floor for a separate backward.
The fused forward+gradient (COMPUTE_GRAD, used by linear_cross_entropy's chunks and the
in-place option) reads each row twice in one program (the second read mostly from L2) and
writes it once.
Arithmetic is fp32 (fp64 for fp64 logits). label_smoothing, z_loss and softcap are compile-time
constants (as in Liger-Kernel): one compiled kernel per distinct setting, which a training run
keeps fixed.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from llmcore.kernels.triton._interp import to_dtype

from llmcore.kernels.triton._host import next_power_of_2

_LOG2E = tl.constexpr(1.4426950408889634)  # log2(e): exp(a) = exp2(a * log2(e))

# Vocabulary tile: up to 8192 logits per program step (V = 50257 takes 7 steps), 16 warps: 16
# values per thread per step, 64 B of bf16 in flight per thread, enough loads in flight to
# cover HBM latency with one or two programs per SM. One program per row (N = 8192 rows is 62
# waves of 132 SMs). UNTUNED for the H200: chosen by reasoning, never measured on a GPU; the
# candidates to time first are (4096, 8 warps) and (8192, 32 warps) at V = 32000 and 128256.
_MAX_BLOCK_V = 8192


@functools.lru_cache(maxsize=None)  # per vocabulary size: one lookup per launch
def _block_v(n_classes: int) -> tuple[int, int]:
    block = min(next_power_of_2(n_classes), _MAX_BLOCK_V)  # the host helper: ns, not us
    return block, min(max(block // 512, 1), 16)  # (BLOCK_V, num_warps), untuned (see above)


@triton.jit
def _tanh(u):
    # tanh without libdevice: an odd Taylor polynomial (error ~ 0.009 |u|^11) near 0, where
    # 1 - exp(-2|u|) would lose digits to cancellation, and (1 - exp(-2|u|)) / (1 + exp(-2|u|))
    # elsewhere (no overflow). The switch point keeps both sides accurate to the dtype.
    cut = 0.25
    if u.dtype == tl.float64:
        cut = 0.002
    a = tl.abs(u)
    a2 = a * a
    small = a * (1.0 + a2 * (-0.3333333333333333 + a2 * (0.13333333333333333
                 + a2 * (-0.05396825396825397 + a2 * 0.021869488536155203))))
    q = tl.exp2(a * -2.8853900817779268)  # exp(-2|u|); -2 log2(e) written out
    big = (1.0 - q) / (1.0 + q)
    r = tl.where(a < cut, small, big)
    return tl.where(u < 0, -r, r)


@triton.jit
def _weight_sum(Wsum, V, HAS_WEIGHT: tl.constexpr, SMOOTH: tl.constexpr):
    # W = sum_c w[c] (V without a weight), read only where label smoothing uses it: the
    # launcher computes it only then
    w_sum = V * 1.0
    if HAS_WEIGHT:
        if SMOOTH:
            w_sum = tl.load(Wsum)
    return w_sum


@triton.jit
def _ce_grad_row(
    x_row, stride_xv, d_row, stride_dv, Wc, stride_w, t, lse, w_t, w_sum, scale,
    V, smoothing, z_loss, softcap,
    HAS_WEIGHT: tl.constexpr, SMOOTH: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    # the gradient of one row (formula in the module docstring), times `scale`, tile by tile
    acc_ty = lse.dtype
    lse2 = lse * _LOG2E
    coef_p = ((1.0 - smoothing) * w_t + 2.0 * z_loss * lse) * scale
    if SMOOTH:
        coef_p += smoothing / V * w_sum * scale
    coef_t = (1.0 - smoothing) * w_t * scale
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        mask = cols < V
        c64 = cols.to(tl.int64)  # offsets in int64: class index * stride may pass 2**31
        x = tl.load(x_row + c64 * stride_xv, mask=mask, other=0.0).to(acc_ty)
        if HAS_SOFTCAP:
            th = _tanh(x / softcap)
            y = softcap * th
        else:
            y = x
        d = tl.exp2(y * _LOG2E - lse2) * coef_p
        d = tl.where(cols == t, d - coef_t, d)
        if SMOOTH:
            if HAS_WEIGHT:
                w = tl.load(Wc + c64 * stride_w, mask=mask, other=0.0).to(acc_ty)
                d -= smoothing / V * w * scale
            else:
                d -= smoothing / V * scale
        if HAS_SOFTCAP:
            d = d * (1.0 - th * th)
        tl.store(d_row + c64 * stride_dv, d.to(d_row.dtype.element_ty), mask=mask)


@triton.jit
def _ce_fwd_kernel(
    X, stride_xn, stride_xv, T, stride_t, Wc, stride_w, Wsum, ZRatio, Loss, Lse, Wt,
    DX, stride_dn, stride_dv, Scale, stride_s,
    V, ignore_index,
    HAS_WEIGHT: tl.constexpr, SMOOTH: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    SMOOTHING: tl.constexpr, Z_LOSS: tl.constexpr, SOFTCAP: tl.constexpr,
    HAS_Z_RATIO: tl.constexpr, STORE_WT: tl.constexpr, COMPUTE_GRAD: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    acc_ty = Loss.dtype.element_ty  # fp32, fp64 for fp64 logits

    # The options are compile-time constants, materialised in the accumulator dtype: a Python
    # float argument would arrive as fp32 and cost fp64 logits their precision.
    smoothing = tl.full([], SMOOTHING, acc_ty)
    z_loss = tl.full([], Z_LOSS, acc_ty)
    if HAS_Z_RATIO:
        z_loss = z_loss * tl.load(ZRatio).to(acc_ty)
    softcap = tl.full([], SOFTCAP, acc_ty)
    row = tl.program_id(0).to(tl.int64)
    x_row = X + row * stride_xn
    t = tl.load(T + row * stride_t).to(tl.int64)
    valid = t != ignore_index
    # a target outside [0, V) that is not ignore_index: its loads stay inside the row (class
    # 0), and it is reported through Wt (below), not through an assert (tl.device_assert
    # exists only in debug builds)
    bad = valid & ((t < 0) | (t >= V))
    t = tl.where(valid & (t >= 0) & (t < V), t, 0)
    # pass 1, online logsumexp (Milakov & Gimelshein 2018) in base 2 over the V tiles:
    # m = running max of y*log2(e), acc = sum exp2(y*log2(e) - m); also sum_c w[c] y[c]
    m = tl.full([], float("-inf"), acc_ty)
    acc = tl.full([], 0.0, acc_ty)
    wy = tl.full([], 0.0, acc_ty)
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        mask = cols < V
        c64 = cols.to(tl.int64)  # offsets in int64: class index * stride may pass 2**31
        x = tl.load(x_row + c64 * stride_xv, mask=mask, other=0.0).to(acc_ty)
        if HAS_SOFTCAP:
            y = softcap * _tanh(x / softcap)
        else:
            y = x
        s = tl.where(mask, y * _LOG2E, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=0))
        # while every logit so far is -inf (a masked leading vocabulary range), m_new = -inf:
        # shift by 0 instead, so exp2(-inf - 0) = 0 rather than exp2(-inf + inf) = nan
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        acc = acc * tl.exp2(m - m_safe) + tl.sum(tl.exp2(s - m_safe), axis=0)
        m = m_new
        if SMOOTH:
            if HAS_WEIGHT:
                w = tl.load(Wc + c64 * stride_w, mask=mask, other=0.0).to(acc_ty)
                wy += tl.sum(w * y, axis=0)
            else:
                wy += tl.sum(tl.where(mask, y, 0.0), axis=0)
    lse = (m + tl.log2(acc)) / _LOG2E

    x_t = tl.load(x_row + t * stride_xv).to(acc_ty)
    if HAS_SOFTCAP:
        y_t = softcap * _tanh(x_t / softcap)
    else:
        y_t = x_t
    if HAS_WEIGHT:
        w_t = tl.load(Wc + t * stride_w).to(acc_ty)
    else:
        w_t = 1.0
    w_sum = _weight_sum(Wsum, V, HAS_WEIGHT, SMOOTH)
    w_t = tl.where(valid, w_t, 0.0)
    loss = (1.0 - smoothing) * w_t * (lse - y_t) + z_loss * lse * lse
    if SMOOTH:
        loss += smoothing / V * (w_sum * lse - wy)
    loss = tl.where(bad, float("nan"), loss)
    tl.store(Loss + row, tl.where(valid, loss, 0.0))
    tl.store(Lse + row, lse)
    if STORE_WT:
        # w[t] of a valid row, 0 for an ignored one, nan for a bad target: its sum is "mean"'s
        # denominator, and nan there reports the bad target with one assert
        tl.store(Wt + row, tl.where(bad, float("nan"), w_t))

    if COMPUTE_GRAD:
        # pass 2: the gradient, into DX (which may be X itself: each element is read, then
        # overwritten, by this program only)
        scale = tl.where(valid, tl.load(Scale + row * stride_s).to(acc_ty), 0.0)
        _ce_grad_row(x_row, stride_xv, DX + row * stride_dn, stride_dv, Wc, stride_w, t, lse,
                     w_t, w_sum, scale, V, smoothing, z_loss, softcap,
                     HAS_WEIGHT, SMOOTH, HAS_SOFTCAP, BLOCK_V)


@triton.jit
def _ce_bwd_kernel(
    X, stride_xn, stride_xv, T, stride_t, Wc, stride_w, Wsum, ZRatio, Lse,
    DX, stride_dn, stride_dv, Scale, stride_s, Den,
    V, ignore_index,
    HAS_WEIGHT: tl.constexpr, SMOOTH: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    SMOOTHING: tl.constexpr, Z_LOSS: tl.constexpr, SOFTCAP: tl.constexpr,
    HAS_Z_RATIO: tl.constexpr, HAS_DEN: tl.constexpr, BLOCK_V: tl.constexpr,
):
    # the gradient pass alone, from the lse saved by the forward
    acc_ty = Lse.dtype.element_ty  # fp32, fp64 for fp64 logits

    # The options are compile-time constants, materialised in the accumulator dtype: a Python
    # float argument would arrive as fp32 and cost fp64 logits their precision.
    smoothing = tl.full([], SMOOTHING, acc_ty)
    z_loss = tl.full([], Z_LOSS, acc_ty)
    if HAS_Z_RATIO:
        z_loss = z_loss * tl.load(ZRatio).to(acc_ty)
    softcap = tl.full([], SOFTCAP, acc_ty)
    row = tl.program_id(0).to(tl.int64)
    t = tl.load(T + row * stride_t).to(tl.int64)
    valid = t != ignore_index
    t = tl.where(valid & (t >= 0) & (t < V), t, 0)  # a bad target reads inside the row
    if HAS_WEIGHT:
        w_t = tl.load(Wc + t * stride_w).to(acc_ty)
    else:
        w_t = 1.0
    w_sum = _weight_sum(Wsum, V, HAS_WEIGHT, SMOOTH)
    w_t = tl.where(valid, w_t, 0.0)
    scale = tl.load(Scale + row * stride_s).to(acc_ty)
    if HAS_DEN:
        # "mean": the row's scale is grad_out / den, divided here instead of by a torch op
        # before the launch, and rounded as torch rounds it (Triton's fp32 "/" is approximate
        # on GPUs; div_rn is the IEEE division, fp32 only; fp64 "/" is IEEE already)
        den = tl.load(Den).to(acc_ty)
        if acc_ty == tl.float64:
            scale = scale / den
        else:
            scale = tl.math.div_rn(scale, den)
    scale = tl.where(valid, scale, 0.0)
    lse = tl.load(Lse + row)
    _ce_grad_row(X + row * stride_xn, stride_xv, DX + row * stride_dn, stride_dv, Wc, stride_w,
                 t, lse, w_t, w_sum, scale, V, smoothing, z_loss, softcap,
                 HAS_WEIGHT, SMOOTH, HAS_SOFTCAP, BLOCK_V)


def acc_dtype(logits: torch.Tensor) -> torch.dtype:
    """The dtype of the kernels' arithmetic and of the loss/lse they return."""
    return torch.float64 if logits.dtype == torch.float64 else torch.float32


def _class_weight_sum(weight, acc, label_smoothing):
    # W, only where label smoothing needs it: (1,), stays on device
    if weight is None or label_smoothing <= 0:
        return None
    return weight.sum(dtype=acc).reshape(1)


def _weight_stride(weight) -> int:
    return 0 if weight is None else weight.stride()[0]


def _scale_stride(scale: torch.Tensor, n: int) -> int:
    if scale.dim() == 0:
        return 0
    if scale.shape != (n,):
        raise ValueError(f"grad_scale must be 0-dim or of shape ({n},), got {tuple(scale.shape)}")
    return scale.stride()[0]


def ce_fwd(logits, target, weight, ignore_index: int, label_smoothing: float, z_loss: float,
           softcap: float | None, grad=None, grad_scale=None, z_ratio=None, valid_weight=False):
    """logits (n, V), target (n,) integer and weight (V,) (logits' dtype or float32) or None,
    each with any strides; z_ratio: None or a one-element tensor r (module docstring).

    Returns loss (n,) and lse (n,) in fp32 (fp64 for fp64 logits). With `grad` (an (n, V)
    tensor, possibly `logits` itself) and `grad_scale` (0-dim or (n,)), also writes
    dloss/dlogits * grad_scale into it. valid_weight=True returns a third (n,) tensor: w[t]
    (1 without a weight) on valid rows, 0 on ignored ones, nan where the target is outside
    [0, V) (whose loss is nan too)."""
    n, v = logits.shape
    acc = acc_dtype(logits)
    # new_empty with plain ints: the cheapest allocation call (no device object, no torch.Size)
    loss = logits.new_empty(n, dtype=acc)
    lse = logits.new_empty(n, dtype=acc)
    wt = logits.new_empty(n, dtype=acc) if valid_weight else None
    if n == 0:
        return (loss, lse, wt) if valid_weight else (loss, lse)
    compute_grad = grad is not None
    block, warps = _block_v(v)
    sx = logits.stride()  # one tuple: stride(i) costs several times more per call
    sg = grad.stride() if compute_grad else (0, 0)
    _ce_fwd_kernel[(n,)](
        logits, sx[0], sx[1], target, target.stride()[0], weight,
        _weight_stride(weight), _class_weight_sum(weight, acc, label_smoothing), z_ratio,
        loss, lse, wt,
        grad, sg[0], sg[1],
        grad_scale, _scale_stride(grad_scale, n) if compute_grad else 0,
        v, ignore_index,
        HAS_WEIGHT=weight is not None, SMOOTH=label_smoothing > 0,
        HAS_SOFTCAP=softcap is not None, SMOOTHING=float(label_smoothing),
        Z_LOSS=float(z_loss), SOFTCAP=float(softcap or 1.0), HAS_Z_RATIO=z_ratio is not None,
        STORE_WT=valid_weight, COMPUTE_GRAD=compute_grad, BLOCK_V=block, num_warps=warps,
    )
    return (loss, lse, wt) if valid_weight else (loss, lse)


def ce_bwd(logits, target, weight, lse, grad_scale, ignore_index: int, label_smoothing: float,
           z_loss: float, softcap: float | None, z_ratio=None, den=None):
    """dloss/dlogits * grad_scale as a contiguous (n, V) tensor in logits' dtype, from the lse
    (n,) that ce_fwd returned. grad_scale: 0-dim or (n,), e.g. the gradient of the row losses.
    den: None, or a 0-dim tensor in lse's dtype that divides grad_scale (a "mean"'s
    denominator), with the bits of torch's grad_scale / den."""
    n, v = logits.shape
    dlogits = logits.new_empty(n, v)
    if n == 0:
        return dlogits
    block, warps = _block_v(v)
    sx = logits.stride()
    _ce_bwd_kernel[(n,)](
        logits, sx[0], sx[1], target, target.stride()[0], weight,
        _weight_stride(weight), _class_weight_sum(weight, lse.dtype, label_smoothing), z_ratio,
        lse, dlogits, v, 1,  # dlogits' strides: contiguous
        grad_scale, _scale_stride(grad_scale, n), den,
        v, ignore_index,
        HAS_WEIGHT=weight is not None, SMOOTH=label_smoothing > 0,
        HAS_SOFTCAP=softcap is not None, SMOOTHING=float(label_smoothing),
        Z_LOSS=float(z_loss), SOFTCAP=float(softcap or 1.0), HAS_Z_RATIO=z_ratio is not None,
        HAS_DEN=den is not None, BLOCK_V=block, num_warps=warps,
    )
    return dlogits


# ---------------------------------------------------------------------------- vocabulary blocks
# linear_cross_entropy's backward walks the vocabulary in column blocks: for one block of
# logits (all rows, columns [col_start, col_start + c)) it needs the gradient given the lse
# saved by the forward. Per element, without class weight (W = V, w[t] = 1):
#     dloss/dy[c] = p[c] (1 + 2 z lse) - (1-e) [c == t] - e/V,   p[c] = exp(y[c] - lse)
#     dloss/dx[c] = dloss/dy[c] * (1 - tanh^2)                    (softcap)
# times the row's scale (0 for ignored rows). Every element is independent: a 2-D grid of
# (row, column tile) programs, each reading and writing one tile (the output may be the input).

@triton.jit
def _ce_grad_block_kernel(
    X, stride_xn, stride_xv, T, stride_t, Lse, Scale, stride_s, DX, stride_dn, stride_dv,
    n_cols, col_start, V, ignore_index,
    SMOOTH: tl.constexpr, HAS_SOFTCAP: tl.constexpr, SMOOTHING: tl.constexpr,
    Z_LOSS: tl.constexpr, SOFTCAP: tl.constexpr, BLOCK_V: tl.constexpr,
):
    acc_ty = Lse.dtype.element_ty  # fp32, fp64 for fp64 logits
    smoothing = tl.full([], SMOOTHING, acc_ty)
    z_loss = tl.full([], Z_LOSS, acc_ty)
    softcap = tl.full([], SOFTCAP, acc_ty)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_V + tl.arange(0, BLOCK_V)
    mask = cols < n_cols
    t = tl.load(T + row * stride_t).to(tl.int64)
    valid = t != ignore_index
    scale = tl.where(valid, tl.load(Scale + row * stride_s).to(acc_ty), 0.0)
    lse = tl.load(Lse + row)
    coef_p = (1.0 + 2.0 * z_loss * lse) * scale
    x = tl.load(X + row * stride_xn + cols * stride_xv, mask=mask, other=0.0).to(acc_ty)
    if HAS_SOFTCAP:
        th = _tanh(x / softcap)
        y = softcap * th
    else:
        y = x
    d = tl.exp2((y - lse) * _LOG2E) * coef_p
    d = tl.where(cols == t - col_start, d - (1.0 - smoothing) * scale, d)
    if SMOOTH:
        d -= smoothing / V * scale
    if HAS_SOFTCAP:
        d = d * (1.0 - th * th)
    # to_dtype: under Triton's interpreter a plain fp32 -> bf16 cast truncates (the GPU rounds
    # to nearest even), a bias toward 0 that the GEMMs after this kernel would add up
    tl.store(DX + row * stride_dn + cols * stride_dv, to_dtype(d, DX.dtype.element_ty), mask=mask)


def ce_grad_block(logits, target, lse, grad_scale, col_start: int, n_classes: int,
                  ignore_index: int, label_smoothing: float, z_loss: float,
                  softcap: float | None, out=None):
    """dloss/dlogits * grad_scale of the vocabulary block `logits` (n, c) = columns
    [col_start, col_start + c) of rows of width n_classes, from their lse (n,). Written into
    `out` (n, c; may be `logits` itself), a new tensor in logits' dtype when None."""
    n, width = logits.shape
    if out is None:
        out = torch.empty((n, width), dtype=logits.dtype, device=logits.device)
    if n == 0 or width == 0:
        return out
    block = min(triton.next_power_of_2(width), 1024)   # untuned: no GPU measured yet
    _ce_grad_block_kernel[(n, triton.cdiv(width, block))](
        logits, logits.stride(0), logits.stride(1), target, target.stride(0), lse,
        grad_scale, _scale_stride(grad_scale, n), out, out.stride(0), out.stride(1),
        width, col_start, n_classes, ignore_index,
        SMOOTH=label_smoothing > 0, HAS_SOFTCAP=softcap is not None,
        SMOOTHING=float(label_smoothing), Z_LOSS=float(z_loss), SOFTCAP=float(softcap or 1.0),
        BLOCK_V=block, num_warps=4,
    )
    return out
