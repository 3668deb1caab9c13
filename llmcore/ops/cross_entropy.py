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
from llmcore.ops import linear as _linear  # its NATIVE: llmcore::gemm / gemm_into registered

REDUCTIONS = ("none", "mean", "sum")

# linear_cross_entropy's workspace, whatever the device: a token chunk of logits gets 64 MiB in
# fp32/fp64 and 256 MiB in bf16/fp16 (there it exists in the forward only, while the peak is
# the backward's); a vocabulary block of the bf16/fp16 backward gets 16 MiB.
_CHUNK_BYTES = 64 << 20
_LOW_PRECISION_CHUNK_BYTES = 256 << 20
_BLOCK_BYTES = 16 << 20
# On the CPU, fp32/fp64 token chunks are also at most this many rows: a chunk of 512 rows keeps
# small vocabularies' logits in the last-level cache between the GEMM that writes them, the
# cross-entropy kernel and the two GEMMs that read them (2048 x 4096 fp32 in one 32 MiB piece
# went to DRAM and fresh pages on each pass), and GEMMs of 512 rows run at full speed there.
# Measured in benchmarks/README.md ("linear_cross_entropy's CPU chunks").
_CPU_CHUNK_ROWS = 512
# default_chunk_size's rule for CPU tensors is mirrored in C++ by the native eager entry
# (csrc/torch/eager_entry.cpp, default_cpu_chunk_rows), which takes a call only when its rows
# fit one chunk; tests/ops/test_eager_entry.py holds the two to the same boundary.


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
    if check_range:
        _check_target_range(target, n_classes, ignore_index)


def _check_target_range(target, n_classes, ignore_index) -> None:
    cpu_eager = target.is_cpu and not torch.compiler.is_compiling()
    if cpu_eager and _native_check_targets is not None:  # one C++ pass, raises the ValueError below
        _native_check_targets(target, n_classes, ignore_index)
        return
    message = f"target values must be in [0, {n_classes}) or equal ignore_index={ignore_index}"
    if cpu_eager:
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
    # The usual call in one test: (N, C) logits and (N,) int64 targets, plain tensors on the CPU,
    # no class weight, float options in range. It passes exactly the checks below would pass
    # (a microsecond cheaper); anything else, and every error, takes the detailed checks.
    if (weight is None and softcap is None and type(input) is torch.Tensor
            and type(target) is torch.Tensor and input.dtype in _checks.FLOAT_DTYPE_SET
            and target.dtype is torch.int64 and input.dim() == 2 and target.dim() == 1
            and input.shape[1] > 0 and target.shape[0] == input.shape[0]
            and input.is_cpu and target.is_cpu and type(ignore_index) is int
            and reduction in REDUCTIONS and type(label_smoothing) is float
            and 0.0 <= label_smoothing <= 1.0 and type(z_loss) is float and z_loss >= 0.0):
        if check_range:
            _check_target_range(target, input.shape[1], ignore_index)
        return
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
    # (N,) for (N, C) logits without slicing a torch.Size (which costs a microsecond)
    expected = ((input.shape[0],) if input.dim() == 2 else
                input.shape[:1] + input.shape[2:] if input.dim() > 1 else ())
    _check_target(target, expected, n_classes, ignore_index, input, check_range)


def _check_linear_cross_entropy(input, weight, target, bias, ignore_index, reduction,
                                label_smoothing, z_loss, softcap, chunk_size) -> None:
    # The usual call in one test, as in _check_cross_entropy: (N, H) hidden states, a (V, H)
    # weight of their dtype, an optional (V,) bias, (N,) int64 targets, plain CPU tensors, float
    # options in range. Anything else, and every error, takes the detailed checks below.
    if (softcap is None and chunk_size is None and type(input) is torch.Tensor
            and type(weight) is torch.Tensor and type(target) is torch.Tensor
            and input.dtype in _checks.FLOAT_DTYPE_SET and weight.dtype is input.dtype
            and input.dim() == 2 and weight.dim() == 2 and weight.shape[1] == input.shape[1]
            and weight.shape[0] > 0 and target.dtype is torch.int64 and target.dim() == 1
            and target.shape[0] == input.shape[0] and input.is_cpu and weight.is_cpu
            and target.is_cpu and (bias is None or (
                type(bias) is torch.Tensor and bias.dtype is input.dtype and bias.dim() == 1
                and bias.shape[0] == weight.shape[0] and bias.is_cpu))
            and type(ignore_index) is int and reduction in REDUCTIONS
            and type(label_smoothing) is float and 0.0 <= label_smoothing <= 1.0
            and type(z_loss) is float and z_loss >= 0.0):
        _check_target_range(target, weight.shape[0], ignore_index)
        return
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
    if _native_ce_fast is not None and backends.native_eager("cross_entropy", backend, input):
        # the ordinary call on CPU tensors, checked and run in C++ (the native kernels do not
        # write into the logits: inplace_backward changes nothing there)
        out = _native_ce_fast(input, target, weight, ignore_index, reduction, label_smoothing,
                              z_loss, softcap)
        if out is not None:
            return out
    _checks.tensor("input", input)
    name = backends.resolve("cross_entropy", backend, input.device)
    # every CPU call is checked here; on CUDA the native kernel asserts the target range itself,
    # and the eager Triton route checks what its kernel reports (_assert_targets)
    check_range = input.is_cpu or not (
        name == "native" or (name == "triton" and not torch.compiler.is_compiling()))
    _check_cross_entropy(input, target, weight, ignore_index, reduction, label_smoothing,
                         z_loss, softcap, check_range)
    # backends receive int64 class indices (the usual int64 target as it is)
    extra = {"inplace_backward": True} if inplace_backward and name in _INPLACE_BACKWARD else {}
    if target.dtype is not torch.int64:
        target = target.long()
    return _CROSS_ENTROPY[name](input, target, weight, ignore_index, reduction,
                                float(label_smoothing), float(z_loss),
                                None if softcap is None else float(softcap), **extra)


def linear_cross_entropy(input, weight, target, bias=None, ignore_index=-100, reduction="mean",
                         label_smoothing=0.0, *, z_loss=0.0, softcap=None, chunk_size=None,
                         backend="auto"):
    """cross_entropy(F.linear(input, weight, bias), target, ...) without ever holding the whole
    (N, V) logits: tokens are processed `chunk_size` rows at a time, forward and backward.

    input: (..., H) hidden states; weight: (V, H) (the LM head); bias: optional (V,); target:
    (...) class indices. Same options and semantics as cross_entropy (no class weight).
    chunk_size: rows per chunk; None picks one from the shapes and the device type
    (default_chunk_size): 64 MiB of fp32 logits (on the CPU at most 512 rows), 256 MiB of
    bf16/fp16 ones. bf16/fp16 inputs with more rows than a chunk run a
    second, vocabulary-blocked pass in the backward so that dW is one GEMM over all rows (see
    "the chunk loop" below for the schedules, their FLOPs, memory and rounding)."""
    if (_native_lce_fast is not None
            and backends.native_eager("cross_entropy", backend, input)):
        out = _native_lce_fast(input, weight, target, bias, ignore_index, reduction,
                               label_smoothing, z_loss, softcap, chunk_size)
        if out is not None:  # one chunk of CPU rows, checked and run in C++
            return out
    _check_linear_cross_entropy(input, weight, target, bias, ignore_index, reduction,
                                label_smoothing, z_loss, softcap, chunk_size)
    name = backends.resolve("cross_entropy", backend, input.device)
    if input.dim() == 2:                                             # (N, H) as it is
        x = input
    else:                                                            # (N, H); H may be 0
        x = input.reshape(input.shape[:-1].numel(), weight.shape[1])
    t = target if target.dim() == 1 and target.dtype is torch.int64 else target.reshape(-1).long()
    if chunk_size is None:
        chunk_size = default_chunk_size(x.shape[0], weight.shape[0], x.element_size(),
                                        device=x.device)
    out = _LINEAR_CROSS_ENTROPY[name](x, weight, t, bias, ignore_index, reduction,
                                      float(label_smoothing), float(z_loss),
                                      None if softcap is None else float(softcap), chunk_size)
    return out.reshape(target.shape) if reduction == "none" and target.dim() != 1 else out


def default_chunk_size(n_rows: int, n_classes: int, element_size: int = 4, *,
                       device: torch.device | str | None = None) -> int:
    """Rows per linear_cross_entropy chunk: the chunk's logits (n_classes values of
    `element_size` bytes per row, the input's dtype) get 64 MiB (fp32/fp64) or 256 MiB
    (bf16/fp16); a multiple of 8 rows when that allows, never more than the rows there are. On
    a CPU `device`, fp32/fp64 chunks are also at most 512 rows (_CPU_CHUNK_ROWS). A function of
    the shapes and the device type alone (never of free memory), so that a call chunks, and
    therefore rounds, the same way every time. At V = 128256: 128 rows in fp32, 1040 in bf16
    (GEMMs of ~1k rows run at full tensor-core speed; 256 rows would be near the H200's
    FLOP/byte ridge, as every chunk reads all of W)."""
    budget = _CHUNK_BYTES if element_size >= 4 else _LOW_PRECISION_CHUNK_BYTES
    rows = max(1, budget // (element_size * max(n_classes, 1)))
    device_type = getattr(device, "type", None) or (device and torch.device(device).type)
    if element_size >= 4 and device_type == "cpu":
        rows = min(rows, _CPU_CHUNK_ROWS)
    if rows >= 8:
        rows -= rows % 8
    return max(1, min(rows, n_rows))


# ---------------------------------------------------------------------------- the chunk loop
# Schedules, chosen by dtype and shapes (never by free memory). N tokens, H hidden, V classes, n
# rows per token chunk. Every GEMM runs in the input dtype (fp32 accumulation inside the GEMM
# for bf16/fp16), never on an fp32 copy of the weight or the hidden states, never in fp32 for
# bf16 inputs.
#
# One chunk (N <= n, any dtype): the forward keeps the (N, V) logits (at most the chunk budget)
# and their lse; the backward writes the gradient over them with grad_output folded in, then
# dx = dlogits W and dW = dlogits^T x: eager's 6NHV FLOPs and eager's roundings. Small batches
# take this path (on the CPU up to 512 fp32 rows: N=256, V=32000 is 32 MB).
#
# Several chunks, fp32 / fp64: one token pass (_token_pass). Per chunk: logits = x_c W^T
#   (2nHV FLOPs), the CE kernel writes dlogits over them, dx_c = dlogits W (2nHV) and
#   dW += dlogits^T x_c (2nHV): 6NHV in all. dW accumulates in its own dtype in the gradient
#   itself (the first chunk writes it, the others addmm_ into it), so the extra memory is one
#   chunk of logits; the N/n roundings of the running sum are fp32 roundings, like those inside
#   one long fp32 GEMM.
#
# Several chunks, bf16 / fp16: a token pass, then a vocabulary pass (_rows_lse_pass, _vocab_pass).
#   Eager (F.linear in bf16 + fp32 cross-entropy) computes dW = dlogits^T x as one GEMM over
#   all N rows: one rounding to bf16 per element. Summing token-chunk partials instead, either
#   the running sum stays bf16 (as Liger-Kernel does) and is rounded N/n times (32 times at
#   N=8192, n=256: an error growing like sqrt(32) = 5.7 roundings), or it is fp32 and costs
#   V*H*4 bytes (2.1 GB at V=128256, H=4096: twice the bf16 dW itself). So:
#   forward, token chunks: logits_c = x_c W^T (2nHV); one CE kernel pass gives the loss, the lse
#     and (for "mean"/"sum" with grad) dlogits, and dx_c = dlogits W (2nHV), one GEMM over all V:
#     dx rounded once. Kept: dx (N, H) and lse (N,); no (V, H) buffer.
#   backward, vocabulary blocks of c columns: logits_b = x W_b^T over all N rows (2NHc), their
#     gradient from the saved lse times grad_output (known by now: no pass over dW to apply it),
#     and dW_b = dlogits_b^T x (2NHc), one GEMM over all N rows written straight into the bf16
#     dW: rounded once, like eager's; db_b summed in fp32 over all rows, rounded once.
#   FLOPs: 8NHV, a third more than eager's 6NHV ("none": 10NHV, as its dx waits for the per-row
#   grad_output). Memory beyond the inputs, at its peak (the backward): dW (V*H*2 bytes) + dx
#   (N*H*2, handed over and scaled in place) + one 16 MiB vocabulary block + lse (N*4); the
#   forward holds dx + one 256 MiB token chunk. At N=8192, H=4096, V=128256: 34.4 TFLOP (eager
#   25.8) and 1051 + 67 + 17 MB = 1.135 GB (1.06 GiB; dW + dx alone are 1.118 GB). Predicted
#   H200 time in benchmarks/README.md.
#
# Several chunks, "mean"/"sum": the forward keeps the gradients it computed, pre-scaled (1/n_valid
# for "mean"); the first backward hands them over, multiplied in place by grad_output. A second
# backward (retain_graph) finds them spent and recomputes from the saved inputs.

def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def _vocab_blocked(dtype: torch.dtype) -> bool:
    return dtype in (torch.bfloat16, torch.float16)


def _mean_count(target, ignore_index, dtype):
    """"mean"'s denominator: the number of valid tokens, a 0-dim device tensor (no host sync)."""
    return (target != ignore_index).sum().to(dtype)


def _base_scale(count, reduction, target, dtype):
    """The gradient scale of "mean" (1/count, inf when no token is valid: every row's scale is
    then masked to 0) or "sum" (1), a 0-dim device tensor; None for "none"."""
    if reduction == "none":
        return None
    if reduction == "sum":
        return torch.ones((), dtype=dtype, device=target.device)
    return count.reciprocal()


def _row_scale(base, grad_out, dtype):
    """The gradient scale in backward: base * grad_output (0-dim), or grad_output (N,)."""
    g = grad_out.to(dtype)
    return g if base is None else base * g


def torch_mm_into(a, b, out, accumulate=False, bias=None):
    """out = a @ b [+ bias], or out += a @ b with accumulate: the chunk loop's GEMMs, here
    torch's (addmm with a bias, mm without, as F.linear calls them: the same bits). A backend
    may bring its own (the native one: llmcore's CPU GEMM)."""
    if accumulate:
        return out.addmm_(a, b)
    if bias is None:
        return torch.mm(a, b, out=out)
    return torch.addmm(bias, a, b, out=out)


def _linear_into(xc, weight, bias, buf, mm_into=torch_mm_into):
    """linear(xc, weight, bias) for a 2-D chunk, written into the first rows of `buf`. A chunk
    loop reuses one logits buffer instead of allocating one per chunk, which on the CPU meant
    fresh pages, and a page fault per 4 KiB, for every chunk of 32 MiB or more."""
    return mm_into(xc, weight.t(), buf[: xc.shape[0]], bias=bias)


def _logits_buffer(x, weight, chunk_size):
    """The (rows, V) buffer the token-chunk loops compute each chunk's logits into."""
    return x.new_empty((max(1, min(chunk_size, x.shape[0])), weight.shape[0]))


def _token_pass(x, weight, bias, target, rows_fn, options, chunk_size, scale, want, losses=None,
                mm_into=torch_mm_into):
    """fp32/fp64 schedule: one pass over token chunks. Fills `losses` (N,) when given; with
    `scale` (0-dim or (N,)) also returns (dx, dW, db) for the flags in `want`."""
    want_dx, want_dw, want_db = want if scale is not None else (False, False, False)
    n_rows = x.shape[0]
    dx = x.new_empty(x.shape) if want_dx else None                   # (N, H)
    dweight = torch.empty_like(weight) if want_dw else None           # (V, H), the gradient
    dbias = torch.empty_like(bias) if want_db else None               # (V,)
    if n_rows == 0:
        return dx, None if dweight is None else dweight.zero_(), \
            None if dbias is None else dbias.zero_()
    buf = _logits_buffer(x, weight, chunk_size)
    for start in range(0, n_rows, chunk_size):
        end = min(start + chunk_size, n_rows)
        xc = x[start:end]                                             # (n, H)
        logits = _linear_into(xc, weight, bias, buf, mm_into)         # (n, V)
        rows_scale = None if scale is None else (scale if scale.dim() == 0 else scale[start:end])
        loss, dlogits = rows_fn(logits, target[start:end], *options, grad_scale=rows_scale)
        if losses is not None:
            losses[start:end] = loss
        if scale is None:
            del logits
            continue
        dlogits = dlogits.to(weight.dtype)                            # a no-op for the kernels
        if dx is not None:
            mm_into(dlogits, weight, dx[start:end])
        if dweight is not None:
            mm_into(dlogits.t(), xc, dweight, accumulate=start > 0)
        if dbias is not None:
            if start == 0:
                torch.sum(dlogits, 0, out=dbias)
            else:
                dbias.add_(dlogits.sum(0))
        del logits, dlogits          # before the next chunk's logits: one chunk alive at a time
    return dx, dweight, dbias


def _rows_lse_pass(x, weight, bias, target, rows_lse_fn, options, chunk_size, scale, losses,
                   lse, want_dx):
    """bf16/fp16 schedule, forward: token chunks fill losses (N,) and lse (N,); with `scale`
    and want_dx also returns dx (N, H) = dlogits W, one GEMM over all V per chunk."""
    dx = x.new_empty(x.shape) if want_dx and scale is not None else None
    buf = _logits_buffer(x, weight, chunk_size)
    for start in range(0, x.shape[0], chunk_size):
        end = min(start + chunk_size, x.shape[0])
        logits = _linear_into(x[start:end], weight, bias, buf)        # (n, V)
        loss, row_lse, dlogits = rows_lse_fn(logits, target[start:end], *options,
                                             grad_scale=scale if dx is not None else None)
        losses[start:end] = loss
        lse[start:end] = row_lse
        if dx is not None:
            torch.mm(dlogits.to(weight.dtype), weight, out=dx[start:end])
        del logits, dlogits
    return dx


def _dx_pass(x, weight, bias, target, lse, grad_block_fn, options, chunk_size, scale):
    """bf16/fp16 schedule, backward of "none" (or a second backward): dx from the saved lse."""
    n_classes = weight.shape[0]
    dx = x.new_empty(x.shape)                                         # (N, H)
    buf = _logits_buffer(x, weight, chunk_size)
    for start in range(0, x.shape[0], chunk_size):
        end = min(start + chunk_size, x.shape[0])
        logits = _linear_into(x[start:end], weight, bias, buf)        # (n, V) recomputed
        rows_scale = scale if scale.dim() == 0 else scale[start:end]
        dlogits = grad_block_fn(logits, target[start:end], lse[start:end], 0, n_classes,
                                *options, grad_scale=rows_scale)
        torch.mm(dlogits.to(weight.dtype), weight, out=dx[start:end])
        del logits, dlogits
    return dx


def _vocab_pass(x, weight, bias, target, lse, grad_block_fn, options, block, scale, want_dw,
                want_db):
    """bf16/fp16 schedule, backward: dW and db one block of `block` vocabulary columns at a
    time, each from one GEMM (one sum) over all N rows, so each is rounded once."""
    n_classes = weight.shape[0]
    dweight = torch.empty_like(weight) if want_dw else None           # (V, H)
    dbias = torch.empty_like(bias) if want_db else None               # (V,)
    for v0 in range(0, n_classes, block):
        v1 = min(v0 + block, n_classes)
        logits = F.linear(x, weight[v0:v1], None if bias is None else bias[v0:v1])  # (N, c)
        dlogits = grad_block_fn(logits, target, lse, v0, n_classes, *options, grad_scale=scale)
        dlogits = dlogits.to(weight.dtype)                            # eager rounds it too
        if dweight is not None:
            torch.mm(dlogits.t(), x, out=dweight[v0:v1])              # (c, H)
        if dbias is not None:
            dbias[v0:v1] = dlogits.sum(0, dtype=_acc(weight.dtype))
        del logits, dlogits
    return dweight, dbias


def _vocab_block(n_rows: int, n_classes: int, chunk_size: int, element_size: int) -> int:
    # columns per block: c*N elements, at most a token chunk's n*V and 16 MiB; a multiple of 64
    # when that allows (1024 at N = 8192 in bf16)
    n_rows = max(n_rows, 1)
    block = max(1, min(chunk_size * n_classes // n_rows, _BLOCK_BYTES // (n_rows * element_size)))
    if block >= 128:
        block -= block % 64
    return min(block, n_classes)


class _LinearCrossEntropy(torch.autograd.Function):
    """linear_cross_entropy's autograd, generic over a backend's kernels: `kernels` =
    (rows_fn, rows_lse_fn, grad_block_fn) with the contracts of reference.cross_entropy_rows,
    reference.cross_entropy_rows_lse and reference.cross_entropy_grad_block. The schedule
    (see the comment above) follows the dtype; nothing of size (N, V) is ever held, except
    when all N rows fit in one chunk: then the forward keeps that chunk's logits (within the
    chunk budget) and the backward computes their gradient with grad_output folded in and runs
    the two GEMMs: eager's 6NHV and eager's roundings, for every dtype and reduction."""

    @staticmethod
    def forward(ctx, x, weight, bias, target, kernels, config):
        # config: ((ignore_index, label_smoothing, z_loss, softcap), reduction, chunk_size,
        # need_grad): plain values, one argument so backward returns few Nones
        options, reduction, chunk_size, need_grad = config
        rows_fn, rows_lse_fn, _, mm_into = kernels
        n_rows, acc, blocked = x.shape[0], _acc(x.dtype), _vocab_blocked(x.dtype)
        want = (ctx.needs_input_grad[0], ctx.needs_input_grad[1],
                bias is not None and ctx.needs_input_grad[2])
        count = _mean_count(target, options[0], acc) if reduction == "mean" else None
        base = _base_scale(count, reduction, target, acc)
        # gradients in the forward: "mean"/"sum" (a scalar grad_output scales them later)
        scale = base if need_grad and reduction != "none" else None
        lse = stash = None
        if need_grad and 0 < n_rows <= chunk_size:
            # one chunk: keep its logits (N, V) for the backward
            logits = _linear_into(x, weight, bias, _logits_buffer(x, weight, n_rows),
                                  mm_into)                            # (N, V)
            losses, lse, _ = rows_lse_fn(logits, target, *options)
            stash = ("logits", logits)
        elif blocked:
            losses = x.new_empty((n_rows,), dtype=acc)                # (N,)
            lse = x.new_empty((n_rows,), dtype=acc)                   # (N,)
            dx = _rows_lse_pass(x, weight, bias, target, rows_lse_fn, options, chunk_size,
                                scale, losses, lse, want[0])
            stash = None if scale is None else ("grads", [dx, None, None])  # dW, db: backward
        else:
            losses = x.new_empty((n_rows,), dtype=acc)                # (N,)
            grads = _token_pass(x, weight, bias, target, rows_fn, options, chunk_size, scale,
                                want, losses, mm_into)
            stash = None if scale is None else ("grads", list(grads))
        ctx.save_for_backward(x, weight, bias, target, lse)
        ctx.kernels, ctx.config, ctx.base, ctx.stash = kernels, config, base, stash
        out = losses if reduction == "none" else losses.sum()
        if reduction == "mean":
            out = out / count
        return out.to(x.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        options, reduction, chunk_size, _ = ctx.config
        rows_fn, _, grad_block_fn, mm_into = ctx.kernels
        x, weight, bias, target, lse = ctx.saved_tensors
        want = list(ctx.needs_input_grad[:3])
        want[2] = want[2] and bias is not None
        acc = _acc(x.dtype)
        scale = _row_scale(ctx.base, grad_out, acc)                   # 0-dim or (N,)
        grads = [None, None, None]
        kind, stash = ctx.stash or (None, None)
        if kind == "logits":
            dlogits = grad_block_fn(stash, target, lse, 0, weight.shape[0], *options,
                                    grad_scale=scale)                 # (N, V)
            if dlogits is stash:
                ctx.stash = None    # overwritten: a second backward (retain_graph) recomputes
            dlogits = dlogits.to(weight.dtype)                        # eager rounds it too
            if want[0]:
                grads[0] = mm_into(dlogits, weight, x.new_empty(x.shape))          # (N, H)
            if want[1]:
                grads[1] = mm_into(dlogits.t(), x, weight.new_empty(weight.shape))  # (V, H)
            if want[2]:
                grads[2] = dlogits.sum(0, dtype=acc).to(bias.dtype)   # (V,)
            return grads[0], grads[1], grads[2], None, None, None
        if kind == "grads":
            ctx.stash = None    # spent: a second backward (retain_graph) recomputes
            g = grad_out.to(x.dtype)
            for i, grad in enumerate(stash):
                if grad is not None and want[i]:
                    grads[i] = grad.mul_(g)     # the only user now: scaled in place
                    want[i] = False
        if not any(want):
            return grads[0], grads[1], grads[2], None, None, None
        if not _vocab_blocked(x.dtype):
            new = _token_pass(x, weight, bias, target, rows_fn, options, chunk_size, scale,
                              want, mm_into=mm_into)
            grads = [fresh if w else old for old, fresh, w in zip(grads, new, want)]
            return grads[0], grads[1], grads[2], None, None, None
        if want[0]:
            grads[0] = _dx_pass(x, weight, bias, target, lse, grad_block_fn, options,
                                chunk_size, scale)
        if want[1] or want[2]:
            block = _vocab_block(x.shape[0], weight.shape[0], chunk_size, x.element_size())
            dweight, dbias = _vocab_pass(x, weight, bias, target, lse, grad_block_fn, options,
                                         block, scale, want[1], want[2])
            grads[1] = dweight if want[1] else grads[1]
            grads[2] = dbias if want[2] else grads[2]
        return grads[0], grads[1], grads[2], None, None, None


def chunked_linear_cross_entropy(rows_fn, rows_lse_fn=None, grad_block_fn=None, mm_into=None):
    """A linear_cross_entropy backend from a backend's per-chunk kernels: `rows_fn` (the
    contract of llmcore.kernels.reference.cross_entropy_rows, the fp32/fp64 schedule), and for
    the bf16/fp16 schedule `rows_lse_fn` and `grad_block_fn` (contracts of
    reference.cross_entropy_rows_lse and reference.cross_entropy_grad_block; the reference
    ones when a backend has none); `mm_into`, the GEMMs of the one-chunk and fp32/fp64
    schedules (torch_mm_into's contract; torch's when None)."""
    kernels = (rows_fn, rows_lse_fn or reference.cross_entropy_rows_lse,
               grad_block_fn or reference.cross_entropy_grad_block, mm_into or torch_mm_into)

    def run(x, weight, target, bias, ignore_index, reduction, label_smoothing, z_loss, softcap,
            chunk_size):
        need_grad = torch.is_grad_enabled() and (
            x.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad))
        options = (ignore_index, label_smoothing, z_loss, softcap)
        return _LinearCrossEntropy.apply(x, weight, bias, target, kernels,
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
    out = loss if reduction == "none" else loss.sum() if reduction == "sum" else loss.sum() / den
    # a .to() that has nothing to convert still costs about a microsecond
    return out if out.dtype == dtype else out.to(dtype)


# ---------------------------------------------------------------------------- triton backend
# The kernels of llmcore/kernels/triton/cross_entropy.py. Eager mode: _TritonCrossEntropy, a
# plain autograd.Function that launches them directly (the custom_op + register_autograd route
# costs ~130 us of host time per fwd+bwd); with nothing to differentiate, its forward
# (_triton_ce_eager_fwd) alone, without the Function's bookkeeping. Under torch.compile: the
# same kernels as torch.library ops in namespace llmcore_triton (custom_ops, opaque to
# torch.compile, not triton_ops: see llmcore/ops/norm.py), with the reduction as plain torch on
# top. Both reach
# the backward kernel through _triton_ce_grad. In the op schemas softcap = 0.0 means none.
#   cross_entropy_fwd   logits -> (loss (n,), lse (n,));  autograd via cross_entropy_bwd
#   cross_entropy_rows_ loss (n,), and overwrites `logits` with dloss/dlogits * grad_scale (a
#                       mutation declared in the schema): linear_cross_entropy's per-chunk step
#                       and the in-place-gradient option, which saves the (n, V) gradient buffer.

_triton_ce_kernels = None  # llmcore.kernels.triton.cross_entropy, once imported


def _triton_kernels():
    # a module global after the first call: an import statement costs a microsecond per call
    global _triton_ce_kernels
    if _triton_ce_kernels is None:
        from llmcore.kernels.triton import cross_entropy as kernels
        _triton_ce_kernels = kernels
    return _triton_ce_kernels


def _launch_ce_fwd(logits, target, weight, ignore_index, label_smoothing, z_loss, softcap,
                   z_ratio=None, **kwargs):
    return _triton_kernels().ce_fwd(logits, target, weight, ignore_index, label_smoothing,
                                    z_loss, softcap or None, z_ratio=z_ratio, **kwargs)


def _assert_targets(wt_sum, n_classes, ignore_index):
    """The eager Triton route's target check on CUDA: the kernel wrote w[t] per row, nan for a
    target outside [0, n_classes), so one asynchronous assert on their sum (which "mean" needs
    anyway) replaces the ~6-kernel check. CPU calls are checked before (a ValueError)."""
    torch._assert_async(wt_sum == wt_sum, f"target values must be in [0, {n_classes}) or "
                                          f"equal ignore_index={ignore_index}")


def _launch_ce_bwd(grad_loss, logits, target, weight, lse, ignore_index, label_smoothing, z_loss,
                   softcap, z_ratio=None, den=None):
    return _triton_kernels().ce_bwd(logits, target, weight, lse, grad_loss, ignore_index,
                                    label_smoothing, z_loss, softcap or None, z_ratio=z_ratio,
                                    den=den)


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


def _triton_ce_grad(saved, options, grad_loss, bwd, **kwargs):
    """The backward shared by both routes: dlogits from the saved (logits, target, weight, lse,
    z_ratio), the options (ignore_index, label_smoothing, z_loss, softcap) and the gradient of
    each row's loss, through `bwd` (the launcher in eager mode, the registered op under
    torch.compile); kwargs go to `bwd` (the eager launcher's den)."""
    logits, target, weight, lse, z_ratio = saved[:5]
    return bwd(grad_loss, logits, target, weight, lse, *options, z_ratio, **kwargs)


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


def _triton_ce_eager_fwd(logits, target, weight, config):
    """The eager route's forward: the kernel, the reduction and the target check. Returns the
    reduced loss and what backward needs: (out, lse, z_ratio, den). config: (ignore_index,
    reduction, label_smoothing, z_loss, softcap) as plain values."""
    ignore_index, reduction, label_smoothing, z_loss, softcap = config
    den = z_ratio = None
    if reduction == "mean" and weight is not None and z_loss > 0:
        # the z-term's scale den / n_valid is an input of the kernel: den comes first
        den, z_ratio = _mean_denominator(target, weight, ignore_index, _acc_dtype(logits),
                                         count=True)
    loss, lse, wt = _launch_ce_fwd(logits, target, weight, ignore_index, label_smoothing,
                                   z_loss, softcap, z_ratio, valid_weight=True)
    if reduction == "mean" and den is None:
        den = wt.sum()                             # sum of w[t] over the valid rows
    if not target.is_cpu:
        _assert_targets(den if z_ratio is None and den is not None else wt.sum(),
                        logits.shape[1], ignore_index)
    return _reduce(loss, den, reduction, logits.dtype), lse, z_ratio, den


class _TritonCrossEntropy(torch.autograd.Function):
    """The eager route: the kernels launched directly, the reduction in forward, and backward
    scaled per the reduction. config: (ignore_index, reduction, label_smoothing, z_loss,
    softcap) as plain values."""

    @staticmethod
    def forward(ctx, logits, target, weight, config):
        out, lse, z_ratio, den = _triton_ce_eager_fwd(logits, target, weight, config)
        ignore_index, reduction, label_smoothing, z_loss, softcap = config
        ctx.options = (ignore_index, label_smoothing, z_loss, softcap)
        ctx.reduction = reduction
        ctx.save_for_backward(logits, target, weight, lse, z_ratio, den)
        ctx.set_materialize_grads(False)
        return out

    @staticmethod
    def backward(ctx, grad):
        if grad is None or not ctx.needs_input_grad[0]:
            return None, None, None, None
        saved = ctx.saved_tensors
        # the gradient of each row's loss: grad (0-dim "sum", (n,) "none"), or grad / den for
        # "mean", which the kernel divides itself (den is None but for "mean"): one torch op
        # fewer per backward, the same bits as the compiled route's division
        return (_triton_ce_grad(saved, ctx.options, grad, _launch_ce_bwd, den=saved[5]),
                None, None, None)


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
    loss, _lse = _triton_kernels().ce_fwd(logits, target, weight, ignore_index, label_smoothing,
                                          z_loss, softcap or None, grad=logits,
                                          grad_scale=grad_scale, z_ratio=z_ratio)
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
    elif torch.is_grad_enabled() and (
            logits.requires_grad or (weight is not None and weight.requires_grad)):
        out = _TritonCrossEntropy.apply(logits, t, weight, config)
    else:
        # nothing to differentiate (evaluation): the forward alone, without an autograd node
        # (an autograd.Function call costs about as much as the rest of the op)
        out = _triton_ce_eager_fwd(logits, t, weight, config)[0]
    return out.reshape(target.shape) if reduction == "none" and target.dim() != 1 else out


_CROSS_ENTROPY["triton"] = _triton_cross_entropy
_INPLACE_BACKWARD.add("triton")


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


# Once the library is loaded: llmcore::cross_entropy as torch.ops (what dynamo traces) and as
# its eager entry point in llmcore._native (the same op, without torch.ops' boxed argument
# path); llmcore::cross_entropy_check_targets's eager entry point (called outside compile only).
_native_ce_op = None
_native_ce_eager = None
_native_check_targets = None
# llmcore._native.cross_entropy_eager / linear_cross_entropy_eager: the public functions'
# ordinary call on CPU tensors, checked and run in one C++ call; None for anything else, which
# takes the Python path (csrc/torch/eager_entry.cpp). None when the build predates them.
_native_ce_fast = None
_native_lce_fast = None


def _register_native() -> bool:
    global _native_ce_op, _native_ce_eager, _native_check_targets, _native_ce_fast
    global _native_lce_fast
    native = backends.native_module()
    if native is None:  # loading it registers the C++ ops
        return False
    torch.library.register_fake("llmcore::cross_entropy")(_native_ce_fake)
    torch.library.register_fake("llmcore::cross_entropy_fwd")(_native_ce_fwd_fake)
    torch.library.register_fake("llmcore::cross_entropy_bwd")(_native_ce_bwd_fake)
    torch.library.register_fake("llmcore::cross_entropy_rows_")(_native_ce_rows_fake)
    _native_ce_op = torch.ops.llmcore.cross_entropy.default
    _native_ce_eager = native.cross_entropy
    _native_check_targets = native.cross_entropy_check_targets
    _native_ce_fast = getattr(native, "cross_entropy_eager", None)
    _native_lce_fast = getattr(native, "linear_cross_entropy_eager", None)
    return True


def _native_cross_entropy(input, target, weight, ignore_index, reduction, label_smoothing,
                          z_loss, softcap):
    if weight is not None and weight.requires_grad and torch.is_grad_enabled():
        raise ValueError("weight must not require grad with backend 'native': its kernels do "
                         "not differentiate the class weights (pass weight.detach(), or use "
                         "backend='torch')")
    logits, t = _as_rows(input, target)
    op = _native_ce_op if torch.compiler.is_compiling() else _native_ce_eager
    out = op(logits, t, weight, ignore_index, _REDUCTION_CODE[reduction], label_smoothing, z_loss,
             softcap or 0.0)
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


# ---------------------------------------------------------------------------- linear-CE kernels
# Each backend's kernels for linear_cross_entropy's chunk loop (see "the chunk loop" above):
# rows_fn (fp32/fp64 schedule), rows_lse_fn and grad_block_fn (bf16/fp16 schedule).

@torch.library.custom_op("llmcore_triton::cross_entropy_rows_lse_", mutates_args=("logits",))
def _triton_ce_rows_lse_(logits: torch.Tensor, target: torch.Tensor, ignore_index: int,
                         label_smoothing: float, z_loss: float, softcap: float,
                         grad_scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # one kernel pass: (loss (n,), lse (n,)), and `logits` (n, V) overwritten by its gradient
    from llmcore.kernels.triton import cross_entropy as kernels

    return kernels.ce_fwd(logits, target, None, ignore_index, label_smoothing, z_loss,
                          softcap or None, grad=logits, grad_scale=grad_scale)


@_triton_ce_rows_lse_.register_fake
def _(logits, target, ignore_index, label_smoothing, z_loss, softcap, grad_scale):
    n, acc = logits.shape[0], _acc_dtype(logits)
    return logits.new_empty((n,), dtype=acc), logits.new_empty((n,), dtype=acc)


@torch.library.custom_op("llmcore_triton::cross_entropy_grad_block_", mutates_args=("logits",))
def _triton_ce_grad_block_(logits: torch.Tensor, target: torch.Tensor, lse: torch.Tensor,
                           col_start: int, n_classes: int, ignore_index: int,
                           label_smoothing: float, z_loss: float, softcap: float,
                           grad_scale: torch.Tensor) -> None:
    # the block (n, c) of vocabulary columns from col_start, overwritten by its gradient
    from llmcore.kernels.triton import cross_entropy as kernels

    kernels.ce_grad_block(logits, target, lse, grad_scale, col_start, n_classes, ignore_index,
                          label_smoothing, z_loss, softcap or None, out=logits)


@_triton_ce_grad_block_.register_fake
def _(logits, target, lse, col_start, n_classes, ignore_index, label_smoothing, z_loss, softcap,
      grad_scale):
    return None


def _triton_rows_lse(logits, target, ignore_index=-100, label_smoothing=0.0, z_loss=0.0,
                     softcap=None, grad_scale=None):
    if grad_scale is None:
        loss, lse = _triton_ce_fwd(logits, target, None, ignore_index, label_smoothing, z_loss,
                                   softcap or 0.0)
        return loss, lse, None
    loss, lse = _triton_ce_rows_lse_(logits, target, ignore_index, label_smoothing, z_loss,
                                     softcap or 0.0, grad_scale)
    return loss, lse, logits


def _triton_grad_block(logits, target, lse, col_start, n_classes, ignore_index=-100,
                       label_smoothing=0.0, z_loss=0.0, softcap=None, grad_scale=None):
    _triton_ce_grad_block_(logits, target, lse, col_start, n_classes, ignore_index,
                           label_smoothing, z_loss, softcap or 0.0, grad_scale)
    return logits


# Eager calls launch the chunk kernels directly: through the custom ops above, each launch
# would also pay the dispatcher's Python custom-op path (tens of microseconds), once per token
# chunk and once per vocabulary block (50 blocks at N = 8192, V = 50257 in bf16), about the
# GPU time of a block's two GEMMs. Under torch.compile the custom ops are what dynamo traces.

def _triton_eager_rows(logits, target, ignore_index=-100, label_smoothing=0.0, z_loss=0.0,
                       softcap=None, grad_scale=None):
    if torch.compiler.is_compiling():
        return _triton_cross_entropy_rows(logits, target, ignore_index, label_smoothing, z_loss,
                                          softcap, grad_scale)
    if grad_scale is None:
        return _launch_ce_fwd(logits, target, None, ignore_index, label_smoothing, z_loss,
                              softcap)[0], None
    loss, _lse = _launch_ce_fwd(logits, target, None, ignore_index, label_smoothing, z_loss,
                                softcap, grad=logits, grad_scale=grad_scale)
    return loss, logits


def _triton_eager_rows_lse(logits, target, ignore_index=-100, label_smoothing=0.0, z_loss=0.0,
                           softcap=None, grad_scale=None):
    if torch.compiler.is_compiling():
        return _triton_rows_lse(logits, target, ignore_index, label_smoothing, z_loss, softcap,
                                grad_scale)
    if grad_scale is None:
        return (*_launch_ce_fwd(logits, target, None, ignore_index, label_smoothing, z_loss,
                                softcap), None)
    loss, lse = _launch_ce_fwd(logits, target, None, ignore_index, label_smoothing, z_loss,
                               softcap, grad=logits, grad_scale=grad_scale)
    return loss, lse, logits


def _triton_eager_grad_block(logits, target, lse, col_start, n_classes, ignore_index=-100,
                             label_smoothing=0.0, z_loss=0.0, softcap=None, grad_scale=None):
    if torch.compiler.is_compiling():
        return _triton_grad_block(logits, target, lse, col_start, n_classes, ignore_index,
                                  label_smoothing, z_loss, softcap, grad_scale)
    from llmcore.kernels.triton import cross_entropy as kernels

    kernels.ce_grad_block(logits, target, lse, grad_scale, col_start, n_classes, ignore_index,
                          label_smoothing, z_loss, softcap or None, out=logits)
    return logits


_LINEAR_CROSS_ENTROPY["triton"] = chunked_linear_cross_entropy(
    _triton_eager_rows, _triton_eager_rows_lse, _triton_eager_grad_block)


def _native_rows_lse(logits, target, ignore_index=-100, label_smoothing=0.0, z_loss=0.0,
                     softcap=None, grad_scale=None):
    # two native passes (loss and lse, then the gradient from the lse); no block kernel in C++
    # yet, so the vocabulary pass uses the reference grad_block_fn
    t = target.long()
    loss, lse = torch.ops.llmcore.cross_entropy_fwd(logits, t, None, ignore_index,
                                                    label_smoothing, z_loss, softcap or 0.0)
    if grad_scale is None:
        return loss, lse, None
    dlogits = torch.ops.llmcore.cross_entropy_bwd(grad_scale.expand(logits.shape[0]), logits, t,
                                                  None, lse, ignore_index, label_smoothing,
                                                  z_loss, softcap or 0.0)
    return loss, lse, dlogits


def _native_grad_block(logits, target, lse, col_start, n_classes, ignore_index=-100,
                       label_smoothing=0.0, z_loss=0.0, softcap=None, grad_scale=None):
    # whole rows: the native kernel writes the gradient over the logits (it recomputes the lse
    # on the way, bit-identical to the saved one); a block of columns: the reference
    if col_start != 0 or logits.shape[1] != n_classes:
        return reference.cross_entropy_grad_block(logits, target, lse, col_start, n_classes,
                                                  ignore_index, label_smoothing, z_loss,
                                                  softcap, grad_scale)
    torch.ops.llmcore.cross_entropy_rows_(logits, target.long(), None, ignore_index,
                                          label_smoothing, z_loss, softcap or 0.0, grad_scale)
    return logits


def _native_lce_fake(input, weight, bias, target, ignore_index, reduction, label_smoothing,
                     z_loss, softcap):
    if reduction == _REDUCTION_CODE["none"]:
        return input.new_empty((input.shape[0],))
    return input.new_empty(())


def _native_linear_cross_entropy(chunked):
    """The native backend's linear_cross_entropy: a call whose rows fit one chunk is one C++ op
    with its autograd in C++ (llmcore::linear_cross_entropy, the one-chunk schedule of the loop
    above, bit for bit, without its Python); larger calls, and every call under torch.compile,
    run `chunked`, the Python chunk loop."""
    torch.library.register_fake("llmcore::linear_cross_entropy")(_native_lce_fake)
    one_chunk = backends.native_module().linear_cross_entropy

    def run(x, weight, target, bias, ignore_index, reduction, label_smoothing, z_loss, softcap,
            chunk_size):
        if 0 < x.shape[0] <= chunk_size and not torch.compiler.is_compiling():
            return one_chunk(x, weight, bias, target, ignore_index, _REDUCTION_CODE[reduction],
                             label_smoothing, z_loss, softcap or 0.0)
        return chunked(x, weight, target, bias, ignore_index, reduction, label_smoothing,
                       z_loss, softcap, chunk_size)
    run.chunked = chunked   # for the tests that compare the two routes
    return run


def _native_mm_into(a, b, out, accumulate=False, bias=None):
    """torch_mm_into on llmcore's CPU GEMM (llmcore::gemm_into) for float32 CPU tensors in
    eager mode; torch's GEMMs otherwise (and under torch.compile, which sees no mutating op of
    ours). The C++ one-chunk op calls the same GEMM: both routes keep the same bits."""
    if (a.dtype != torch.float32 or not a.is_cpu or torch.compiler.is_compiling()
            or not _linear.NATIVE):
        return torch_mm_into(a, b, out, accumulate, bias)
    torch.ops.llmcore.gemm_into(out, a, b, bias, accumulate)
    return out


if "native" in _CROSS_ENTROPY:
    _LINEAR_CROSS_ENTROPY["native"] = _native_linear_cross_entropy(chunked_linear_cross_entropy(
        _native_cross_entropy_rows, _native_rows_lse, _native_grad_block, _native_mm_into))
