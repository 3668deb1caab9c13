"""The tiling and launch shared by the elementwise activation kernels (swiglu, gelu): R rows of
F columns, each tensor with unit column stride, cut into a 2-D grid of (row block, column
block) tiles of about TILE elements.

A program moves a few KB whatever F is (many rows per program for a narrow MLP, several programs
per row for a wide one), so a Llama-sized call (8192 x 14336) launches thousands of programs;
each thread loads runs of contiguous columns (16-byte vectors for bf16 at 8 elements per
thread). Row offsets in int64 (rows x 2F passes 2^31 at Llama sizes).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from llmcore.kernels.triton._host import cdiv, next_power_of_2

# Elements per program and the widest column block. Chosen by the arithmetic above, not yet
# tuned on a GPU (no measurement recorded).
TILE = 4096
MAX_BLOCK_F = 2048


@triton.jit
def tile(pid_m, pid_f, R, F, BLOCK_M: tl.constexpr, BLOCK_F: tl.constexpr):
    # the rows (int64), columns and in-bounds mask of tile (pid_m, pid_f)
    rows = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_f * BLOCK_F + tl.arange(0, BLOCK_F)
    mask = (rows[:, None] < R) & (cols[None, :] < F)
    return rows, cols, mask


def launch(kernel, R: int, F: int, *args, **constexprs):
    """kernel[grid](*args, BLOCK_M=, BLOCK_F=, num_warps=, **constexprs) over the tiles of R x F
    elements (nothing for an empty R x F); the kernel cuts its tile with `tile`."""
    if R == 0 or F == 0:
        return
    block_f = min(next_power_of_2(F), MAX_BLOCK_F)
    block_m = min(max(TILE // block_f, 1), next_power_of_2(R))
    warps = 8 if block_m * block_f >= TILE else 4      # a full tile: 16 elements a thread
    kernel[(cdiv(R, block_m), cdiv(F, block_f))](*args, BLOCK_M=block_m, BLOCK_F=block_f,
                                                 num_warps=warps, **constexprs)


def acc_type(x: torch.Tensor):
    """The compute type of the kernels for x: fp32, fp64 for fp64 inputs."""
    return tl.float64 if x.dtype == torch.float64 else tl.float32
