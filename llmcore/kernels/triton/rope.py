"""Rotary position embedding of queries and keys in one launch (forward and backward).

Half-split convention (Llama / Hugging Face checkpoints): with x = (x1, x2) the two halves of a
head's D values and per-position tables cos = (c1, c2), sin = (s1, s2),
    y1 = x1 c1 - x2 s1,  y2 = x2 c2 + x1 s2         y = x cos + rotate_half(x) sin
and its transpose for the gradient (the tables carry none),
    dx1 = dy1 c1 + dy2 s2,  dx2 = dy2 c2 - dy1 s1   dx = dy cos + rotate_half^T(dy sin).
Math in fp32, one rounding at the store. One program per token rotates all its q and k heads,
reading the token's table row once.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from llmcore.kernels.triton._host import next_power_of_2
from llmcore.kernels.triton._interp import to_dtype as _to


@triton.jit
def _rotate_heads(X, Y, t, H, sx_t, sx_h, sy_t, sy_h, c1, c2, s1, s2, offs_d, d_ok, HALF,
                  BLOCK_H: tl.constexpr, BACKWARD: tl.constexpr):
    # every head of token t: X (.., H, 2 * HALF) -> Y, rotated (or its transpose)
    offs_h = tl.arange(0, BLOCK_H)
    ok = (offs_h[:, None] < H) & d_ok[None, :]
    x_ptrs = X + t * sx_t + offs_h[:, None] * sx_h + offs_d[None, :]       # (BLOCK_H, BLOCK_HALF)
    x1 = tl.load(x_ptrs, mask=ok, other=0.0).to(tl.float32)
    x2 = tl.load(x_ptrs + HALF, mask=ok, other=0.0).to(tl.float32)
    if BACKWARD:
        y1 = x1 * c1[None, :] + x2 * s2[None, :]
        y2 = x2 * c2[None, :] - x1 * s1[None, :]
    else:
        y1 = x1 * c1[None, :] - x2 * s1[None, :]
        y2 = x2 * c2[None, :] + x1 * s2[None, :]
    y_ptrs = Y + t * sy_t + offs_h[:, None] * sy_h + offs_d[None, :]
    tl.store(y_ptrs, _to(y1, Y.dtype.element_ty), mask=ok)
    tl.store(y_ptrs + HALF, _to(y2, Y.dtype.element_ty), mask=ok)


@triton.jit
def _rope_kernel(XQ, XK, YQ, YK, COS, SIN, R, HQ, HKV, HALF,
                 sxq_t, sxq_h, sxk_t, sxk_h, syq_t, syq_h, syk_t, syk_h,
                 BLOCK_HQ: tl.constexpr, BLOCK_HKV: tl.constexpr, BLOCK_HALF: tl.constexpr,
                 BACKWARD: tl.constexpr):
    # grid (tokens,): one program rotates every q and k head of one token, which uses table
    # row t % R (R rows of 2 * HALF values, contiguous), read once
    t = tl.program_id(0).to(tl.int64)
    row = t % R
    offs_d = tl.arange(0, BLOCK_HALF)
    d_ok = offs_d < HALF
    tab = row * 2 * HALF + offs_d
    c1 = tl.load(COS + tab, mask=d_ok, other=0.0).to(tl.float32)
    c2 = tl.load(COS + tab + HALF, mask=d_ok, other=0.0).to(tl.float32)
    s1 = tl.load(SIN + tab, mask=d_ok, other=0.0).to(tl.float32)
    s2 = tl.load(SIN + tab + HALF, mask=d_ok, other=0.0).to(tl.float32)
    _rotate_heads(XQ, YQ, t, HQ, sxq_t, sxq_h, syq_t, syq_h, c1, c2, s1, s2, offs_d, d_ok, HALF,
                  BLOCK_HQ, BACKWARD)
    _rotate_heads(XK, YK, t, HKV, sxk_t, sxk_h, syk_t, syk_h, c1, c2, s1, s2, offs_d, d_ok,
                  HALF, BLOCK_HKV, BACKWARD)


def rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *,
           backward: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(rotated q, rotated k); backward=True applies the transpose (the gradient).

    q (T, Hq, D), k (T, Hkv, D) with unit stride on D (any token and head strides); cos, sin
    (R, D) contiguous, T a multiple of R (token t uses row t % R). Outputs contiguous, in q's
    and k's dtypes. No input checks beyond what the kernel needs: llmcore.ops.rope checks."""
    T, hq, d = q.shape
    hkv = k.shape[1]
    yq = torch.empty((T, hq, d), device=q.device, dtype=q.dtype)
    yk = torch.empty((T, hkv, d), device=k.device, dtype=k.dtype)
    if T == 0 or d == 0:
        return yq, yk
    half = d // 2
    _rope_kernel[(T,)](
        q, k, yq, yk, cos, sin, cos.shape[0], hq, hkv, half,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1),
        yq.stride(0), yq.stride(1), yk.stride(0), yk.stride(1),
        BLOCK_HQ=next_power_of_2(hq), BLOCK_HKV=next_power_of_2(hkv),
        BLOCK_HALF=max(next_power_of_2(half), 2), BACKWARD=backward,
        num_warps=4 if (hq + hkv) * d >= 4096 else 2)
    return yq, yk
