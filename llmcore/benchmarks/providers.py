"""Benchmark providers: who runs an op, and whether they can run here.

A provider is a name for one implementation of an op:

  torch           eager PyTorch (torch.nn.functional / plain tensor math): the baseline
  torch_compile   the same eager code under torch.compile (inductor)
  sdpa            F.scaled_dot_product_attention (attention only)
  llmcore_triton  llmcore with backend="triton"
  llmcore_native  llmcore with backend="native" (the compiled csrc kernels)
  llmcore_auto    llmcore with backend="auto": per op family what "auto" picks on the device
                  (train step only: the model as a user gets it)
  flash_attn      the flash-attn package (attention only)
  liger           Liger-Kernel (norms, cross-entropy and SwiGLU)
  llmcore_compile the llmcore model (backend "auto") under llmcore.models.compile_model
                  (train step only)
  hf              the Hugging Face transformers model (train step only)
  hf_compile      that model under torch.compile (train step only)
  flex_attention  torch.nn.attention.flex_attention under torch.compile, with the score_mod /
                  block mask of each case (attention features only; forward only on the CPU)

`probe()` returns None when the provider can run an op family on a device, else the reason it
cannot. The harness uses it twice: to say why a provider was skipped in an "all available" run,
and to fail before any timing when a provider asked for by name cannot run.
"""
from __future__ import annotations

import functools
import importlib
import importlib.util
import os
import shutil

import torch

from llmcore.benchmarks.names import PROVIDERS

# llmcore provider -> the backend name it passes to llmcore
# ("llmcore_triton_nondet": attention's deterministic=False backward, the atomic-dq one;
# "llmcore_triton_ordered": its deterministic twin, the ordered-dq backward;
# "llmcore_compile": the model under llmcore.models.compile_model)
LLMCORE_BACKEND = {"llmcore_triton": "triton", "llmcore_native": "native", "llmcore_auto": "auto",
                   "llmcore_triton_nondet": "triton", "llmcore_triton_ordered": "triton",
                   "llmcore_compile": "auto"}


@functools.lru_cache(maxsize=None)
def _import_error(module: str, pip_name: str) -> str | None:
    if importlib.util.find_spec(module) is None:
        return f"{pip_name} is not installed (pip install {pip_name})"
    try:
        importlib.import_module(module)
    except Exception as exc:  # a broken install: say why rather than hide it
        return f"importing {module} failed: {type(exc).__name__}: {exc}"
    return None


def _compile_reason(device: str) -> str | None:
    if not hasattr(torch, "compile"):
        return f"torch {torch.__version__} has no torch.compile"
    if device == "cpu":
        # inductor generates C++ for CPU graphs and needs a compiler to build it
        cxx = os.environ.get("CXX")
        if not any(shutil.which(c) for c in ([cxx] if cxx else []) + ["g++", "clang++"]):
            return "torch.compile on CPU needs a C++ compiler (g++ or clang++, or $CXX)"
        return None
    return _import_error("triton", "triton")


def _llmcore_reason(provider: str, families: tuple[str, ...], device: str) -> str | None:
    from llmcore import backends

    backend = LLMCORE_BACKEND[provider]
    if backend == "triton" and device == "cpu":
        # The interpreter runs Triton kernels on the CPU for tests; timing it means nothing.
        return "Triton kernels run on the CPU only through the interpreter, which is not benchmarked"
    for family in families:
        try:
            backends.resolve(family, backend, device)
        except backends.BackendUnavailableError as exc:
            return str(exc)
    return None


def probe(provider: str, families: tuple[str, ...], device: str) -> str | None:
    """None when `provider` can run ops of the llmcore op `families` on `device`, else why not."""
    if provider not in PROVIDERS:
        raise ValueError(f"provider must be one of {PROVIDERS}, got {provider!r}")
    if device == "cuda" and not torch.cuda.is_available():
        return "no CUDA device"
    if provider in ("torch", "sdpa"):
        return None
    if provider == "torch_compile":
        return _compile_reason(device)
    if provider == "llmcore_compile":
        return _llmcore_reason(provider, families, device) or _compile_reason(device)
    if provider in LLMCORE_BACKEND:
        return _llmcore_reason(provider, families, device)
    if provider == "flash_attn":
        if device != "cuda":
            return "flash-attn runs only on CUDA tensors"
        return _import_error("flash_attn", "flash-attn")
    if provider == "liger":
        if device != "cuda":
            return "Liger-Kernel runs only on CUDA tensors (Triton GPU kernels)"
        return _import_error("liger_kernel", "liger-kernel")
    if provider == "hf":
        return _import_error("transformers", "transformers")
    if provider == "hf_compile":
        return _import_error("transformers", "transformers") or _compile_reason(device)
    if provider == "flex_attention":
        err = _import_error("torch.nn.attention.flex_attention", f"torch>=2.5 (has {torch.__version__})")
        return err or _compile_reason(device)
    raise AssertionError(provider)
