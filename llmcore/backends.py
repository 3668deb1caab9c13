"""Which backends exist here, and the rule that picks one.

Backends: "torch" (eager reference, always), "triton" (the Triton kernels: CUDA tensors, or CPU
tensors under TRITON_INTERPRET=1), "native" (llmcore._native, the compiled csrc kernels, CPU or
CUDA) and, for attention only, "flash_attn" (the external package, CUDA only).

"auto" picks the fastest one available for the tensor's device: on CUDA triton, then native,
then torch; on CPU native, then torch (the Triton interpreter is a testing tool, never picked
automatically). LLMCORE_BACKEND, read at call time, overrides "auto". A backend asked for by
name that cannot run raises; it never silently falls back.
"""
from __future__ import annotations

import functools
import importlib
import importlib.util
import os

import torch

FAMILIES = ("norm", "cross_entropy", "attention", "rope", "swiglu", "gelu", "linear")
BACKENDS = ("triton", "native", "torch", "flash_attn")

# Which backends implement each op family. A backend is listed here once its kernels and
# registration exist in llmcore/ops/<family>.py.
IMPLEMENTED: dict[str, tuple[str, ...]] = {
    "norm": ("torch", "native", "triton"),
    "cross_entropy": ("torch", "triton", "native"),
    "attention": ("torch", "flash_attn", "triton", "native"),
    "rope": ("torch", "triton", "native"),
    "swiglu": ("torch", "triton", "native"),
    "gelu": ("torch", "triton", "native"),
    "linear": ("torch", "native"),      # native: CPU float32 GEMM (F.linear on a GPU)
}

# Families whose native kernels exist for the CPU only (csrc/cpu, no csrc/cuda kernel yet).
_NATIVE_CPU_ONLY = ("attention", "rope", "swiglu", "gelu", "linear")

_AUTO_ORDER = {"cuda": ("triton", "native", "torch"), "cpu": ("native", "torch")}


class BackendUnavailableError(RuntimeError):
    """A backend was asked for by name and cannot run for this op and device."""


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=None)
def _triton_import_error() -> str | None:
    if importlib.util.find_spec("triton") is None:
        return "the triton package is not installed (pip install triton)"
    try:
        importlib.import_module("triton.language")
    except Exception as exc:  # a broken install: report why
        return f"importing triton failed: {exc}"
    return None


def native_module():
    """The compiled extension, or None when it was not built here."""
    return _load_native()[0]


@functools.lru_cache(maxsize=None)
def _load_native():
    try:
        mod = importlib.import_module("llmcore._native")
    except ImportError as exc:
        return None, f"llmcore._native is not built ({exc}); reinstall without LLMCORE_SKIP_NATIVE"
    return mod, None


def _native_has_cuda() -> bool:
    mod = native_module()
    return bool(mod is not None and getattr(mod, "has_cuda", lambda: False)())


def _why_not(family: str, backend: str, device_type: str) -> str | None:
    """None when `backend` can run `family` on `device_type`, else the reason it cannot."""
    if backend not in IMPLEMENTED[family]:
        return f"llmcore has no {backend} kernels for {family} yet"
    if backend == "torch":
        return None
    if backend == "triton":
        err = _triton_import_error()
        if err:
            return err
        if device_type == "cuda":
            return None if torch.cuda.is_available() else "no CUDA device"
        if device_type == "cpu":
            return None if _interpret() else "Triton runs CPU tensors only under TRITON_INTERPRET=1"
        return f"Triton does not run on {device_type} tensors"
    if backend == "native":
        mod, err = _load_native()
        if mod is None:
            return err
        if device_type == "cpu":
            return None
        if device_type == "cuda":
            if family in _NATIVE_CPU_ONLY:
                return f"llmcore._native has no CUDA kernels for {family} yet (CPU only)"
            return None if _native_has_cuda() else "llmcore._native was built without CUDA kernels"
        return f"no native kernels for {device_type} tensors"
    if backend == "flash_attn":
        if importlib.util.find_spec("flash_attn") is None:
            return "the flash_attn package is not installed"
        return None if device_type == "cuda" else "flash_attn runs only on CUDA tensors"
    raise AssertionError(backend)


def _auto(family: str, device_type: str) -> str:
    for name in _AUTO_ORDER.get(device_type, ("torch",)):
        if _why_not(family, name, device_type) is None:
            return name
    return "torch"


_DEVICE_TYPES: dict[torch.device, str] = {}  # device -> device.type


# Under torch.compile the choice is made once at trace time and baked into the graph (dynamo
# cannot trace the import probes above, and a per-call choice would break fullgraph=True).
@torch.compiler.assume_constant_result
def resolve(family: str, backend: str, device: torch.device | str) -> str:
    """The concrete backend to run `family` with on `device`, following the rule above."""
    if isinstance(device, torch.device):
        # torch.device.type costs more than this whole function otherwise: looked up in a dict
        device_type = _DEVICE_TYPES.get(device) or _DEVICE_TYPES.setdefault(device, device.type)
    else:
        device_type = torch.device(device).type
    if backend == "auto":
        backend = _env_backend()
    # the answer depends on nothing else that changes while the process runs (TRITON_INTERPRET
    # aside, which is part of the key): cached, so a call costs about a dict lookup.
    # TRITON_INTERPRET matters only to the Triton backend asked for by name for CPU tensors
    # ("auto" never picks Triton for them): read only then, as an environment read costs a
    # microsecond
    return _resolve(family, backend, device_type,
                    backend == "triton" and device_type == "cpu" and _interpret())


@functools.lru_cache(maxsize=None)
def _resolve(family: str, backend: str, device_type: str, _interpret_flag: bool) -> str:
    if backend == "auto":
        return _auto(family, device_type)
    if backend not in BACKENDS:
        raise ValueError(
            f"backend must be one of {('auto',) + BACKENDS}, got {backend!r}"
        )
    if backend == "flash_attn" and family != "attention":
        raise ValueError(f"backend 'flash_attn' exists only for attention, not {family}")
    reason = _why_not(family, backend, device_type)
    if reason is not None:
        raise BackendUnavailableError(
            f"backend {backend!r} cannot run {family} on {device_type} tensors: {reason}"
        )
    return backend


# LLMCORE_BACKEND, read on every "auto" call. os.environ.get costs ~0.7 us when the variable is
# unset (a KeyError raised and caught inside the mapping); CPython's os.environ keeps its
# encoded items in `_data`, updated by every os.environ assignment and deletion (monkeypatch
# included), where a lookup costs a dict's.
_ENVIRON_DATA = getattr(os.environ, "_data", None)
try:
    _ENV_KEY = os.environ.encodekey("LLMCORE_BACKEND")
except AttributeError:  # not CPython's os.environ: read it the public way
    _ENVIRON_DATA = None


def _env_backend() -> str:
    if _ENVIRON_DATA is None:
        return os.environ.get("LLMCORE_BACKEND", "auto") or "auto"
    raw = _ENVIRON_DATA.get(_ENV_KEY)
    return "auto" if raw is None else (os.environ.decodevalue(raw) or "auto")


def native_eager(family: str, backend: str, tensor) -> bool:
    """True when `tensor` (the call's first tensor argument) is a plain CPU tensor and an eager
    call (not traced by torch.compile) of `family` with `backend` runs the native kernels for
    it: whether the public functions may try their C++ eager entry (llmcore._native.<op>_eager,
    which admits CPU tensors only). False for anything else, an unknown or unavailable backend
    included (the full path then raises its error); so a CUDA call pays no C++ crossing."""
    if _is_compiling() or type(tensor) is not _Tensor or not tensor.is_cpu:
        return False
    if backend == "auto":
        backend = _env_backend()
    key = (family, backend)
    native = _NATIVE_EAGER.get(key)  # a dict lookup: cheaper than _resolve's lru_cache
    if native is None:
        try:
            native = _resolve(family, backend, "cpu", False) == "native"
        except (ValueError, BackendUnavailableError):
            native = False
        _NATIVE_EAGER[key] = native
    return native


_NATIVE_EAGER: dict[tuple[str, str], bool] = {}  # native_eager's answers, until clear_cache
# bound once: two attribute lookups fewer per call (dynamo knows is_compiling by identity)
_is_compiling = torch.compiler.is_compiling
_Tensor = torch.Tensor


def clear_cache() -> None:
    """Forgets the cached choices of `resolve` (for code that changes IMPLEMENTED or the
    installed packages at run time, e.g. tests that patch them)."""
    _resolve.cache_clear()
    _NATIVE_EAGER.clear()


def available_backends() -> dict:
    """Per op family and device type: each backend -> {"available": bool, "reason": str|None},
    plus "auto": the backend "auto" picks there."""
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    report: dict = {}
    for family in FAMILIES:
        report[family] = {}
        for dev in devices:
            names = BACKENDS if family == "attention" else BACKENDS[:-1]
            entry = {}
            for name in names:
                reason = _why_not(family, name, dev)
                entry[name] = {"available": reason is None, "reason": reason}
            entry["auto"] = _auto(family, dev)
            report[family][dev] = entry
    return report
