"""The autograd shared by llmcore's row-wise activation ops (swiglu, gelu) on their kernel
backends.

A backend supplies fwd(x, *args) -> y and bwd(dy, x, *args) -> dx on 2-D (rows, cols)
matrices with a unit column stride (any row stride); args are the op's non-tensor options
(gelu's approximate). Eager calls go through RowwiseFunction, a plain autograd.Function that
launches directly; under torch.compile a backend's registered forward op (a custom op with a
fake impl) is called instead, with `grad` below as its registered autograd. Either way only x
is saved: the backward recomputes what it needs from x.
"""
from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable


def save(ctx, x, args) -> None:
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(x)
    ctx.args = args


def grad(ctx, dy, bwd):
    """x's gradient, or None for no dy (an output nobody differentiated)."""
    if dy is None:
        return None
    x, = ctx.saved_tensors
    return bwd(dy if dy.stride(-1) == 1 else dy.contiguous(), x, *ctx.args)


def op_setup(ctx, inputs, output) -> None:
    """setup_context of a registered forward op: inputs are (x, *args)."""
    save(ctx, inputs[0], tuple(inputs[1:]))


def register_autograd(fwd_op, bwd_op) -> None:
    """The autograd of a registered forward op (a custom op or an op name), over bwd_op."""
    def backward(ctx, dy):
        return (grad(ctx, dy, bwd_op),) + (None,) * len(ctx.args)
    torch.library.register_autograd(fwd_op, backward, setup_context=op_setup)


class RowwiseFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, fwd, bwd, *args):
        save(ctx, x, args)
        ctx.bwd = bwd
        return fwd(x, *args)

    @staticmethod
    @once_differentiable                  # the kernels' gradient has no graph of its own
    def backward(ctx, dy):
        return (grad(ctx, dy, ctx.bwd), None, None) + (None,) * len(ctx.args)


def call(x, fwd, bwd, fwd_op, *args):
    """The op on x (..., cols) through a kernel backend: x as (rows, cols), a view unless its
    leading dims cannot be merged or its last dim is strided; the result in x's leading shape.
    Without a gradient to record (no_grad, inference, x not requiring grad) the forward kernel
    runs alone, without an autograd.Function."""
    if x.dim() == 2:
        x2 = x
    else:
        x2 = x.flatten(0, -2) if x.dim() > 2 else x.unsqueeze(0)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    if torch.compiler.is_compiling():
        y = fwd_op(x2, *args)
    elif x.requires_grad and torch.is_grad_enabled():
        y = RowwiseFunction.apply(x2, fwd, bwd, *args)
    else:                              # nothing to differentiate: the forward kernel alone
        y = fwd(x2, *args)
    return y if x.dim() == 2 else y.view(*x.shape[:-1], y.shape[-1])
