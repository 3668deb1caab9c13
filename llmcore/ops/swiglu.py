"""swiglu: the gated activation of a fused [gate | up] projection, and backend dispatch.

    y = llmcore.swiglu(x)          # x (..., 2F) -> (..., F) = silu(gate) * up

x holds the two halves [gate | up] along its last dim, the layout of llmcore's fused fc1
projection (and of Liger / Hugging Face fused gate_up_proj weights); silu(g) = g sigmoid(g).
The kernel backends compute in float32 (float64 for float64) and round once to x's dtype;
"torch" is the eager formula F.silu(gate) * up through chunk, exactly what the model ran
before this op existed.

Eager, that formula launches a silu and a multiply forward and saves silu(gate) for the
backward (an (N, F) activation per layer, ~32 MB per layer in bf16 at N = 8192, F = 2048);
its backward runs ~4 elementwise kernels and concatenates the two half gradients. The kernels
here are one launch each way: the backward reads x and dy, recomputes the sigmoid and writes
both halves of x's gradient into one (..., 2F) tensor; only x is saved.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from llmcore import backends
from llmcore.ops import _checks, _rowwise


def _check(x) -> None:
    _checks.floating("x", x)
    if x.dim() == 0 or x.shape[-1] % 2:
        raise ValueError(f"x must be (..., 2F): the [gate | up] halves along an even last dim, "
                         f"got shape {tuple(x.shape)}")


def swiglu(x, *, backend="auto"):
    """silu(gate) * up for x (..., 2F) = [gate | up]; see the module docstring."""
    if _native_fast is not None and backends.native_eager("swiglu", backend, x):
        y = _native_fast(x)
        if y is not None:
            return y
    _check(x)
    name = backends.resolve("swiglu", backend, x.device)
    impl = _SWIGLU.get(name)
    if impl is None:              # "native" from a build of llmcore._native older than swiglu
        raise backends.BackendUnavailableError(
            "this build of llmcore._native has no swiglu kernel; rebuild it (pip install -e .)")
    return impl(x)


def _torch_swiglu(x):
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


# ---------------------------------------------------------------------------- kernel backends
# Kernel ops on (rows, 2F) / (rows, F) matrices with a unit column stride: fwd(x) -> y and
# bwd(dy, x) -> dx, with fake impls.

def _fwd_fake(x):
    return x.new_empty((x.shape[0], x.shape[1] // 2))               # contiguous, as the kernels


def _bwd_fake(dy, x):
    return x.new_empty(x.shape)


# triton: kernels imported on first use (importing llmcore never imports triton)
def _triton_fwd(x):
    from llmcore.kernels.triton import swiglu as kernels
    return kernels.swiglu_fwd(x)


def _triton_bwd(dy, x):
    from llmcore.kernels.triton import swiglu as kernels
    return kernels.swiglu_bwd(dy, x)


@torch.library.custom_op("llmcore_triton::swiglu_fwd", mutates_args=())
def _triton_fwd_op(x: torch.Tensor) -> torch.Tensor:
    return _triton_fwd(x)


@torch.library.custom_op("llmcore_triton::swiglu_bwd", mutates_args=())
def _triton_bwd_op(dy: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return _triton_bwd(dy, x)


_triton_fwd_op.register_fake(_fwd_fake)
_triton_bwd_op.register_fake(_bwd_fake)
_rowwise.register_autograd(_triton_fwd_op, _triton_bwd_op)


def _triton_swiglu(x):
    return _rowwise.call(x, _triton_fwd, _triton_bwd, _triton_fwd_op)


# native: llmcore::swiglu (csrc/torch/swiglu_ops.cpp, CPU), a differentiable op of any shape
# whose autograd is C++ (as gelu's: a host cost near the eager formula's, which a Python
# autograd.Function cannot reach); the fakes of its kernel ops llmcore::swiglu_fwd / swiglu_bwd
# are registered here when the extension is loaded (an older build: no native swiglu). Eager
# calls reach it through llmcore._native.swiglu (the same dispatcher call without torch.ops'
# boxed argument parsing); torch.compile traces torch.ops.llmcore.swiglu.
def _native_swiglu(x):
    op = torch.ops.llmcore.swiglu.default if torch.compiler.is_compiling() else _native.swiglu
    return op(x)


_native = backends.native_module()             # loading it registers the C++ ops
# llmcore._native.swiglu_eager: the call on a CPU tensor with an even last dim, checked and
# run in one C++ call, None for anything else (csrc/torch/eager_entry.cpp); None when the
# build predates it.
_native_fast = getattr(_native, "swiglu_eager", None)


def _register_native() -> bool:
    if _native is None or not hasattr(_native, "swiglu"):
        return False
    torch.library.register_fake("llmcore::swiglu_fwd")(_fwd_fake)
    torch.library.register_fake("llmcore::swiglu_bwd")(_bwd_fake)
    return True


_SWIGLU = {"torch": _torch_swiglu, "triton": _triton_swiglu}
if _register_native():
    _SWIGLU["native"] = _native_swiglu
