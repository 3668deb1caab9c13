"""Input checks shared by the public ops. Each raises with a message that names the argument
and what was expected, before any kernel runs."""
from __future__ import annotations

from typing import Sequence

import torch


# The floating dtypes every backend computes in. float8 types are floating point too, but no
# kernel here takes them (and eager PyTorch has no norm or softmax for them): refused up front, so
# every backend fails the same way instead of one computing garbage in float8.
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
FLOAT_DTYPE_SET = frozenset(FLOAT_DTYPES)  # a hashed lookup: 3x cheaper than the tuple's ==s
_INTEGER_DTYPE_SET = frozenset((torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8))


def floating(name: str, t: torch.Tensor) -> None:
    tensor(name, t)
    if t.dtype not in FLOAT_DTYPE_SET:
        raise TypeError(f"{name} must be a floating-point tensor (float16, bfloat16, float32 or "
                        f"float64), got dtype {t.dtype}")


def tensor(name: str, t) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")


def integer(name: str, t: torch.Tensor) -> None:
    tensor(name, t)
    if t.dtype in _INTEGER_DTYPE_SET:  # the usual ones, without the general test below
        return
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor, got dtype {t.dtype}")


def same_device(name: str, t: torch.Tensor, ref: torch.Tensor, ref_name: str = "input") -> None:
    if not (t.is_cpu and ref.is_cpu) and t.device != ref.device:  # is_cpu: no device objects
        raise ValueError(f"{name} must be on {ref_name}'s device {ref.device}, got {t.device}")


def same_dtype(name: str, t: torch.Tensor, ref: torch.Tensor, ref_name: str = "input") -> None:
    if t.dtype != ref.dtype:
        raise TypeError(f"{name} must have {ref_name}'s dtype {ref.dtype}, got {t.dtype}")


def shape(name: str, t: torch.Tensor, expected: Sequence[int]) -> None:
    if t.shape != expected and tuple(t.shape) != tuple(expected):
        raise ValueError(f"{name} must have shape {tuple(expected)}, got {tuple(t.shape)}")


def ndim(name: str, t: torch.Tensor, dims: int | Sequence[int]) -> None:
    allowed = (dims,) if isinstance(dims, int) else tuple(dims)
    if t.dim() not in allowed:
        want = " or ".join(str(d) for d in allowed)
        raise ValueError(f"{name} must be {want}-dimensional, got shape {tuple(t.shape)}")


def choice(name: str, value, allowed: Sequence) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {tuple(allowed)}, got {value!r}")


def normalized_shape(shape_arg, input: torch.Tensor) -> tuple[int, ...]:
    """Checks `normalized_shape` against the trailing dims of `input`; returns it as a tuple."""
    if type(shape_arg) is int or (type(shape_arg) in (tuple, torch.Size) and len(shape_arg) == 1
                                  and type(shape_arg[0]) is int):
        # the common case, without the general path's conversions: one normalised dim
        d = shape_arg if type(shape_arg) is int else shape_arg[0]
        if input.dim() >= 1 and input.shape[-1] == d:
            return (d,)
    if isinstance(shape_arg, int):
        shape_arg = (shape_arg,)
    if isinstance(shape_arg, (str, bytes)):  # iterable, but "8" is not a shape
        raise TypeError(f"normalized_shape must be an int or a sequence of ints, got {shape_arg!r}")
    try:
        dims = tuple(int(d) for d in shape_arg)
    except TypeError:
        raise TypeError(f"normalized_shape must be an int or a sequence of ints, got {shape_arg!r}")
    if len(dims) == 0 or len(dims) > input.dim() or tuple(input.shape[-len(dims):]) != dims:
        raise ValueError(
            f"normalized_shape {dims} must equal the trailing dims of input, whose shape is "
            f"{tuple(input.shape)}"
        )
    return dims
