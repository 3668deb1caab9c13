"""layer_norm and rms_norm: the public functions, input checks and backend dispatch.

With `residual`, both compute h = input + residual and return (norm(h), h): the pre-norm
residual add of a transformer block fused into the norm.
"""
from __future__ import annotations

import numbers
from typing import Optional

import torch

from llmcore import backends
from llmcore.kernels import reference
from llmcore.ops import _checks


def _check(input, normalized_shape, weight, bias, residual, eps,
           eps_may_be_none=False) -> tuple[int, ...]:
    _checks.floating("input", input)
    dims = _checks.normalized_shape(normalized_shape, input)
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None:
            _checks.floating(name, t)
            _checks.shape(name, t, dims)
            _checks.same_device(name, t, input)
            # input's dtype, or float32: the mixed-precision layout of half-precision models
            # (float32 parameters, bfloat16/float16 activations), which every backend applies
            # in float32 and rounds once; a float64 input takes its float32 parameters exactly
            if t.dtype != input.dtype and t.dtype != torch.float32:
                raise TypeError(f"{name} must have input's dtype {input.dtype} or be float32, "
                                f"got {t.dtype}")
    if eps is not None or not eps_may_be_none:
        if type(eps) is not float and (isinstance(eps, bool) or not isinstance(eps, numbers.Real)):
            raise TypeError(f"eps must be a float{' or None' if eps_may_be_none else ''}, "
                            f"got {eps!r}")
        if not eps >= 0:  # also refuses nan
            raise ValueError(f"eps must be >= 0, got {eps!r}")
    if residual is not None:
        _checks.floating("residual", residual)
        _checks.shape("residual", residual, input.shape)
        _checks.same_device("residual", residual, input)
        _checks.same_dtype("residual", residual, input)
    return dims


def layer_norm(input, normalized_shape, weight=None, bias=None, eps=1e-5, *, residual=None,
               backend="auto"):
    """Layer normalisation over the trailing `normalized_shape` dims, like F.layer_norm.

    weight and bias have input's dtype or are float32 (applied in float32, the output rounded
    once to input's dtype); eps >= 0. With `residual`, returns (layer_norm(input + residual),
    input + residual)."""
    if _norm_eager is not None and backends.native_eager("norm", backend, input):
        out = _norm_eager(input, normalized_shape, weight, bias, eps, residual, False)
        if out is not None:  # the ordinary call on CPU tensors, checked and run in C++
            return out
    dims = _check(input, normalized_shape, weight, bias, residual, eps)
    name = backends.resolve("norm", backend, input.device)
    return _LAYER_NORM[name](input, dims, weight, bias, float(eps), residual)


def rms_norm(input, normalized_shape, weight=None, eps=None, *, residual=None, backend="auto"):
    """RMS normalisation over the trailing `normalized_shape` dims, like F.rms_norm
    (eps=None means torch.finfo(input.dtype).eps; else eps >= 0). weight has input's dtype or
    is float32, as for layer_norm.

    With `residual`, returns (rms_norm(input + residual), input + residual)."""
    if _norm_eager is not None and backends.native_eager("norm", backend, input):
        out = _norm_eager(input, normalized_shape, weight, None, eps, residual, True)
        if out is not None:
            return out
    dims = _check(input, normalized_shape, weight, None, residual, eps, eps_may_be_none=True)
    if eps is None:
        eps = torch.finfo(input.dtype).eps
    name = backends.resolve("norm", backend, input.device)
    return _RMS_NORM[name](input, dims, weight, float(eps), residual)


# Backend -> implementation. Kernel backends add their entries below as they land.
_LAYER_NORM = {"torch": reference.layer_norm}
_RMS_NORM = {"torch": reference.rms_norm}


# ---------------------------------------------------------------------------- the backward
# One backward for the norm family's Python autograd (the Triton eager Function and the Triton
# custom op that torch.compile sees); the native ops run the same math with their autograd in
# C++ (csrc/torch/norm_ops.cpp). Saved: h (x + residual, or x itself), weight, and the per-row
# fp32 statistics mean (layer norm) and rstd -- nothing else, and no zero-filled gradients for
# outputs nobody differentiates (materialize_grads is off: an unused output's gradient is None).

def _stat_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _norm_save(ctx, x, residual, weight, bias, rms, h, mean, rstd) -> None:
    ctx.set_materialize_grads(False)
    ctx.rms = rms
    ctx.has_residual = residual is not None
    ctx.weight_dtype = None if weight is None else weight.dtype
    ctx.bias_dtype = None if bias is None else bias.dtype
    ctx.save_for_backward(h if residual is not None else x, weight, mean, rstd)


def _norm_grads(ctx, dy, dh, norm_bwd):
    """(dx, dresidual, dweight, dbias) from the gradients of y and h; `norm_bwd` is a backend's
    norm_bwd(dy, dh, h, weight, mean, rstd, rms, weight_grad, bias_grad)."""
    h, weight, mean, rstd = ctx.saved_tensors
    x_needed, res_needed, dw_needed, db_needed = ctx.needs_input_grad[:4]
    dh = dh if ctx.has_residual else None
    if dy is None:  # only h was used: its gradient flows straight to x and residual
        return (dh if x_needed else None), (dh if res_needed else None), None, None
    dx, dw, db = norm_bwd(dy, dh, h, weight, mean, rstd, ctx.rms, bool(dw_needed),
                          bool(db_needed))
    # the eager launchers round dweight/dbias to the parameters' dtypes already (the registered
    # op returns them in the statistics' dtype): a .to() with nothing to convert still costs
    # about a microsecond
    if dw_needed and dw.dtype != ctx.weight_dtype:
        dw = dw.to(ctx.weight_dtype)
    if db_needed and db.dtype != ctx.bias_dtype:
        db = db.to(ctx.bias_dtype)
    return ((dx if x_needed else None), (dx if res_needed else None),
            dw if dw_needed else None, db if db_needed else None)


def _rows_cols(x, dims) -> tuple[int, int]:
    cols = 1
    for d in dims:
        cols *= d
    return x.shape[:x.dim() - len(dims)].numel(), cols


# ---------------------------------------------------------------------------- native backend
# llmcore::norm (csrc/torch/norm_ops.cpp) is differentiable in C++: it flattens x to the
# kernels' (rows, cols) matrix, runs llmcore::norm_fwd, and records a C++ autograd node whose
# backward runs llmcore::norm_bwd. One op call from Python, for eager and torch.compile alike.
# Here: the fake impls of the two kernel ops (torch.compile and meta tensors trace llmcore::norm
# down to them). The kernels see a (rows, cols) matrix; mean and rstd are per-row statistics
# in fp32 (fp64 for fp64 inputs), the only state kept for backward.

# Both backends' kernel ops return contiguous outputs whatever x's strides (the native ones
# from a contiguous copy, the Triton launchers reading strided rows), so one pair of fakes
# serves both; empty_like would keep the strides of a dense transposed x.
def _norm_fwd_fake(x, residual, weight, bias, eps, rms):
    rows, cols = x.shape
    stat = _stat_dtype(x)
    h = x.new_empty((rows, cols)) if residual is not None else x.new_empty((0,))
    return (x.new_empty((rows, cols)), h, x.new_empty((0 if rms else rows,), dtype=stat),
            x.new_empty((rows,), dtype=stat))


def _norm_bwd_fake(dy, dh, h, weight, mean, rstd, rms, weight_grad, bias_grad):
    rows, cols = h.shape
    stat = _stat_dtype(h)
    return (h.new_empty((rows, cols)), h.new_empty((cols if weight_grad else 0,), dtype=stat),
            h.new_empty((cols if bias_grad else 0,), dtype=stat))


_native_norm = None  # llmcore._native.norm: llmcore::norm's eager entry point (see ops.cpp)
# llmcore._native.norm_eager: layer_norm's and rms_norm's ordinary call (CPU tensors, one
# normalised dim, options of the usual types) checked and run in one C++ call; it returns None
# for anything else, which takes the path below (csrc/torch/eager_entry.cpp). None when the
# build predates it.
_norm_eager = None


def _register_native() -> bool:
    global _native_norm, _norm_eager
    native = backends.native_module()
    if native is None:  # loading it registers the C++ ops
        return False
    torch.library.register_fake("llmcore::norm_fwd")(_norm_fwd_fake)
    torch.library.register_fake("llmcore::norm_bwd")(_norm_bwd_fake)
    _native_norm = native.norm
    _norm_eager = getattr(native, "norm_eager", None)
    return True


def _native_norm_op(x, residual, weight, bias, norm_ndim, eps, rms):
    # the same op either way; dynamo traces torch.ops, eager calls skip its boxed argument path
    norm = torch.ops.llmcore.norm.default if torch.compiler.is_compiling() else _native_norm
    y, h = norm(x, residual, weight, bias, norm_ndim, eps, rms)
    return y if residual is None else (y, h)


def _native_layer_norm(x, dims, weight, bias, eps, residual):
    return _native_norm_op(x, residual, weight, bias, len(dims), eps, False)


def _native_rms_norm(x, dims, weight, eps, residual):
    return _native_norm_op(x, residual, weight, None, len(dims), eps, True)


if _register_native():
    _LAYER_NORM["native"] = _native_layer_norm
    _RMS_NORM["native"] = _native_rms_norm


# ---------------------------------------------------------------------------- triton backend
# Eager calls go through _TritonNorm, a plain autograd.Function that launches the kernels of
# llmcore/kernels/triton/norm.py directly: the host cost of a call is the launches and little
# else; with nothing to differentiate, the forward kernel alone (no Function, no statistics).
# torch.compile sees the same kernels as two torch.library custom ops, llmcore_triton::norm_fwd
# / norm_bwd (opaque to dynamo; fake impls for tracing), whose autograd is the same _norm_save /
# _norm_grads. custom_ops rather than triton_ops: triton_op
# traces its body with FakeTensors, which the Triton interpreter that runs these kernels on CPU
# tensors cannot take. The kernel module is imported on first call, so importing llmcore never
# imports triton. Outputs are always contiguous.

_triton_norm_kernels = None  # llmcore.kernels.triton.norm, once imported


def _triton_kernels():
    # a module global after the first call: an import statement costs a microsecond per call
    global _triton_norm_kernels
    if _triton_norm_kernels is None:
        from llmcore.kernels.triton import norm as kernels
        _triton_norm_kernels = kernels
    return _triton_norm_kernels


class _TritonNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, residual, weight, bias, eps, rms):
        # x, residual (M, N); weight, bias (N,) -> y (M, N), h (M, N) or None
        y, h, mean, rstd = _triton_kernels().norm_fwd(x, residual, weight, bias, eps, rms)
        _norm_save(ctx, x, residual, weight, bias, rms, h, mean, rstd)
        return y, h

    @staticmethod
    def backward(ctx, dy, dh):
        kernels = _triton_kernels()

        def norm_bwd(*args):  # the partial sums are rounded straight to the parameters' dtypes
            return kernels.norm_bwd(*args, weight_dtype=ctx.weight_dtype,
                                    bias_dtype=ctx.bias_dtype)
        return _norm_grads(ctx, dy, dh, norm_bwd) + (None, None)


@torch.library.custom_op("llmcore_triton::norm_fwd", mutates_args=())
def _triton_norm_fwd(x: torch.Tensor, residual: Optional[torch.Tensor],
                     weight: Optional[torch.Tensor], bias: Optional[torch.Tensor], eps: float,
                     rms: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    # x, residual (M, N); weight, bias (N,) -> y (M, N), h (M, N) or (0,) without residual,
    # mean (M,) or (0,) for rms, rstd (M,)
    y, h, mean, rstd = _triton_kernels().norm_fwd(x, residual, weight, bias, eps, rms)
    return (y, x.new_empty((0,)) if h is None else h,
            rstd.new_empty((0,)) if mean is None else mean, rstd)


@torch.library.custom_op("llmcore_triton::norm_bwd", mutates_args=())
def _triton_norm_bwd(dy: torch.Tensor, dh: Optional[torch.Tensor], h: torch.Tensor,
                     weight: Optional[torch.Tensor], mean: torch.Tensor, rstd: torch.Tensor,
                     rms: bool, weight_grad: bool, bias_grad: bool
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # -> dx (M, N), dweight (N,) or (0,), dbias (N,) or (0,); dweight/dbias in rstd's dtype
    dx, dw, db = _triton_kernels().norm_bwd(dy, dh, h, weight, None if rms else mean, rstd,
                                            rms, weight_grad, bias_grad)
    return (dx, dw if dw is not None else rstd.new_empty((0,)),
            db if db is not None else rstd.new_empty((0,)))


_triton_norm_fwd.register_fake(_norm_fwd_fake)
_triton_norm_bwd.register_fake(_norm_bwd_fake)


def _triton_norm_op_setup(ctx, inputs, output):
    x, residual, weight, bias, _eps, rms = inputs
    _y, h, mean, rstd = output
    _norm_save(ctx, x, residual, weight, bias, rms, h, mean, rstd)


def _triton_norm_op_backward(ctx, dy, dh, _dmean, _drstd):
    return _norm_grads(ctx, dy, dh, _triton_norm_bwd) + (None, None)


_triton_norm_fwd.register_autograd(_triton_norm_op_backward, setup_context=_triton_norm_op_setup)


def _triton_norm(x, dims, weight, bias, eps, residual, rms):
    kernels = _triton_kernels()
    # the usual call, (rows, cols) input over one normalised dim, runs on the tensors as given:
    # each reshape or view is an op (and an autograd node) of about a microsecond
    flat = x.dim() != 2 or len(dims) != 1
    if flat:
        rows, cols = _rows_cols(x, dims)
    else:
        rows, cols = x.shape
    # before any tracing or launch: rows longer than the kernels hold raise a clear error
    kernels.check_row_size(cols, x.dtype, "rms_norm" if rms else "layer_norm")
    if flat:
        # views when possible; (rows, cols) spelled out, as reshape(-1, 0) cannot infer rows
        x2 = x.reshape(rows, cols)
        r2 = None if residual is None else residual.reshape(rows, cols)
        w1 = None if weight is None else weight.reshape(cols)
        b1 = None if bias is None else bias.reshape(cols)
    else:
        x2, r2, w1, b1 = x, residual, weight, bias
    if torch.compiler.is_compiling():
        y, h, _mean, _rstd = _triton_norm_fwd(x2, r2, w1, b1, eps, rms)
    elif torch.is_grad_enabled() and (
            x.requires_grad or (residual is not None and residual.requires_grad)
            or (weight is not None and weight.requires_grad)
            or (bias is not None and bias.requires_grad)):
        y, h = _TritonNorm.apply(x2, r2, w1, b1, eps, rms)
    else:
        # nothing to differentiate (inference, evaluation): the kernel alone, with no autograd
        # node (an autograd.Function call costs more than the rest of the op) and no statistics
        y, h, _mean, _rstd = kernels.norm_fwd(x2, r2, w1, b1, eps, rms, stats=False)
    if flat:
        # view_as: a view to a torch.Size costs several times more host time than this
        y = y.view_as(x)
        h = None if h is None else h.view_as(x)
    return y if residual is None else (y, h)


def _triton_layer_norm(x, dims, weight, bias, eps, residual):
    return _triton_norm(x, dims, weight, bias, eps, residual, False)


def _triton_rms_norm(x, dims, weight, eps, residual):
    return _triton_norm(x, dims, weight, None, eps, residual, True)


_LAYER_NORM["triton"] = _triton_layer_norm
_RMS_NORM["triton"] = _triton_rms_norm
