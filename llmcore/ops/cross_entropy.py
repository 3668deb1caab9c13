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


def _check_target(target, expected_shape, n_classes, ignore_index, input) -> None:
    """target: integer class indices of `expected_shape`, each in [0, n_classes) or ignore_index.

    The range check reads the values: on the CPU it raises a ValueError here; on other devices,
    and under torch.compile, it is an asynchronous assert (torch._assert_async): no host sync and
    no graph break, but on CUDA a bad target surfaces as a device error at a later sync."""
    _checks.tensor("target", target)
    if target.dtype.is_floating_point and tuple(target.shape) == tuple(input.shape):
        raise TypeError(
            "target must be an integer tensor of class indices; class-probability targets "
            f"(a floating target of input's shape) are not supported, got dtype {target.dtype}"
        )
    _checks.integer("target", target)
    _checks.shape("target", target, expected_shape)
    _checks.same_device("target", target, input)
    ok = ((target >= 0) & (target < n_classes)) | (target == ignore_index)
    message = f"target values must be in [0, {n_classes}) or equal ignore_index={ignore_index}"
    if target.device.type == "cpu" and not torch.compiler.is_compiling():
        if not bool(ok.all()):
            bad = target[~ok][0].item()
            raise ValueError(f"{message}, got {bad}")
    else:
        torch._assert_async(ok.all(), message)


def _check_cross_entropy(input, target, weight, ignore_index, reduction, label_smoothing,
                         z_loss, softcap) -> None:
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
        _checks.same_dtype("weight", weight, input)
    expected = input.shape[:1] + input.shape[2:] if input.dim() > 1 else ()
    _check_target(target, expected, n_classes, ignore_index, input)


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
    weights. Extras (keyword-only): `z_loss` adds z_loss * w[t] * logsumexp(logits)^2 per valid
    token; `softcap` caps the logits to softcap*tanh(logits/softcap) before everything else.
    With z_loss=0 and softcap=None the result is F.cross_entropy's.

    Semantics, shared by every backend (C classes, t_i the target of token i, w the class weight,
    w[c] = 1 without one, e = label_smoothing, valid = target != ignore_index):

        y_i    = softcap * tanh(logits_i / softcap)      (y_i = logits_i when softcap is None)
        lse_i  = logsumexp_c y_ic,   logp_ic = y_ic - lse_i
        loss_i = (1-e) w[t_i] (-logp_it) + (e/C) sum_c w[c] (-logp_ic) + z_loss w[t_i] lse_i^2
                 for valid tokens, 0 for ignored ones

        "none": loss_i (target's shape).  "sum": sum_i loss_i.
        "mean": sum_i loss_i / sum_{valid i} w[t_i]  -- F.cross_entropy's denominator, also for
                the label-smoothing term; with no class weight, the number of valid tokens.

    The first two terms are exactly F.cross_entropy's. The z-loss term is part of each token's
    loss, so it is weighted by the token's class weight and averaged like the main loss (with no
    class weight: z_loss * mean of lse^2 over valid tokens). When every token is ignored (or the
    batch is empty) "mean" is nan and "sum" is 0, as with F.cross_entropy, and all gradients
    are 0. float16/bfloat16 logits are reduced in float32 and rounded once.

    Target values are checked: a ValueError on CPU tensors; on CUDA (and under torch.compile)
    an asynchronous device-side assert, so no host sync.

    inplace_backward=True allows a kernel backend to write the gradient into `input`'s own
    buffer during the forward, saving an (N, C) allocation: pass it only when nothing reads the
    logits after the loss, and backpropagate once. Backends that cannot do it (torch, native)
    compute as usual; the values and gradients are the same either way."""
    if not isinstance(inplace_backward, bool):
        raise TypeError(f"inplace_backward must be a bool, got {inplace_backward!r}")
    _check_cross_entropy(input, target, weight, ignore_index, reduction, label_smoothing,
                         z_loss, softcap)
    name = backends.resolve("cross_entropy", backend, input.device)
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


# ---------------------------------------------------------------------------- triton backend
# The kernels of llmcore/kernels/triton/cross_entropy.py as torch.library ops in namespace
# llmcore_triton (custom_ops, opaque to torch.compile, not triton_ops: see llmcore/ops/norm.py).
# They work on (n, V) logits and return per-row losses in fp32 (fp64 for fp64 logits); the
# reduction is plain torch on top, so "mean" divides by a device tensor (no host sync).
# In these schemas softcap = 0.0 means no softcap.
#   cross_entropy_fwd   logits -> (loss (n,), lse (n,));  autograd via cross_entropy_bwd
#   cross_entropy_rows_ loss (n,), and overwrites `logits` with dloss/dlogits * grad_scale (a
#                       mutation declared in the schema): linear_cross_entropy's per-chunk step
#                       and the in-place-gradient option, which saves the (n, V) gradient buffer.

def _triton_acc(logits: torch.Tensor) -> torch.dtype:
    return torch.float64 if logits.dtype == torch.float64 else torch.float32


@torch.library.custom_op("llmcore_triton::cross_entropy_fwd", mutates_args=())
def _triton_ce_fwd(logits: torch.Tensor, target: torch.Tensor, weight: Optional[torch.Tensor],
                   ignore_index: int, label_smoothing: float, z_loss: float, softcap: float
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    from llmcore.kernels.triton import cross_entropy as kernels

    return kernels.ce_fwd(logits, target, weight, ignore_index, label_smoothing, z_loss,
                          softcap or None)


@_triton_ce_fwd.register_fake
def _(logits, target, weight, ignore_index, label_smoothing, z_loss, softcap):
    n = logits.shape[0]
    acc = _triton_acc(logits)
    return logits.new_empty((n,), dtype=acc), logits.new_empty((n,), dtype=acc)


@torch.library.custom_op("llmcore_triton::cross_entropy_bwd", mutates_args=())
def _triton_ce_bwd(grad_loss: torch.Tensor, logits: torch.Tensor, target: torch.Tensor,
                   weight: Optional[torch.Tensor], lse: torch.Tensor, ignore_index: int,
                   label_smoothing: float, z_loss: float, softcap: float) -> torch.Tensor:
    # grad_loss (n,), possibly a stride-0 expand (the gradient of a sum or mean) -> (n, V)
    from llmcore.kernels.triton import cross_entropy as kernels

    return kernels.ce_bwd(logits, target, weight, lse, grad_loss, ignore_index,
                          label_smoothing, z_loss, softcap or None)


@_triton_ce_bwd.register_fake
def _(grad_loss, logits, target, weight, lse, ignore_index, label_smoothing, z_loss, softcap):
    return logits.new_empty(logits.shape)


def _triton_ce_setup_context(ctx, inputs, output):
    logits, target, weight, *options = inputs
    ctx.options = options
    ctx.save_for_backward(logits, target, weight, output[1])


def _triton_ce_backward(ctx, grad_loss, _grad_lse):
    logits, target, weight, lse = ctx.saved_tensors
    dlogits = _triton_ce_bwd(grad_loss, logits, target, weight, lse, *ctx.options)
    return dlogits, None, None, None, None, None, None


_triton_ce_fwd.register_autograd(_triton_ce_backward, setup_context=_triton_ce_setup_context)


@torch.library.custom_op("llmcore_triton::cross_entropy_rows_", mutates_args=("logits",))
def _triton_ce_rows_(logits: torch.Tensor, target: torch.Tensor, weight: Optional[torch.Tensor],
                     ignore_index: int, label_smoothing: float, z_loss: float, softcap: float,
                     grad_scale: torch.Tensor) -> torch.Tensor:
    # grad_scale 0-dim or (n,); logits (n, V) is overwritten with its gradient
    from llmcore.kernels.triton import cross_entropy as kernels

    loss, _lse = kernels.ce_fwd(logits, target, weight, ignore_index, label_smoothing, z_loss,
                                softcap or None, grad=logits, grad_scale=grad_scale)
    return loss


@_triton_ce_rows_.register_fake
def _(logits, target, weight, ignore_index, label_smoothing, z_loss, softcap, grad_scale):
    return logits.new_empty((logits.shape[0],), dtype=_triton_acc(logits))


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


def _mean_denominator(target, weight, ignore_index, dtype):
    """sum over valid tokens of w[t] (their count without weight), a 0-dim device tensor."""
    valid = target != ignore_index
    if weight is None:
        return valid.sum().to(dtype)
    return torch.where(valid, weight.to(dtype)[torch.where(valid, target, 0)], 0).sum()


class _TritonCrossEntropyInplace(torch.autograd.Function):
    """cross_entropy whose forward writes the gradient into the logits' own buffer, so no
    (n, V) gradient is ever allocated. The caller's logits are overwritten: opt-in only, for
    logits that nothing reads after the loss. The gradient is pre-scaled for the reduction
    (1/denominator for "mean"); backward multiplies it in place by grad_output (per row for
    "none"), so it can run once per forward (retain_graph cannot replay it)."""

    @staticmethod
    def forward(ctx, logits, target, weight, ignore_index, reduction, label_smoothing, z_loss,
                softcap):
        acc = _triton_acc(logits)
        buf = logits.detach()                                        # (n, V), same storage
        if reduction == "mean":
            den = _mean_denominator(target, weight, ignore_index, acc)
            scale = den.reciprocal()                                 # inf if all ignored: masked
        else:
            scale = buf.new_ones((), dtype=acc)
        loss = _triton_ce_rows_(buf, target, weight, ignore_index, label_smoothing, z_loss,
                                softcap or 0.0, scale)              # (n,); buf now holds dlogits
        ctx.reduction = reduction
        ctx.spent = False
        ctx.save_for_backward(buf)
        if reduction == "none":
            return loss.to(logits.dtype)
        total = loss.sum()
        return (total / den if reduction == "mean" else total).to(logits.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        if ctx.spent:
            raise RuntimeError("cross_entropy with inplace_backward=True keeps its gradient in the "
                               "logits' buffer and scales it in place: it can be backpropagated "
                               "once only")
        ctx.spent = True
        (dlogits,) = ctx.saved_tensors
        g = grad_out[:, None] if ctx.reduction == "none" else grad_out
        return dlogits.mul_(g.to(dlogits.dtype)), None, None, None, None, None, None, None


def _triton_cross_entropy(input, target, weight, ignore_index, reduction, label_smoothing,
                          z_loss, softcap, *, inplace_backward=False):
    """The triton entry of _CROSS_ENTROPY. inplace_backward=True overwrites `input` with its
    gradient during the forward (see _TritonCrossEntropyInplace)."""
    n_classes = input.shape[1] if input.dim() > 1 else input.shape[0]
    # (C,) -> (1, C); (N, C, d1, ...) -> (N*d1*..., C), a copy unless C is innermost in memory
    logits = input.movedim(1, -1).reshape(-1, n_classes) if input.dim() > 1 else input[None]
    t = target.reshape(-1)
    if inplace_backward:
        out = _TritonCrossEntropyInplace.apply(logits, t, weight, ignore_index, reduction,
                                               label_smoothing, z_loss, softcap)
        return out.reshape(target.shape) if reduction == "none" else out
    loss, _lse = _triton_ce_fwd(logits, t, weight, ignore_index, label_smoothing, z_loss,
                                softcap or 0.0)                      # (n,) fp32 / fp64
    if reduction == "none":
        return loss.to(input.dtype).reshape(target.shape)
    if reduction == "sum":
        return loss.sum().to(input.dtype)
    den = _mean_denominator(t, weight, ignore_index, loss.dtype)
    return (loss.sum() / den).to(input.dtype)


_CROSS_ENTROPY["triton"] = _triton_cross_entropy
_INPLACE_BACKWARD.add("triton")
_LINEAR_CROSS_ENTROPY["triton"] = chunked_linear_cross_entropy(_triton_cross_entropy_rows)


# ---------------------------------------------------------------------------- native backend
# llmcore::cross_entropy_fwd / _bwd / _rows_ are defined in C++ (schemas: csrc/torch/ops.cpp;
# CPU kernels: csrc/cpu/cross_entropy.cpp, CUDA: csrc/cuda/cross_entropy.cu). Here: their fake
# impls and autograd. Same contracts as the triton ops above: (n, V) logits, int64 targets,
# per-row loss and lse in fp32 (fp64 for fp64 logits), softcap 0.0 = none; cross_entropy_rows_
# overwrites its logits with dloss/dlogits * grad_scale.

def _native_ce_fwd_fake(logits, target, weight, ignore_index, label_smoothing, z_loss, softcap):
    n = logits.shape[0]
    acc = _triton_acc(logits)
    return logits.new_empty((n,), dtype=acc), logits.new_empty((n,), dtype=acc)


def _native_ce_bwd_fake(dloss, logits, target, weight, lse, ignore_index, label_smoothing,
                        z_loss, softcap):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


def _native_ce_rows_fake(logits, target, weight, ignore_index, label_smoothing, z_loss, softcap,
                         grad_scale):
    return logits.new_empty((logits.shape[0],), dtype=_triton_acc(logits))


def _native_ce_setup_context(ctx, inputs, output):
    logits, target, weight, *options = inputs
    ctx.options = options
    ctx.save_for_backward(logits, target, weight, output[1])


def _native_ce_backward(ctx, grad_loss, _grad_lse):
    logits, target, weight, lse = ctx.saved_tensors
    dlogits = torch.ops.llmcore.cross_entropy_bwd(grad_loss, logits, target, weight, lse,
                                                  *ctx.options)
    return dlogits, None, None, None, None, None, None


def _register_native() -> bool:
    if backends.native_module() is None:  # loading it registers the C++ ops
        return False
    torch.library.register_fake("llmcore::cross_entropy_fwd")(_native_ce_fwd_fake)
    torch.library.register_fake("llmcore::cross_entropy_bwd")(_native_ce_bwd_fake)
    torch.library.register_fake("llmcore::cross_entropy_rows_")(_native_ce_rows_fake)
    torch.library.register_autograd("llmcore::cross_entropy_fwd", _native_ce_backward,
                                    setup_context=_native_ce_setup_context)
    return True


def _native_cross_entropy(input, target, weight, ignore_index, reduction, label_smoothing,
                          z_loss, softcap):
    if weight is not None and weight.requires_grad and torch.is_grad_enabled():
        raise ValueError("weight must not require grad with backend 'native': its kernels do "
                         "not differentiate the class weights (pass weight.detach(), or use "
                         "backend='torch')")
    n_classes = input.shape[1] if input.dim() > 1 else input.shape[0]
    # (C,) -> (1, C); (N, C, d1, ...) -> (N*d1*..., C), a copy unless C is innermost in memory
    logits = input.movedim(1, -1).reshape(-1, n_classes) if input.dim() > 1 else input[None]
    t = target.reshape(-1).long()                                    # (n,) int64
    loss, _lse = torch.ops.llmcore.cross_entropy_fwd(logits, t, weight, ignore_index,
                                                     label_smoothing, z_loss, softcap or 0.0)
    if reduction == "none":
        return loss.to(input.dtype).reshape(target.shape)
    if reduction == "sum":
        return loss.sum().to(input.dtype)
    den = _mean_denominator(t, weight, ignore_index, loss.dtype)
    return (loss.sum() / den).to(input.dtype)


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
