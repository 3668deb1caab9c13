"""layer_norm and rms_norm: the public functions, input checks and backend dispatch.

With `residual`, both compute h = input + residual and return (norm(h), h): the pre-norm
residual add of a transformer block fused into the norm.
"""
from __future__ import annotations

import torch

from llmcore import backends
from llmcore.kernels import reference
from llmcore.ops import _checks


def _check(input, normalized_shape, weight, bias, residual) -> tuple[int, ...]:
    _checks.floating("input", input)
    dims = _checks.normalized_shape(normalized_shape, input)
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None:
            _checks.floating(name, t)
            _checks.shape(name, t, dims)
            _checks.same_device(name, t, input)
    if residual is not None:
        _checks.floating("residual", residual)
        _checks.shape("residual", residual, input.shape)
        _checks.same_device("residual", residual, input)
        _checks.same_dtype("residual", residual, input)
    return dims


def layer_norm(input, normalized_shape, weight=None, bias=None, eps=1e-5, *, residual=None,
               backend="auto"):
    """Layer normalisation over the trailing `normalized_shape` dims, like F.layer_norm.

    With `residual`, returns (layer_norm(input + residual), input + residual)."""
    dims = _check(input, normalized_shape, weight, bias, residual)
    name = backends.resolve("norm", backend, input.device)
    return _LAYER_NORM[name](input, dims, weight, bias, float(eps), residual)


def rms_norm(input, normalized_shape, weight=None, eps=None, *, residual=None, backend="auto"):
    """RMS normalisation over the trailing `normalized_shape` dims, like F.rms_norm
    (eps=None means torch.finfo(input.dtype).eps).

    With `residual`, returns (rms_norm(input + residual), input + residual)."""
    dims = _check(input, normalized_shape, weight, None, residual)
    if eps is None:
        eps = torch.finfo(input.dtype).eps
    name = backends.resolve("norm", backend, input.device)
    return _RMS_NORM[name](input, dims, weight, float(eps), residual)


# Backend -> implementation. Kernel backends add their entries below as they land.
_LAYER_NORM = {"torch": reference.layer_norm}
_RMS_NORM = {"torch": reference.rms_norm}
