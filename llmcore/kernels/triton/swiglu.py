"""SwiGLU of a fused [gate | up] projection, forward and backward (one launch each).

With x = [g | u] the two halves of a row's 2F values and s = sigmoid(g):
    y = silu(g) u = g s u
    dg = dy u s (1 + g (1 - s))      (d silu / dg = s + g s (1 - s))
    du = dy g s
Math in fp32 (fp64 for fp64), one rounding at the store. The backward reads x and dy and recomputes s, writing
dg and du into one (rows, 2F) gradient: nothing but x is kept between the passes.

Memory-bound elementwise kernels: a 2-D grid of (row block, column block) tiles over the R x F
outputs, the tiling of _elementwise (a few KB per program whatever F is; int64 row offsets).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from llmcore.kernels.triton._elementwise import acc_type, launch, tile
from llmcore.kernels.triton._interp import to_dtype as _to


@triton.jit
def _swiglu_fwd_kernel(X, Y, R, F, sx, ACC: tl.constexpr, BLOCK_M: tl.constexpr,
                       BLOCK_F: tl.constexpr):
    # grid (cdiv(R, BLOCK_M), cdiv(F, BLOCK_F)); X (R, 2F) row stride sx, Y (R, F) contiguous;
    # ACC the compute type (fp32, fp64 for fp64)
    rows, cols, mask = tile(tl.program_id(0), tl.program_id(1), R, F, BLOCK_M, BLOCK_F)
    x_ptrs = X + rows[:, None] * sx + cols[None, :]
    g = tl.load(x_ptrs, mask=mask, other=0.0).to(ACC)
    u = tl.load(x_ptrs + F, mask=mask, other=0.0).to(ACC)
    s = 1.0 / (1.0 + tl.exp(-g))
    y = g * s * u
    tl.store(Y + rows[:, None] * F + cols[None, :], _to(y, Y.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd_kernel(DY, X, DX, R, F, sdy, sx, ACC: tl.constexpr, BLOCK_M: tl.constexpr,
                       BLOCK_F: tl.constexpr):
    # dg = dy u s (1 + g (1 - s)), du = dy g s; DX (R, 2F) contiguous: [dg | du]
    rows, cols, mask = tile(tl.program_id(0), tl.program_id(1), R, F, BLOCK_M, BLOCK_F)
    x_ptrs = X + rows[:, None] * sx + cols[None, :]
    g = tl.load(x_ptrs, mask=mask, other=0.0).to(ACC)
    u = tl.load(x_ptrs + F, mask=mask, other=0.0).to(ACC)
    dy = tl.load(DY + rows[:, None] * sdy + cols[None, :], mask=mask, other=0.0).to(ACC)
    s = 1.0 / (1.0 + tl.exp(-g))
    dg = dy * u * s * (1.0 + g * (1.0 - s))
    du = dy * g * s
    dx_ptrs = DX + rows[:, None] * (2 * F) + cols[None, :]
    tl.store(dx_ptrs, _to(dg, DX.dtype.element_ty), mask=mask)
    tl.store(dx_ptrs + F, _to(du, DX.dtype.element_ty), mask=mask)


def swiglu_fwd(x: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up (R, F), contiguous in x's dtype, for x (R, 2F) = [gate | up] with unit
    column stride (any row stride). No input checks beyond what the kernel needs:
    llmcore.ops.swiglu checks."""
    R, F = x.shape[0], x.shape[1] // 2
    y = torch.empty((R, F), device=x.device, dtype=x.dtype)
    launch(_swiglu_fwd_kernel, R, F, x, y, R, F, x.stride(0), ACC=acc_type(x))
    return y


def swiglu_bwd(dy: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The gradient of x (R, 2F), contiguous, from dy (R, F) and x, both with unit column
    stride."""
    R, F = x.shape[0], x.shape[1] // 2
    dx = torch.empty((R, 2 * F), device=x.device, dtype=x.dtype)
    launch(_swiglu_bwd_kernel, R, F, dy, x, dx, R, F, dy.stride(0), x.stride(0), ACC=acc_type(x))
    return dx
