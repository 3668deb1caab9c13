"""A gap of the Triton interpreter (the CPU tests) shared by the kernel files: its fp32 -> bf16
cast truncates, where the GPU rounds to nearest even. `to_dtype` rounds by hand under the
interpreter only; compiled kernels take the plain cast. The flag is read once, at import, as
@triton.jit itself decides at decoration time whether a kernel is interpreted."""
from __future__ import annotations

import os

import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
_INTERPRETED = tl.constexpr(INTERPRET)


@triton.jit
def to_dtype(x, dtype: tl.constexpr):
    # fp32 x -> dtype, rounding to nearest even
    if _INTERPRETED and dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(dtype)
