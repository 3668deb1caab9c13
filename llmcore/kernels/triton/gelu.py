"""GELU, exact (erf) or tanh-approximated as torch.nn.functional.gelu, forward and backward (one
launch each).

approximate="none", with Phi and phi the standard normal CDF and density:
    y  = x Phi(x),  Phi(x) = (1 + erf(x / sqrt 2)) / 2
    dx = dy (Phi(x) + x phi(x)),  phi(x) = exp(-x^2 / 2) / sqrt(2 pi)
approximate="tanh", with z = k0 (x + k1 x^3), k0 = sqrt(2 / pi), k1 = 0.044715:
    y  = x (1 + tanh z) / 2 = x s,  s = sigmoid(2z)
    dx = dy s (1 + 2 x (1 - s) z'),  z' = k0 (1 + 3 k1 x^2)
using (1 + tanh z) / 2 = sigmoid(2z) and 1 - tanh^2 z = 4 s (1 - s). The sigmoid is taken from
e = exp(-2|z|) <= 1: s = 1 / (1 + e) for z >= 0 and e / (1 + e) for z < 0, 1 - s the other
one, so neither s nor 1 - s comes from a cancelling 1 + tanh z for negative x.
Math in fp32 (fp64 for fp64), one rounding at the store. The backward reads x and dy and
recomputes Phi or s: nothing but x is kept between the passes.

Memory-bound elementwise kernels: a 2-D grid of (row block, column block) tiles over the R x F
elements, the tiling of _elementwise (a few KB per program whatever F is; int64 row offsets).
`approximate` is a constexpr: each launch compiles only its own formula.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from llmcore.kernels.triton._elementwise import acc_type, launch, tile
from llmcore.kernels.triton._interp import to_dtype as _to

_SQRT_2_OVER_PI = tl.constexpr(0.7978845608028654)  # k0
_TANH_CUBIC = tl.constexpr(0.044715)  # k1
_SQRT_HALF = tl.constexpr(0.7071067811865476)
_INV_SQRT_2PI = tl.constexpr(0.3989422804014327)


@triton.jit
def _sigmoid_2z(x):
    # (s, 1 - s, z') with s = sigmoid(2z), z = k0 (x + k1 x^3), z' = dz/dx
    x2 = x * x
    z = _SQRT_2_OVER_PI * x * (1.0 + _TANH_CUBIC * x2)
    e = tl.exp(-2.0 * tl.abs(z))
    big = 1.0 / (1.0 + e)                       # sigmoid(2|z|) in [1/2, 1]
    small = e * big                             # 1 - big, without the subtraction
    s = tl.where(z >= 0, big, small)
    sc = tl.where(z >= 0, small, big)
    dz = _SQRT_2_OVER_PI * (1.0 + 3.0 * _TANH_CUBIC * x2)
    return s, sc, dz


@triton.jit
def _normal_cdf(x):
    return 0.5 * (1.0 + tl.math.erf(x * _SQRT_HALF))


@triton.jit
def _gelu_fwd_kernel(X, Y, R, F, sx, APPROXIMATE: tl.constexpr, ACC: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_F: tl.constexpr):
    # grid (cdiv(R, BLOCK_M), cdiv(F, BLOCK_F)); X (R, F) row stride sx, Y (R, F) contiguous;
    # ACC the compute type (fp32, fp64 for fp64)
    rows, cols, mask = tile(tl.program_id(0), tl.program_id(1), R, F, BLOCK_M, BLOCK_F)
    x = tl.load(X + rows[:, None] * sx + cols[None, :], mask=mask, other=0.0).to(ACC)
    if APPROXIMATE == "tanh":
        s, _, _ = _sigmoid_2z(x)
        y = x * s
    else:
        y = x * _normal_cdf(x)
    tl.store(Y + rows[:, None] * F + cols[None, :], _to(y, Y.dtype.element_ty), mask=mask)


@triton.jit
def _gelu_bwd_kernel(DY, X, DX, R, F, sdy, sx, APPROXIMATE: tl.constexpr, ACC: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_F: tl.constexpr):
    # tanh: dx = dy s (1 + 2 x (1 - s) z');  none: dx = dy (Phi(x) + x phi(x));
    # DX (R, F) contiguous
    rows, cols, mask = tile(tl.program_id(0), tl.program_id(1), R, F, BLOCK_M, BLOCK_F)
    x = tl.load(X + rows[:, None] * sx + cols[None, :], mask=mask, other=0.0).to(ACC)
    dy = tl.load(DY + rows[:, None] * sdy + cols[None, :], mask=mask, other=0.0).to(ACC)
    if APPROXIMATE == "tanh":
        s, sc, dz = _sigmoid_2z(x)
        dx = dy * s * (1.0 + 2.0 * x * sc * dz)
    else:
        dx = dy * (_normal_cdf(x) + x * (_INV_SQRT_2PI * tl.exp(-0.5 * x * x)))
    tl.store(DX + rows[:, None] * F + cols[None, :], _to(dx, DX.dtype.element_ty), mask=mask)


def gelu_fwd(x: torch.Tensor, approximate: str) -> torch.Tensor:
    """gelu(x) (R, F), contiguous in x's dtype, for x (R, F) with unit column stride (any row
    stride); approximate "none" (erf) or "tanh". No input checks beyond what the kernel needs:
    llmcore.ops.gelu checks."""
    R, F = x.shape
    y = torch.empty((R, F), device=x.device, dtype=x.dtype)
    launch(_gelu_fwd_kernel, R, F, x, y, R, F, x.stride(0), APPROXIMATE=approximate,
           ACC=acc_type(x))
    return y


def gelu_bwd(dy: torch.Tensor, x: torch.Tensor, approximate: str) -> torch.Tensor:
    """The gradient of x (R, F), contiguous, from dy (R, F) and x, both with unit column
    stride (any row stride)."""
    R, F = x.shape
    dx = torch.empty((R, F), device=x.device, dtype=x.dtype)
    launch(_gelu_bwd_kernel, R, F, dy, x, dx, R, F, dy.stride(0), x.stride(0),
           APPROXIMATE=approximate, ACC=acc_type(x))
    return dx
