"""linear: F.linear on llmcore's CPU GEMM, and backend dispatch.

    y = llmcore.linear(x, weight, bias=None)    # x (..., in), weight (out, in), bias (out,)

The arguments and result of torch.nn.functional.linear. Backends: "native" (CPU): float32
through llmcore's own GEMM (csrc/cpu/gemm.cpp: packed panels of B, 8 x 32 register blocks of C
on AVX-512), forward and backward (dx = dy W, dW = dy^T x, db = sum dy); any other dtype, a
CPU without AVX-512 (never measured) and products of few rows go through at::mm's kernels, so
the op is total and only float32 on AVX-512 is faster. "torch": F.linear. There are no Triton
or CUDA kernels: on a GPU, "auto" is F.linear (cuBLAS), and the model calls this op only where
"auto" (or a named "native") picks native.

Under torch.autocast the call is F.linear (autocast casts it to bf16 / fp16, where the native
GEMM, float32, has nothing to add).

Each element of the result is summed by one thread in one fixed order, so the bits do not
depend on the thread count; they differ from F.linear's (another summation order) by fp32
roundings. Measured against MKL's sgemm on the CI VM in benchmarks/README.md ("the native
GEMM").
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from llmcore import backends
from llmcore.ops import _checks


def _check(input, weight, bias) -> None:
    _checks.floating("input", input)
    _checks.floating("weight", weight)
    if input.dim() < 1:
        raise ValueError("input must be at least 1-dimensional, got a 0-dim tensor")
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-dimensional (out, in), got shape "
                         f"{tuple(weight.shape)}")
    if weight.dtype != input.dtype:
        raise TypeError(f"weight must have input's dtype {input.dtype}, got {weight.dtype}")
    _checks.same_device("weight", weight, input)
    if weight.shape[1] != input.shape[-1]:
        raise ValueError(f"weight must have shape (out, {input.shape[-1]}) for input's last dim "
                         f"{input.shape[-1]}, got {tuple(weight.shape)}")
    if bias is not None:
        _checks.floating("bias", bias)
        if tuple(bias.shape) != (weight.shape[0],):
            raise ValueError(f"bias must have shape ({weight.shape[0]},), got "
                             f"{tuple(bias.shape)}")
        if bias.dtype != input.dtype:
            raise TypeError(f"bias must have input's dtype {input.dtype}, got {bias.dtype}")
        _checks.same_device("bias", bias, input)


def linear(input, weight, bias=None, *, backend="auto"):
    """input @ weight.T + bias, as F.linear(input, weight, bias); see the module docstring."""
    # is_cpu first: a tensor's .device builds a device object (a microsecond a call)
    if (isinstance(input, torch.Tensor)
            and torch.is_autocast_enabled("cpu" if input.is_cpu else input.device.type)
            and backend in ("auto", "native", "torch")):
        # autocast runs F.linear in its lower precision (bf16 / fp16), where the native GEMM
        # (float32) has nothing to add: F.linear, with autocast's casts, as before this op
        return F.linear(input, weight, bias)
    _check(input, weight, bias)
    name = backends.resolve("linear", backend, input.device)
    if name == "native":
        return _NativeLinear.apply(input, weight, bias)
    return F.linear(input, weight, bias)


# ---------------------------------------------------------------------------- native backend
# llmcore::gemm (csrc/torch/linear_ops.cpp): a (m, k) @ b (k, n) [+ bias] for any strides, the
# fake impl registered here when the extension is loaded. The autograd is this Python Function
# (not a C++ one: torch.utils.checkpoint's non-reentrant mode does not recompute a C++ Function
# that saves only its inputs when it ends the checkpointed region, and the model's blocks end
# with a projection); dynamo traces it under torch.compile, with gemm opaque. Eager calls reach
# gemm through llmcore._native.gemm (the dispatcher call without torch.ops' boxed argument
# parsing).

def _gemm(a, b, bias=None):
    op = torch.ops.llmcore.gemm.default if torch.compiler.is_compiling() else _native.gemm
    return op(a, b, bias)


class _NativeLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias):
        rows = x.reshape(-1, x.shape[-1])                 # (m, in), a view when it can be
        ctx.save_for_backward(rows, weight)
        ctx.has_bias = bias is not None
        ctx.set_materialize_grads(False)
        return _gemm(rows, weight.t(), bias).view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, dy):
        if dy is None:
            return None, None, None
        rows, weight = ctx.saved_tensors
        dy2 = dy.reshape(-1, dy.shape[-1])                # (m, out)
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            dx = _gemm(dy2, weight).view(*dy.shape[:-1], weight.shape[1])
        if ctx.needs_input_grad[1]:
            dw = _gemm(dy2.t(), rows)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            db = dy2.sum(0)
        return dx, dw, db


def _gemm_fake(a, b, bias=None):
    return a.new_empty((a.shape[0], b.shape[1]))          # contiguous, as the kernel's


def _gemm_into_fake(out, a, b, bias=None, accumulate=False):
    return None


_native = backends.native_module()


def _register_native() -> bool:
    if _native is None or not hasattr(_native, "gemm"):
        return False
    torch.library.register_fake("llmcore::gemm")(_gemm_fake)
    torch.library.register_fake("llmcore::gemm_into")(_gemm_into_fake)
    return True


NATIVE = _register_native()
