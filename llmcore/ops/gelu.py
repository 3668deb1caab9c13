"""gelu: the GELU activation of an MLP, and backend dispatch.

    y = llmcore.gelu(x)                       # x * Phi(x), Phi the standard normal CDF
    y = llmcore.gelu(x, approximate="tanh")   # x * sigmoid(2 z), z = sqrt(2/pi) (x + 0.044715 x^3)

The arguments and results of torch.nn.functional.gelu, for any shape. The kernel backends
compute in float32 (float64 for float64) and round once to x's dtype; "torch" is F.gelu, what
the model ran before this op existed. The tanh form is computed as x sigmoid(2z), equal to
0.5 x (1 + tanh z) but without its cancellation for negative x (eager's fp32 result is 0 below
x ~ -5.5; the kernels keep ~5 digits down to the underflow). The exact form's error is, like
eager's, small in absolute terms (<= ~1e-7 max(1, |x|) in fp32) but not relative in the far
negative tail. Non-finite x: inf -> inf (eager's exact form returns nan), -inf and nan -> nan.

Eager F.gelu(approximate="tanh") on the CPU is bound by its tanh (~20x the time of a copy of
the same tensor on our 2-core machine); the native kernels use vmath.h's vectorised exp. The
backward recomputes from x: only x is saved, as eager does.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from llmcore import backends
from llmcore.ops import _checks, _rowwise

APPROXIMATE = ("none", "tanh")


def _check(x, approximate) -> None:
    _checks.floating("x", x)
    if approximate not in APPROXIMATE:
        raise ValueError(f"approximate must be 'none' or 'tanh', got {approximate!r}")


def gelu(x, approximate="none", *, backend="auto"):
    """GELU of x, elementwise, as F.gelu(x, approximate); see the module docstring."""
    if _native_fast is not None and backends.native_eager("gelu", backend, x):
        y = _native_fast(x, approximate)
        if y is not None:  # a CPU tensor and a valid `approximate`, checked and run in C++
            return y
    _check(x, approximate)
    name = backends.resolve("gelu", backend, x.device)
    impl = _GELU.get(name)
    if impl is None:              # "native" from a build of llmcore._native older than gelu
        raise backends.BackendUnavailableError(
            "this build of llmcore._native has no gelu kernel; rebuild it (pip install -e .)")
    return impl(x, approximate)


def _torch_gelu(x, approximate):
    return F.gelu(x, approximate=approximate)


# ---------------------------------------------------------------------------- kernel backends
# Kernel ops on (rows, cols) matrices with a unit column stride: fwd(x, approximate) -> y and
# bwd(dy, x, approximate) -> dx, with fake impls.

def _fwd_fake(x, approximate):
    return x.new_empty(x.shape)                          # contiguous, as the kernels


def _bwd_fake(dy, x, approximate):
    return x.new_empty(x.shape)


# triton: kernels imported on first use (importing llmcore never imports triton), through
# llmcore/ops/_rowwise.py's autograd; under torch.compile the custom ops
# llmcore_triton::gelu_fwd / _bwd with the same backward registered as the forward's autograd.
def _triton_fwd(x, approximate):
    from llmcore.kernels.triton import gelu as kernels
    return kernels.gelu_fwd(x, approximate)


def _triton_bwd(dy, x, approximate):
    from llmcore.kernels.triton import gelu as kernels
    return kernels.gelu_bwd(dy, x, approximate)


@torch.library.custom_op("llmcore_triton::gelu_fwd", mutates_args=())
def _triton_fwd_op(x: torch.Tensor, approximate: str) -> torch.Tensor:
    return _triton_fwd(x, approximate)


@torch.library.custom_op("llmcore_triton::gelu_bwd", mutates_args=())
def _triton_bwd_op(dy: torch.Tensor, x: torch.Tensor, approximate: str) -> torch.Tensor:
    return _triton_bwd(dy, x, approximate)


_triton_fwd_op.register_fake(_fwd_fake)
_triton_bwd_op.register_fake(_bwd_fake)
_rowwise.register_autograd(_triton_fwd_op, _triton_bwd_op)


def _triton_gelu(x, approximate):
    if x.dim() == 0:                   # one row of one (the kernels take matrices)
        return _triton_gelu(x.reshape(1), approximate).view(())
    return _rowwise.call(x, _triton_fwd, _triton_bwd, _triton_fwd_op, approximate)


# native: llmcore::gelu (csrc/torch/gelu_ops.cpp, CPU), a differentiable op of any shape whose
# autograd is C++ (a host cost near F.gelu's, which a Python autograd.Function cannot reach);
# the fakes of its kernel ops llmcore::gelu_fwd / gelu_bwd are registered here when the
# extension is loaded (an older build: no native gelu). Eager calls reach it through
# llmcore._native.gelu (the same dispatcher call without torch.ops' boxed argument parsing);
# torch.compile traces torch.ops.llmcore.gelu.
def _native_gelu(x, approximate):
    op = torch.ops.llmcore.gelu.default if torch.compiler.is_compiling() else _native.gelu
    return op(x, approximate)


_native = backends.native_module()             # loading it registers the C++ ops
# llmcore._native.gelu_eager: the call on a CPU tensor checked and run in one C++ call, None for
# anything else (csrc/torch/eager_entry.cpp); None when the build predates it.
_native_fast = getattr(_native, "gelu_eager", None)


def _register_native() -> bool:
    if _native is None or not hasattr(_native, "gelu"):
        return False
    torch.library.register_fake("llmcore::gelu_fwd")(_fwd_fake)
    torch.library.register_fake("llmcore::gelu_bwd")(_bwd_fake)
    return True


_GELU = {"torch": _torch_gelu, "triton": _triton_gelu}
if _register_native():
    _GELU["native"] = _native_gelu
