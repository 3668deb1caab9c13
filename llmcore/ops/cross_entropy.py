"""cross_entropy and linear_cross_entropy: the public functions, input checks and backend
dispatch, and the token-chunk loop that keeps linear_cross_entropy's memory bounded.
The semantics every backend must match are in cross_entropy's docstring.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from llmcore import backends
from llmcore.kernels import reference
from llmcore.ops import _checks

REDUCTIONS = ("none", "mean", "sum")

# Rows of one linear_cross_entropy chunk: its fp32 logits stay within 64 MiB (2**24 floats).
_CHUNK_ELEMENTS = 1 << 24
_CUDA_CHUNK_BYTES = 512 << 20         # cap of a CUDA chunk's fp32 logits


# ---------------------------------------------------------------------------- input checks

def _check_options(ignore_index, reduction, label_smoothing, z_loss, softcap) -> None:
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {ignore_index!r}")
    _checks.choice("reduction", reduction, REDUCTIONS)
    if not isinstance(label_smoothing, (int, float)) or not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must be a float in [0, 1], got {label_smoothing!r}")
    if not isinstance(z_loss, (int, float)) or not z_loss >= 0.0:
        raise ValueError(f"z_loss must be a float >= 0, got {z_loss!r}")
    if softcap is not None and (not isinstance(softcap, (int, float)) or not softcap > 0.0):
        raise ValueError(f"softcap must be None or a float > 0, got {softcap!r}")


def _check_target(target, expected_shape, n_classes, ignore_index, input,
                  check_range=True) -> None:
    """target: integer class indices of `expected_shape`, each in [0, n_classes) or ignore_index.

    The range check reads the values: on the CPU it raises a ValueError here; on other devices,
    and under torch.compile, it is an asynchronous assert (torch._assert_async): no host sync and
    no graph break, but on CUDA a bad target surfaces as a device error at a later sync. It costs
    ~6 small kernels on CUDA. check_range=False leaves it to a backend that checks in its CUDA
    kernel: native (a device-side assert), and the eager Triton route (the kernel reports a bad
    target as nan in the per-row w[t] it writes anyway: see _assert_targets)."""
    _checks.tensor("target", target)
    if target.dtype.is_floating_point and tuple(target.shape) == tuple(input.shape):
        raise TypeError(
            "target must be an integer tensor of class indices; class-probability targets "
            f"(a floating target of input's shape) are not supported, got dtype {target.dtype}"
        )
    _checks.integer("target", target)
    _checks.shape("target", target, expected_shape)
    _checks.same_device("target", target, input)
    if not check_range:
        return
    message = f"target values must be in [0, {n_classes}) or equal ignore_index={ignore_index}"
    if target.device.type == "cpu" and not torch.compiler.is_compiling():
        if _native_check_targets is not None:       # one C++ pass, raises this same ValueError
            _native_check_targets(target, n_classes, ignore_index)
            return
        # through numpy (a view, no copy): a few us against ~9 us for 6 torch ops
        t = target.numpy()
        bad = (t != ignore_index) & ((t < 0) | (t >= n_classes))
        if bad.any():
            raise ValueError(f"{message}, got {int(t[bad][0])}")
    else:
        ok = ((target >= 0) & (target < n_classes)) | (target == ignore_index)
        torch._assert_async(ok.all(), message)


def _check_cross_entropy(input, target, weight, ignore_index, reduction, label_smoothing,
                         z_loss, softcap, check_range=True) -> None:
    _checks.floating("input", input)
    if input.dim() == 0:
        raise ValueError("input must be (C,), (N, C) or (N, C, d1, ...) logits, got a 0-dim tensor")
    class_dim = 1 if input.dim() > 1 else 0
    n_classes = input.shape[class_dim]
    if n_classes == 0:
        raise ValueError(f"input must have at least one class (dim {class_dim}), got shape "
                         f"{tuple(input.shape)}")
    _check_options(ignore_index, reduction, label_smoothing, z_loss, softcap)
    if weight is not None:
        _checks.floating("weight", weight)
        _checks.shape("weight", weight, (n_classes,))
        _checks.same_device("weight", weight, input)
        # input's dtype, or float32: the class weights of a half-precision model, which every
        # backend applies in float32 (as the norms take float32 parameters)
        if weight.dtype != input.dtype and weight.dtype != torch.float32:
            raise TypeError(f"weight must have input's dtype {input.dtype} or be float32, got "
                            f"{weight.dtype}")
    expected = input.shape[:1] + input.shape[2:] if input.dim() > 1 else ()
    _check_target(target, expected, n_classes, ignore_index, input, check_range)


def _check_linear_cross_entropy(input, weight, target, bias, ignore_index, reduction,
                                label_smoothing, z_loss, softcap, chunk_size) -> None:
    _checks.floating("input", input)
    if input.dim() == 0:
        raise ValueError("input must be (..., H) hidden states, got a 0-dim tensor")
    hidden = input.shape[-1]
    _checks.floating("weight", weight)
    if weight.dim() != 2 or weight.shape[1] != hidden or weight.shape[0] == 0:
        raise ValueError(f"weight must have shape (V, {hidden}) with V >= 1 (H = input.shape[-1]),"
                         f" got {tuple(weight.shape)}")
    _checks.same_device("weight", weight, input)
    _checks.same_dtype("weight", weight, input)
    if bias is not None:
        _checks.floating("bias", bias)
        _checks.shape("bias", bias, weight.shape[:1])
        _checks.same_device("bias", bias, input)
        _checks.same_dtype("bias", bias, input)
    _check_options(ignore_index, reduction, label_smoothing, z_loss, softcap)
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int)
                                   or chunk_size < 1):
        raise ValueError(f"chunk_size must be None or an int >= 1, got {chunk_size!r}")
    _check_target(target, input.shape[:-1], weight.shape[0], ignore_index, input)


# ---------------------------------------------------------------------------- public functions

def cross_entropy(input, target, weight=None, ignore_index=-100, reduction="mean",
                  label_smoothing=0.0, *, z_loss=0.0, softcap=None, inplace_backward=False,
                  backend="auto"):
    """Cross-entropy of logits `input` against class indices `target`, like F.cross_entropy.

    input: (C,), (N, C) or (N, C, d1, ...) logits; target: integer class indices of input's shape
    without the class dim (class-probability targets are refused). weight: optional (C,) class
    weights, in input's dtype or float32. Extras (keyword-only): `z_loss` adds
    z_loss * logsumexp(logits)^2 per valid token; `softcap` caps the logits to
    softcap*tanh(logits/softcap) before everything else. With z_loss=0 and softcap=None the
    result is F.cross_entropy's.

    Semantics, shared by every backend (C classes, t_i the target of token i, w the class weight,
    w[c] = 1 without one, e = label_smoothing, valid = target != ignore_index):

        y_i    = softcap * tanh(logits_i / softcap)      (y_i = logits_i when softcap is None)
        lse_i  = logsumexp_c y_ic,   logp_ic = y_ic - lse_i
        ce_i   = (1-e) w[t_i] (-logp_it) + (e/C) sum_c w[c] (-logp_ic)
        z_i    = z_loss lse_i^2
        loss_i = ce_i + z_i for valid tokens, 0 for ignored ones

        "none": loss_i (target's shape).  "sum": sum_i loss_i.
        "mean": sum_i ce_i / sum_{valid i} w[t_i]  +  sum_i z_i / n_valid

    ce is exactly F.cross_entropy's, with its denominator (also for the label-smoothing term).
    The z-loss term is not class-weighted and is averaged over the valid tokens, as the peers
    (Liger-Kernel, PaLM's z-loss) do; with no class weight both denominators are n_valid, so
    "mean" is sum_i loss_i / n_valid. When every token is ignored (or the batch is empty) "mean"
    is nan and "sum" is 0, as with F.cross_entropy, and all gradients are 0. float16/bfloat16
    logits are reduced in float32 (with a float32 class weight as given) and rounded once.

    Target values are checked: a ValueError on CPU tensors; on CUDA (and under torch.compile)
    a device-side assert (in the native kernel; an asynchronous assert before the Triton
    kernels), so no host sync.

    inplace_backward=True allows a kernel backend to write the gradient into `input`'s own
    buffer during the forward, saving an (N, C) allocation: pass it only when nothing reads the
    logits after the loss, and backpropagate once. Backends that cannot do it (torch, native)
    compute as usual; the values and gradients are the same either way."""
    if not isinstance(inplace_backward, bool):
        raise TypeError(f"inplace_backward must be a bool, got {inplace_backward!r}")
    _checks.tensor("input", input)
    name = backends.resolve("cross_entropy", backend, input.device)
    # every CPU call is checked here; on CUDA the native kernel asserts the target range itself,
    # and the eager Triton route checks what its kernel reports (_assert_targets)
    check_range = input.device.type == "cpu" or not (
        name == "native" or (name == "triton" and not torch.compiler.is_compiling()))
    _check_cross_entropy(input, target, weight, ignore_index, reduction, label_smoothing,
                         z_loss, softcap, check_range)
    # backends receive int64 class indices (a no-op for the usual int64 target)
    extra = {"inplace_backward": True} if inplace_backward and name in _INPLACE_BACKWARD else {}
    return _CROSS_ENTROPY[name](input, target.long(), weight, ignore_index, reduction,
                                float(label_smoothing), float(z_loss),
                                None if softcap is None else float(softcap), **extra)


def linear_cross_entropy(input, weight, target, bias=None, ignore_index=-100, reduction="mean",
                         label_smoothing=0.0, *, z_loss=0.0, softcap=None, chunk_size=None,
                         backend="auto"):
    """cross_entropy(F.linear(input, weight, bias), target, ...) without ever holding the whole
    (N, V) logits: tokens are processed `chunk_size` rows at a time, forward and backward.

    input: (..., H) hidden states; weight: (V, H) (the LM head); bias: optional (V,); target:
    (...) class indices. Same options and semantics as cross_entropy (no class weight).
    chunk_size: rows per chunk; None picks one whose fp32 logits fit in 64 MiB."""
    _check_linear_cross_entropy(input, weight, target, bias, ignore_index, reduction,
                                label_smoothing, z_loss, softcap, chunk_size)
    name = backends.resolve("cross_entropy", backend, input.device)
    hidden = weight.shape[1]
    x = input.reshape(input.shape[:-1].numel(), hidden)              # (N, H); H may be 0
    t = target.reshape(-1).long()                                    # (N,) int64
    if chunk_size is None:
        chunk_size = default_chunk_size(x.shape[0], weight.shape[0], x.device)
    out = _LINEAR_CROSS_ENTROPY[name](x, weight, t, bias, ignore_index, reduction,
                                      float(label_smoothing), float(z_loss),
                                      None if softcap is None else float(softcap), chunk_size)
    return out.reshape(target.shape) if reduction == "none" else out


def default_chunk_size(n_rows: int, n_classes: int, device=None) -> int:
    """Rows per linear_cross_entropy chunk, a multiple of 8 rows when that allows, never more
    than the rows there are. The chunk's fp32 logits get a budget: 64 MiB on the CPU (the
    chunk stays near the caches); on CUDA a quarter of the free device memory, capped at
    512 MiB, so that a chunk's matmuls stay large enough to run at full speed (at V = 128k,
    1024 rows) while peak memory stays a small fraction of eager's (N, V) logits."""
    budget = _CHUNK_ELEMENTS
    if device is not None and torch.device(device).type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)   # a driver query, no stream sync
        budget = max(_CHUNK_ELEMENTS, min(_CUDA_CHUNK_BYTES, free // 4) // 4)
    rows = max(1, budget // max(n_classes, 1))
    if rows >= 8:
        rows -= rows % 8
    return max(1, min(rows, n_rows))


# ---------------------------------------------------------------------------- the chunk loop

def _chunk_grads(dlogits, xc, weight, dx_out, dweight, dbias) -> None:
    """Adds one chunk's share of the gradients, given dlogits = dloss/dlogits (n, V):
    dx = dlogits @ W (rows of this chunk, in input's dtype, like eager autograd), and into the
    float32 accumulators dW += dlogits^T @ x_chunk (V, H) and db += sum_rows dlogits (V,)."""
    if dx_out is not None:
        torch.mm(dlogits.to(weight.dtype), weight, out=dx_out)
    if dweight is not None:
        dweight.addmm_(dlogits.t().to(dweight.dtype), xc.to(dweight.dtype))
    if dbias is not None:
        dbias.add_(dlogits.sum(0).to(dbias.dtype))


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """The loop over token chunks, generic over `rows_fn`, a backend's per-chunk kernel with
    reference.cross_entropy_rows's contract. Per chunk: logits = x_c W^T + b (n, V), then
    rows_fn gives the per-row loss and dlogits; nothing of size (N, V) is ever kept.

    "mean"/"sum": the forward also computes the gradients (dlogits scaled by 1/n_valid or 1) and
    saves only dx (N, H), dW (V, H), db (V,); backward scales them by the scalar grad_output.
    "none": per-row grad_outputs are only known in backward, so backward recomputes each chunk's
    logits from the saved x, W, b, target."""

    @staticmethod
    def forward(ctx, x, weight, bias, target, rows_fn, config):
        # config: ((ignore_index, label_smoothing, z_loss, softcap), reduction, chunk_size,
        # need_grad) -- plain values, one argument so backward returns few Nones
        options, reduction, chunk_size, need_grad = config
        ignore_index = options[0]
        n_rows = x.shape[0]
        acc = torch.promote_types(x.dtype, torch.float32)
        n_valid = (target != ignore_index).sum()                      # 0-dim, stays on device
        eager = need_grad and reduction != "none"
        dx = dweight = dbias = None
        scale = None
        if eager:
            # "mean": 1/n_valid (inf when no token is valid; every row's scale is then masked
            # to 0, so the gradients are 0 as with F.cross_entropy)
            scale = n_valid.to(acc).reciprocal() if reduction == "mean" else x.new_ones((), dtype=acc)
            if ctx.needs_input_grad[0]:
                dx = x.new_empty(x.shape)                             # (N, H)
            if ctx.needs_input_grad[1]:
                dweight = weight.new_zeros(weight.shape, dtype=acc)   # (V, H) fp32 accumulator
            if bias is not None and ctx.needs_input_grad[2]:
                dbias = bias.new_zeros(bias.shape, dtype=acc)         # (V,)
        losses = x.new_empty((n_rows,), dtype=acc)                    # (N,)
        for start in range(0, n_rows, chunk_size):
            end = min(start + chunk_size, n_rows)
            xc = x[start:end]                                         # (n, H)
            logits = F.linear(xc, weight, bias)                       # (n, V)
            loss, dlogits = rows_fn(logits, target[start:end], *options, grad_scale=scale)
            losses[start:end] = loss
            if eager:
                _chunk_grads(dlogits, xc, weight, None if dx is None else dx[start:end],
                             dweight, dbias)
        if reduction == "none":
            out = losses
            ctx.save_for_backward(x, weight, bias, target)
        elif reduction == "sum":
            out = losses.sum()
            ctx.save_for_backward(dx, dweight, dbias)
        else:
            out = losses.sum() / n_valid
            ctx.save_for_backward(dx, dweight, dbias)
        ctx.rows_fn, ctx.config = rows_fn, config
        ctx.dtypes = (x.dtype, None if bias is None else bias.dtype)
        return out.to(x.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        options, reduction, chunk_size, _ = ctx.config
        dtype, bias_dtype = ctx.dtypes
        want_dx, want_dw, want_db = ctx.needs_input_grad[:3]
        if reduction != "none":
            dx, dweight, dbias = ctx.saved_tensors
            g = grad_out.to(torch.promote_types(dtype, torch.float32))    # 0-dim
            dx = dx * grad_out if want_dx else None
            dweight = (dweight * g).to(dtype) if want_dw else None
            dbias = (dbias * g).to(bias_dtype) if want_db else None
            return dx, dweight, dbias, None, None, None
        x, weight, bias, target = ctx.saved_tensors
        acc = torch.promote_types(dtype, torch.float32)
        dx = x.new_empty(x.shape) if want_dx else None
        dweight = weight.new_zeros(weight.shape, dtype=acc) if want_dw else None
        dbias = bias.new_zeros(bias.shape, dtype=acc) if want_db else None
        for start in range(0, x.shape[0], chunk_size):
            end = min(start + chunk_size, x.shape[0])
            xc = x[start:end]
            logits = F.linear(xc, weight, bias)                       # recomputed (n, V)
            _, dlogits = ctx.rows_fn(logits, target[start:end], *options,
                                 grad_scale=grad_out[start:end])
            _chunk_grads(dlogits, xc, weight, None if dx is None else dx[start:end],
                         dweight, dbias)
        return (dx, None if dweight is None else dweight.to(dtype),
                None if dbias is None else dbias.to(bias_dtype), None, None, None)


def chunked_linear_cross_entropy(rows_fn):
    """A linear_cross_entropy backend from a per-chunk kernel `rows_fn` (the contract of
    llmcore.kernels.reference.cross_entropy_rows): kernel backends reuse the loop with theirs."""
    def run(x, weight, target, bias, ignore_index, reduction, label_smoothing, z_loss, softcap,
            chunk_size):
        need_grad = torch.is_grad_enabled() and (
            x.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad))
        options = (ignore_index, label_smoothing, z_loss, softcap)
        return _ChunkedLinearCrossEntropy.apply(x, weight, bias, target, rows_fn,
                                                (options, reduction, chunk_size, need_grad))
    return run


# Backend -> implementation. Kernel backends add their entries below as they land.
# _CROSS_ENTROPY[name](input, target, weight, ignore_index, reduction, label_smoothing, z_loss,
#                      softcap): checked arguments as cross_entropy received them.
# _LINEAR_CROSS_ENTROPY[name](x (N, H), weight (V, H), target (N,), bias, ignore_index,
#                      reduction, label_smoothing, z_loss, softcap, chunk_size): (N,) or scalar.
_CROSS_ENTROPY = {"torch": reference.cross_entropy}
_INPLACE_BACKWARD: set[str] = set()     # backends whose entry takes inplace_backward=True
_LINEAR_CROSS_ENTROPY = {"torch": chunked_linear_cross_entropy(reference.cross_entropy_rows)}


# ---------------------------------------------------------------------------- shared by kernels
# Both kernel backends compute per-row losses and lse in fp32 (fp64 for fp64 logits) and reduce
# with a device-side denominator (no host sync). Their backward needs, per row, the gradient of
# that row's loss: grad_out itself ("none"), or a 0-dim scale broadcast by the kernel ("sum":
# grad_out, "mean": grad_out / den).

_REDUCTION_CODE = {"none": 0, "mean": 1, "sum": 2}      # at::Reduction, the native op's int


def _acc_dtype(logits: torch.Tensor) -> torch.dtype:
    return torch.float64 if logits.dtype == torch.float64 else torch.float32


def _as_rows(input: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits (n, C), target (n,)). (N, C) logits pass as they are (a view would add an
    autograd node per call); (C,) -> (1, C); (N, C, d1, ...) -> (N*d1*..., C), a copy unless C
    is innermost in memory."""
    if input.dim() == 2:
        return input, target
    if input.dim() == 1:
        return input[None], target.reshape(1)
    return input.movedim(1, -1).reshape(-1, input.shape[1]), target.reshape(-1)


def _mean_denominator(target, weight, ignore_index, dtype, count=False):
    """"mean"'s denominator: sum over valid tokens of w[t] (their number without a weight), a
    0-dim device tensor; with count=True also z_ratio = den / n_valid, the scale that makes the
    kernels' unweighted z-term average over n_valid tokens (None when it is 1). Without a class
    weight: 2 small kernels."""
    valid = target != ignore_index
    n_valid = valid.sum(dtype=dtype)
    if weight is None:
        return n_valid, None
    # targets out of range are clamped here; the range check proper is _check_target's
    w_t = weight[target.clamp(0, weight.shape[0] - 1)]
    den = torch.where(valid, w_t, 0).sum(dtype=dtype)
    return den, (den / n_valid.clamp_min(1) if count else None)


def _reduce(loss, den, reduction, dtype):
    if reduction == "none":
        return loss.to(dtype)
    total = loss.sum()
    return (total if reduction == "sum" else total / den).to(dtype)


def _row_grad(grad, den, reduction):
    """The gradient of each row's loss: (n,) for "none", else 0-dim (the kernels broadcast)."""
    return grad / den if reduction == "mean" else grad


# ---------------------------------------------------------------------------- triton backend
# The kernels of llmcore/kernels/triton/cross_entropy.py. Eager mode: _TritonCrossEntropy, a
# plain autograd.Function that launches them directly (the custom_op + register_autograd route
# costs ~130 us of host time per fwd+bwd). Under torch.compile: the same kernels as
# torch.library ops in namespace llmcore_triton (custom_ops, opaque to torch.compile, not
# triton_ops: see llmcore/ops/norm.py), with the reduction as plain torch on top. Both reach
# the backward kernel through _triton_ce_grad. In the op schemas softcap = 0.0 means none.
#   cross_entropy_fwd   logits -> (loss (n,), lse (n,));  autograd via cross_entropy_bwd
#   cross_entropy_rows_ loss (n,), and overwrites `logits` with dloss/dlogits * grad_scale (a
#                       mutation declared in the schema): linear_cross_entropy's per-chunk step
#                       and the in-place-gradient option, which saves the (n, V) gradient buffer.

def _launch_ce_fwd(logits, target, weight, ignore_index, label_smoothing, z_loss, softcap,
                   z_ratio=None, **kwargs):
    from llmcore.kernels.triton import cross_entropy as kernels

    return kernels.ce_fwd(logits, target, weight, ignore_index, label_smoothing, z_loss,
                          softcap or None, z_ratio=z_ratio, **kwargs)


def _assert_targets(wt_sum, n_classes, ignore_index):
    """The eager Triton route's target check on CUDA: the kernel wrote w[t] per row, nan for a
    target outside [0, n_classes), so one asynchronous assert on their sum (which "mean" needs
    anyway) replaces the ~6-kernel check. CPU calls are checked before (a ValueError)."""
    torch._assert_async(wt_sum == wt_sum, f"target values must be in [0, {n_classes}) or "
                                          f"equal ignore_index={ignore_index}")


def _launch_ce_bwd(grad_loss, logits, target, weight, lse, ignore_index, label_smoothing, z_loss,
                   softcap, z_ratio=None):
    from llmcore.kernels.triton import cross_entropy as kernels

    return kernels.ce_bwd(logits, target, weight, lse, grad_loss, ignore_index, label_smoothing,
                          z_loss, softcap or None, z_ratio=z_ratio)


@torch.library.custom_op("llmcore_triton::cross_entropy_fwd", mutates_args=())
def _triton_ce_fwd(logits: torch.Tensor, target: torch.Tensor, weight: Optional[torch.Tensor],
                   ignore_index: int, label_smoothing: float, z_loss: float, softcap: float,
                   z_ratio: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    return _launch_ce_fwd(logits, target, weight, ignore_index, label_smoothing, z_loss, softcap,
                          z_ratio)


@_triton_ce_fwd.register_fake
def _(logits, target, weight, ignore_index, label_smoothing, z_loss, softcap, z_ratio=None):
    n = logits.shape[0]
    acc = _acc_dtype(logits)
    return logits.new_empty((n,), dtype=acc), logits.new_empty((n,), dtype=acc)


@torch.library.custom_op("llmcore_triton::cross_entropy_bwd", mutates_args=())
def _triton_ce_bwd(grad_loss: torch.Tensor, logits: torch.Tensor, target: torch.Tensor,
                   weight: Optional[torch.Tensor], lse: torch.Tensor, ignore_index: int,
                   label_smoothing: float, z_loss: float, softcap: float,
                   z_ratio: Optional[torch.Tensor] = None) -> torch.Tensor:
    # grad_loss (n,), possibly a stride-0 expand (the gradient of a sum or mean) -> (n, V)
    return _launch_ce_bwd(grad_loss, logits, target, weight, lse, ignore_index, label_smoothing,
                          z_loss, softcap, z_ratio)


@_triton_ce_bwd.register_fake
def _(grad_loss, logits, target, weight, lse, ignore_index, label_smoothing, z_loss, softcap,
      z_ratio=None):
    return logits.new_empty(logits.shape)


def _triton_ce_grad(saved, options, grad_loss, bwd):
    """The backward shared by both routes: dlogits from the saved (logits, target, weight, lse,
    z_ratio), the options (ignore_index, label_smoothing, z_loss, softcap) and the gradient of
    each row's loss, through `bwd` (the launcher in eager mode, the registered op under
    torch.compile)."""
    logits, target, weight, lse, z_ratio = saved[:5]
    return bwd(grad_loss, logits, target, weight, lse, *options, z_ratio)


def _triton_ce_setup_context(ctx, inputs, output):
    logits, target, weight, *options, z_ratio = inputs
    ctx.options = options
    ctx.save_for_backward(logits, target, weight, output[1], z_ratio)
    ctx.set_materialize_grads(False)


def _triton_ce_backward(ctx, grad_loss, _grad_lse):
    if grad_loss is None:
        return (None,) * 8
    return (_triton_ce_grad(ctx.saved_tensors, ctx.options, grad_loss, _triton_ce_bwd),) + (None,) * 7


_triton_ce_fwd.register_autograd(_triton_ce_backward, setup_context=_triton_ce_setup_context)


class _TritonCrossEntropy(torch.autograd.Function):
    """The eager route: the kernels launched directly, the reduction in forward, and backward
    scaled per the reduction. config: (ignore_index, reduction, label_smoothing, z_loss,
    softcap) as plain values."""

    @staticmethod
    def forward(ctx, logits, target, weight, config):
        ignore_index, reduction, label_smoothing, z_loss, softcap = config
        den = z_ratio = None
        if reduction == "mean" and weight is not None and z_loss > 0:
            # the z-term's scale den / n_valid is an input of the kernel: den comes first
            den, z_ratio = _mean_denominator(target, weight, ignore_index, _acc_dtype(logits),
                                             count=True)
        loss, lse, wt = _launch_ce_fwd(logits, target, weight, ignore_index, label_smoothing,
                                       z_loss, softcap, z_ratio, valid_weight=True)
        if reduction == "mean" and den is None:
            den = wt.sum()                         # sum of w[t] over the valid rows
        if target.device.type != "cpu":
            _assert_targets(den if z_ratio is None and den is not None else wt.sum(),
                            logits.shape[1], ignore_index)
        ctx.options = (ignore_index, label_smoothing, z_loss, softcap)
        ctx.reduction = reduction
        ctx.save_for_backward(logits, target, weight, lse, z_ratio, den)
        ctx.set_materialize_grads(False)
        return _reduce(loss, den, reduction, logits.dtype)

    @staticmethod
    def backward(ctx, grad):
        if grad is None or not ctx.needs_input_grad[0]:
            return None, None, None, None
        saved = ctx.saved_tensors
        g = _row_grad(grad, saved[5], ctx.reduction)
        return _triton_ce_grad(saved, ctx.options, g, _launch_ce_bwd), None, None, None


def _triton_cross_entropy_compiled(logits, target, weight, ignore_index, reduction,
                                   label_smoothing, z_loss, softcap):
    # what torch.compile sees: the registered ops, the reduction in plain torch
    den = z_ratio = None
    if reduction == "mean":
        den, z_ratio = _mean_denominator(target, weight, ignore_index, _acc_dtype(logits),
                                         count=z_loss > 0)
    loss, _lse = _triton_ce_fwd(logits, target, weight, ignore_index, label_smoothing, z_loss,
                                softcap, z_ratio)
    return _reduce(loss, den, reduction, logits.dtype)


@torch.library.custom_op("llmcore_triton::cross_entropy_rows_", mutates_args=("logits",))
def _triton_ce_rows_(logits: torch.Tensor, target: torch.Tensor, weight: Optional[torch.Tensor],
                     ignore_index: int, label_smoothing: float, z_loss: float, softcap: float,
                     grad_scale: torch.Tensor, z_ratio: Optional[torch.Tensor] = None
                     ) -> torch.Tensor:
    # grad_scale 0-dim or (n,); logits (n, V) is overwritten with its gradient
    from llmcore.kernels.triton import cross_entropy as kernels

    loss, _lse = kernels.ce_fwd(logits, target, weight, ignore_index, label_smoothing, z_loss,
                                softcap or None, grad=logits, grad_scale=grad_scale,
                                z_ratio=z_ratio)
    return loss


@_triton_ce_rows_.register_fake
def _(logits, target, weight, ignore_index, label_smoothing, z_loss, softcap, grad_scale,
      z_ratio=None):
    return logits.new_empty((logits.shape[0],), dtype=_acc_dtype(logits))


def _triton_cross_entropy_rows(logits, target, ignore_index=-100, label_smoothing=0.0,
                               z_loss=0.0, softcap=None, grad_scale=None):
    """reference.cross_entropy_rows's contract on the Triton kernel; the gradient, when asked
    for, is written over `logits` (the chunk buffer) and returned in its dtype."""
    if grad_scale is None:
        loss, _lse = _triton_ce_fwd(logits, target, None, ignore_index, label_smoothing, z_loss,
                                    softcap or 0.0)
        return loss, None
    loss = _triton_ce_rows_(logits, target, None, ignore_index, label_smoothing, z_loss,
                            softcap or 0.0, grad_scale)
    return loss, logits


class _TritonCrossEntropyInplace(torch.autograd.Function):
    """cross_entropy whose forward writes the gradient into the logits' own buffer, so no
    (n, V) gradient is ever allocated. The caller's logits are overwritten: opt-in only, for
    logits that nothing reads after the loss. The gradient is pre-scaled for the reduction
    (1/denominator for "mean"); backward multiplies it in place by grad_output (per row for
    "none"), so it can run once per forward (retain_graph cannot replay it)."""

    @staticmethod
    def forward(ctx, logits, target, weight, config):
        ignore_index, reduction, label_smoothing, z_loss, softcap = config
        acc = _acc_dtype(logits)
        buf = logits.detach()                                        # (n, V), same storage
        den = z_ratio = None
        if reduction == "mean":
            den, z_ratio = _mean_denominator(target, weight, ignore_index, acc, count=z_loss > 0)
            scale = den.reciprocal()                                 # inf if all ignored: masked
        else:
            scale = buf.new_ones((), dtype=acc)
        if torch.compiler.is_compiling():
            loss = _triton_ce_rows_(buf, target, weight, ignore_index, label_smoothing, z_loss,
                                    softcap, scale, z_ratio)         # (n,); buf now holds dlogits
        else:
            loss, _lse, wt = _launch_ce_fwd(buf, target, weight, ignore_index, label_smoothing,
                                            z_loss, softcap, z_ratio, grad=buf, grad_scale=scale,
                                            valid_weight=True)
            if target.device.type != "cpu":
                _assert_targets(wt.sum(), buf.shape[1], ignore_index)
        ctx.reduction = reduction
        ctx.spent = False
        ctx.save_for_backward(buf)
        ctx.set_materialize_grads(False)
        return _reduce(loss, den, reduction, logits.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        if ctx.spent:
            raise RuntimeError("cross_entropy with inplace_backward=True keeps its gradient in the "
                               "logits' buffer and scales it in place: it can be backpropagated "
                               "once only")
        ctx.spent = True
        if grad_out is None:
            return None, None, None, None
        (dlogits,) = ctx.saved_tensors
        g = grad_out[:, None] if ctx.reduction == "none" else grad_out
        return dlogits.mul_(g.to(dlogits.dtype)), None, None, None


def _triton_cross_entropy(input, target, weight, ignore_index, reduction, label_smoothing,
                          z_loss, softcap, *, inplace_backward=False):
    """The triton entry of _CROSS_ENTROPY. inplace_backward=True overwrites `input` with its
    gradient during the forward (see _TritonCrossEntropyInplace)."""
    logits, t = _as_rows(input, target)
    config = (ignore_index, reduction, label_smoothing, z_loss, softcap or 0.0)
    if inplace_backward:
        out = _TritonCrossEntropyInplace.apply(logits, t, weight, config)
    elif torch.compiler.is_compiling():
        out = _triton_cross_entropy_compiled(logits, t, weight, *config)
    else:
        out = _TritonCrossEntropy.apply(logits, t, weight, config)
    return out.reshape(target.shape) if reduction == "none" and target.dim() != 1 else out


_CROSS_ENTROPY["triton"] = _triton_cross_entropy
_INPLACE_BACKWARD.add("triton")
_LINEAR_CROSS_ENTROPY["triton"] = chunked_linear_cross_entropy(_triton_cross_entropy_rows)


# ---------------------------------------------------------------------------- native backend
# The ops are defined in C++ (schemas: csrc/torch/ops.cpp; CPU kernels: csrc/cpu/cross_entropy.cpp,
# CUDA: csrc/cuda/cross_entropy.cu; C++ glue and autograd: csrc/torch/cross_entropy_ops.cpp).
#   llmcore::cross_entropy   the reduced loss, differentiable by a C++ autograd kernel that runs
#                            the two ops below through the dispatcher: cross_entropy's one call
#   cross_entropy_fwd / _bwd per-row loss and lse / dlogits; the same contracts as the triton
#                            ops above (softcap 0.0 = none; optional 0-dim z_ratio)
#   cross_entropy_rows_      per-row loss, and overwrites its logits with dloss/dlogits *
#                            grad_scale: linear_cross_entropy's per-chunk step
# Here: their fake impls (for torch.compile and opcheck). The kernels check the target range
# (a ValueError from C++ on the CPU, a device-side assert on CUDA).

def _native_ce_fake(logits, target, weight, ignore_index, reduction, label_smoothing, z_loss,
                    softcap):
    if reduction == _REDUCTION_CODE["none"]:
        return logits.new_empty((logits.shape[0],))
    return logits.new_empty(())


def _native_ce_fwd_fake(logits, target, weight, ignore_index, label_smoothing, z_loss, softcap,
                        z_ratio=None):
    n = logits.shape[0]
    acc = _acc_dtype(logits)
    return logits.new_empty((n,), dtype=acc), logits.new_empty((n,), dtype=acc)


def _native_ce_bwd_fake(dloss, logits, target, weight, lse, ignore_index, label_smoothing,
                        z_loss, softcap, z_ratio=None):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


def _native_ce_rows_fake(logits, target, weight, ignore_index, label_smoothing, z_loss, softcap,
                         grad_scale):
    return logits.new_empty((logits.shape[0],), dtype=_acc_dtype(logits))


_native_ce_op = None     # torch.ops.llmcore.cross_entropy.default, once the library is loaded
_native_check_targets = None     # torch.ops.llmcore.cross_entropy_check_targets.default


def _register_native() -> bool:
    global _native_ce_op, _native_check_targets
    if backends.native_module() is None:  # loading it registers the C++ ops
        return False
    torch.library.register_fake("llmcore::cross_entropy")(_native_ce_fake)
    torch.library.register_fake("llmcore::cross_entropy_fwd")(_native_ce_fwd_fake)
    torch.library.register_fake("llmcore::cross_entropy_bwd")(_native_ce_bwd_fake)
    torch.library.register_fake("llmcore::cross_entropy_rows_")(_native_ce_rows_fake)
    _native_ce_op = torch.ops.llmcore.cross_entropy.default
    _native_check_targets = torch.ops.llmcore.cross_entropy_check_targets.default
    return True


def _native_cross_entropy(input, target, weight, ignore_index, reduction, label_smoothing,
                          z_loss, softcap):
    if weight is not None and weight.requires_grad and torch.is_grad_enabled():
        raise ValueError("weight must not require grad with backend 'native': its kernels do "
                         "not differentiate the class weights (pass weight.detach(), or use "
                         "backend='torch')")
    logits, t = _as_rows(input, target)
    out = _native_ce_op(logits, t, weight, ignore_index, _REDUCTION_CODE[reduction],
                        label_smoothing, z_loss, softcap or 0.0)
    return out.reshape(target.shape) if reduction == "none" and target.dim() != 1 else out


def _native_cross_entropy_rows(logits, target, ignore_index=-100, label_smoothing=0.0,
                               z_loss=0.0, softcap=None, grad_scale=None):
    """reference.cross_entropy_rows's contract on the native kernel: one pass per row computes
    the loss and, when grad_scale is given, writes the gradient over `logits` (the chunk
    buffer), returned in its dtype."""
    t = target.long()
    if grad_scale is None:
        loss, _lse = torch.ops.llmcore.cross_entropy_fwd(logits, t, None, ignore_index,
                                                         label_smoothing, z_loss, softcap or 0.0)
        return loss, None
    loss = torch.ops.llmcore.cross_entropy_rows_(logits, t, None, ignore_index, label_smoothing,
                                                 z_loss, softcap or 0.0, grad_scale)
    return loss, logits


if _register_native():
    _CROSS_ENTROPY["native"] = _native_cross_entropy
    _LINEAR_CROSS_ENTROPY["native"] = chunked_linear_cross_entropy(_native_cross_entropy_rows)
